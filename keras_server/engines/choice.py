"""Which engine runs a model, at which precision, and how it gets there.

`load_predictor(spec, options)` returns the `predictor.Predictor` that serves
`spec`:

- `keras`: the Keras model itself (`keras_engine.py`);
- `onnx`: exported to ONNX, run by ONNX Runtime (`onnx_engine.py`);
- `openvino`: converted to OpenVINO IR and compiled for the CPU at fp32,
  bf16 or int8 (`openvino_engine.py`, int8 calibrated by `calibration.py`);
- `auto` (the default): OpenVINO fp32 on a CPU; keras when TensorFlow sees a
  GPU or OpenVINO cannot convert, compile or match Keras here (the reason is
  logged). A lossy precision is never picked automatically: bf16 and int8 are
  served only when asked for, and then only by OpenVINO.

A converted engine comes from the conversion cache (`conversion_cache.py`,
`--cache-dir`) when it holds one, else it is converted now in a child process
(`conversion.py`); either way it is opened and held to Keras's outputs on the
entry's reference set before it serves (`opening.py`). A cache hit therefore
needs neither Keras nor TensorFlow. `--weights none` (new random weights at
every start) is converted every time and never cached.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from keras_server.catalog import ModelSpec
from keras_server.engines import calibration
from keras_server.engines.conversion import convert_apart, key_inputs
from keras_server.engines.conversion_cache import ConversionCache, CorruptEntry, Entry, key_of
from keras_server.engines.opening import open_and_check
from keras_server.engines.predictor import EngineError, Predictor

log = logging.getLogger(__name__)

# Device files through which TensorFlow could see a GPU (NVIDIA, ROCm, WSL):
# without any, asking TensorFlow (seconds to import) is skipped.
GPU_DEVICES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


@dataclass(frozen=True)
class EngineOptions:
    cache_dir: str  # "none": no cache
    min_agreement: float  # bf16 / int8: least top-1 agreement with Keras fp32
    max_image_pixels: int  # calibration images are decoded like uploads
    # openvino: infer requests compiled (--parallel-batches; 0: what
    # predictor.parallel_batches_for picks); above 1 with the THROUGHPUT hint,
    # so that that many batches run at once
    parallel_batches: int = 1
    # openvino: infer requests (a CPU stream each) each batch is split over
    # (--openvino-streams)
    openvino_streams: int = 1


def load_predictor(spec: ModelSpec, options: EngineOptions) -> Predictor:
    """The predictor serving `spec` with its engine and precision (see above)."""
    started = time.perf_counter()
    engine, precision = spec.engine or "auto", spec.precision or "fp32"
    files = None
    if precision == "int8" or spec.calibration_dir:
        files = calibration.files_of(spec.calibration_dir)
    if engine == "auto":
        predictor = _auto(spec, precision, options, files)
    elif engine == "keras":
        predictor = _keras(spec)
    else:
        predictor = _converted(spec, engine, precision, options, files)
    log.info(
        "model %r served by %s %s (%s), loaded in %.1f s",
        spec.name,
        predictor.engine,
        predictor.precision,
        predictor.description,
        time.perf_counter() - started,
    )
    return predictor


def _auto(
    spec: ModelSpec, precision: str, options: EngineOptions, files: list[Path] | None
) -> Predictor:
    if precision != "fp32":
        # Asked for by name: only OpenVINO runs it, and no fallback changes it.
        return _converted(spec, "openvino", precision, options, files)
    if gpu_visible():
        log.info("--engine auto: keras for model %r (TensorFlow sees a GPU)", spec.name)
        return _keras(spec)
    try:
        return _converted(spec, "openvino", precision, options, files)
    except EngineError as exc:
        log.warning(
            "--engine auto: OpenVINO cannot serve model %r (%s); falling back to keras",
            spec.name,
            exc,
        )
        return _keras(spec)


def gpu_visible() -> bool:
    """Whether TensorFlow sees a GPU (asked only when a GPU device file exists)."""
    if not any(Path(device).exists() for device in GPU_DEVICES):
        return False
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _keras(spec: ModelSpec) -> Predictor:
    from keras_server.engines.keras_engine import load_classifier

    return load_classifier(spec)


def _engine_version(engine: str) -> str:
    try:
        if engine == "openvino":
            from keras_server.engines import openvino_engine

            return openvino_engine.version()
        from keras_server.engines import onnx_engine

        return onnx_engine.version()
    except ImportError as exc:
        raise EngineError(f"--engine {engine}: not installed ({exc})") from None


def _converted(
    spec: ModelSpec, engine: str, precision: str, options: EngineOptions, files: list[Path] | None
) -> Predictor:
    """An onnx or openvino predictor: from the cache, or converted now."""
    version = _engine_version(engine)
    if engine == "openvino":
        from keras_server.engines import openvino_engine

        openvino_engine.check_supported(precision)

    # Each takes the directory (the entry) to convert into (to open).
    convert = functools.partial(
        convert_apart, spec, engine, precision, max_image_pixels=options.max_image_pixels,
        files=files,
    )  # fmt: skip
    opened = functools.partial(
        open_and_check, spec, engine, precision, min_agreement=options.min_agreement,
        parallel_batches=options.parallel_batches, streams=options.openvino_streams,
    )  # fmt: skip

    inputs = key_inputs(spec, engine, version, precision, files)
    cache = None if options.cache_dir.lower() == "none" else Path(options.cache_dir).expanduser()
    if inputs is not None and cache is not None:
        key = key_of(inputs)
        store = ConversionCache(cache)
        entry = store.get(key)
        if entry is not None:
            log.info("model %r: conversion cache hit (%s)", spec.name, entry.path)
            return opened(entry)
        log.info("model %r: conversion cache miss, converting into %s", spec.name, cache)
        try:
            entry = store.build(key, inputs, convert)
        except (OSError, CorruptEntry) as exc:
            log.warning("conversion cache %s unusable (%s): converting without it", cache, exc)
        else:
            return opened(entry)
    elif inputs is None:
        log.info(
            "model %r: not cached (--weights none draws new random weights at every start)",
            spec.name,
        )
    with tempfile.TemporaryDirectory(prefix="keras-server-convert-") as tmp:
        meta = convert(Path(tmp))
        # Both runtimes have read the files once this returns.
        return opened(Entry(Path(tmp), meta))
