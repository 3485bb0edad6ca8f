"""Opening a converted model (onnx or openvino) and holding it to Keras.

Each conversion cache entry holds the converted model and a reference set: a
fixed batch of noise images (`check_images`) plus, with `--calibration-dir`,
the held-out images, with Keras fp32's probabilities for each. Every start
runs the engine on the reference set and compares (`predictor.fidelity`):
fp32 must match within `TOLERANCE` on every image, bf16 and int8 must agree
on the top-1 class of at least `--min-agreement` of the held-out images (of
the noise batch when there are none); else an EngineError says by how much
it missed. Needs neither Keras nor TensorFlow: only the converted model, the
labels and the preprocessing steps.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from keras_server.catalog import ModelSpec, labels_for
from keras_server.engines.conversion_cache import Entry
from keras_server.engines.predictor import (
    EngineError,
    ModelLoadError,
    Predictor,
    fidelity,
    parallel_batches_for,
)
from keras_server.engines.preprocess import preprocessing

log = logging.getLogger(__name__)

# Largest |engine - keras| allowed on any class probability at fp32.
TOLERANCE = 1e-4
CHECK_IMAGES = 8


def check_images(input_shape: tuple[int, int, int]) -> np.ndarray:
    """A fixed batch of noise images: the same on every start."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (CHECK_IMAGES, *input_shape), dtype=np.uint8)


def predict_all(predictor: Predictor, images: np.ndarray, chunk: int = 16) -> np.ndarray:
    parts = [predictor.predict(images[i : i + chunk]) for i in range(0, len(images), chunk)]
    return np.concatenate(parts)


def _labels(spec: ModelSpec, outputs: int) -> tuple[str, ...]:
    """The labels of a converted model, read without Keras (model._labels's rules)."""
    if spec.is_file and not spec.labels and outputs != 1000:
        raise ModelLoadError(
            f"model {spec.name!r}: a .keras model needs a labels file (--labels, or labels = "
            "in the models file): one class name per line, or a JSON list"
        )
    labels = labels_for(spec)
    if len(labels) != outputs:
        raise ModelLoadError(
            f"model {spec.name!r} gives {outputs} classes but has {len(labels)} labels"
        )
    return labels


def _open(
    spec: ModelSpec,
    engine: str,
    precision: str,
    entry: Entry,
    *,
    parallel_batches: int = 1,
    streams: int = 1,
) -> Predictor:
    meta = entry.meta
    height, width, channels = meta["input_shape"]
    mode = str(meta["preprocessing"])
    common: dict[str, Any] = {
        "labels": _labels(spec, int(meta["outputs"])),
        "input_shape": (int(height), int(width), int(channels)),
        "top_k": spec.top_k,
    }
    if engine == "onnx":
        from keras_server.engines import onnx_engine

        return onnx_engine.OnnxClassifier(
            session=onnx_engine.session(entry.file("model.onnx")),
            description=f"{meta['description']}, ONNX Runtime {onnx_engine.version()}",
            channels=int(meta["channels"]),
            preprocess=preprocessing(mode),
            **common,
        )
    from keras_server.engines import openvino_engine

    parallel_batches = parallel_batches_for(parallel_batches, "openvino")
    streams = openvino_engine.streams_for(streams, parallel_batches)
    compile_model = functools.partial(
        openvino_engine.compile_model, entry.file("model.xml"), precision, mode,
        int(meta["channels"]),
    )  # fmt: skip
    return openvino_engine.OpenVinoClassifier(
        compile_model(requests=parallel_batches, streams=streams),
        description=f"{meta['description']}, OpenVINO {openvino_engine.version()} {precision}"
        + (f", {streams} streams a batch" if streams > 1 else ""),
        precision=precision,
        requests=parallel_batches,
        streams=streams,
        # A lone image keeps every core (see openvino_engine's docstring).
        single=compile_model() if streams * parallel_batches > 1 else None,
        **common,
    )


def open_and_check(
    spec: ModelSpec,
    engine: str,
    precision: str,
    entry: Entry,
    *,
    min_agreement: float,
    parallel_batches: int = 1,
    streams: int = 1,
) -> Predictor:
    """Open the converted model and hold it to Keras's outputs on the reference set."""
    predictor = _open(
        spec, engine, precision, entry, parallel_batches=parallel_batches, streams=streams
    )
    with np.load(entry.file("reference.npz")) as reference:
        images, expected = reference["images"], reference["keras"]
    got = predict_all(predictor, images)
    # fp32 must match on every image; a lossy precision is judged on the
    # held-out images (after the noise batch) when there are any: noise has
    # no clear top-1 class to agree on.
    held_out = slice(CHECK_IMAGES, None) if len(images) > CHECK_IMAGES else slice(None)
    if precision == "fp32":
        measured = fidelity(expected, got)
    else:
        measured = fidelity(expected[held_out], got[held_out])
        if held_out.start is None:
            log.warning(
                "model %r: %s fidelity measured on %d noise images only; pass "
                "--calibration-dir to measure it on images like the traffic",
                spec.name,
                precision,
                len(images),
            )
    predictor.fidelity = measured  # type: ignore[misc]
    log.info(
        "model %r, %s %s against Keras fp32 on %d images: top-1 agreement %.1f%%, "
        "largest probability difference %.2g",
        spec.name,
        engine,
        precision,
        measured.images,
        100 * measured.agreement,
        measured.max_difference,
    )
    if precision == "fp32":
        if not measured.max_difference <= TOLERANCE:
            raise EngineError(
                f"--engine {engine}: the converted model differs from Keras by up to "
                f"{measured.max_difference:.2g} (allowed {TOLERANCE:g}); use --engine keras"
            )
    elif not measured.agreement >= min_agreement:
        raise EngineError(
            f"--precision {precision}: top-1 agreement with Keras fp32 is "
            f"{100 * measured.agreement:.1f}% on {measured.images} held-out images, below "
            f"--min-agreement {min_agreement:g}; use --precision fp32, or calibrate "
            "on images closer to the traffic (--calibration-dir)"
        )
    return predictor
