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

Converted engines come from the conversion cache (`conversion_cache.py`,
`--cache-dir`). Each entry holds the converted model and a reference set: a
fixed batch of noise images plus, with `--calibration-dir`, the held-out
images, with Keras fp32's probabilities for each. Every start runs the engine
on the reference set and compares (`predictor.fidelity`): fp32 must match
within `TOLERANCE` on every image, bf16 and int8 must agree on the top-1
class of at least `--min-agreement` of the held-out images (of the noise
batch when there are none). A cache hit therefore needs neither Keras nor
TensorFlow: only the converted model, the labels and the preprocessing steps.

A conversion runs in a child process (multiprocessing's 'spawn' context: a
fresh interpreter, nothing inherited): the child loads Keras, computes the
reference outputs, exports and converts, writes the entry's files and exits,
handing back TensorFlow, the Keras model, the ONNX export and the converter's
memory (GBs for ResNet50) to the system. The serving process then opens the
entry and runs the fidelity check exactly as a warm start does, so a cold
start serves with the memory of a warm one. The child's log records are
relayed through this process's loggers; an error it raises comes back as the
same ModelLoadError or EngineError (so `--engine auto` still falls back to
keras on an EngineError), and a child that dies is an EngineError naming its
exit status. `--weights none` (new random weights at every start) is
converted every time and never cached: the child writes a temporary entry,
and the parent serves the random weights the child drew and checks them
against the reference outputs the child's Keras gave for those weights.
"""

from __future__ import annotations

import importlib.metadata
import logging
import logging.handlers
import multiprocessing
import signal
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_server.catalog import ModelSpec, labels_for
from keras_server.engines import calibration
from keras_server.engines.conversion_cache import (
    ConversionCache,
    CorruptEntry,
    Entry,
    file_sha256,
    key_of,
)
from keras_server.engines.predictor import EngineError, ModelLoadError, Predictor, fidelity
from keras_server.engines.preprocess import mode_of, preprocessing

if TYPE_CHECKING:
    from keras_server.engines.keras_engine import Classifier

log = logging.getLogger(__name__)

# Largest |engine - keras| allowed on any class probability at fp32.
TOLERANCE = 1e-4
CHECK_IMAGES = 8
# Device files through which TensorFlow could see a GPU (NVIDIA, ROCm, WSL):
# without any, asking TensorFlow (seconds to import) is skipped.
GPU_DEVICES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")
# The packages whose versions shape a converted model: part of the cache key.
TOOLS = ("keras", "tensorflow", "tf2onnx", "onnx", "onnxruntime")


@dataclass(frozen=True)
class EngineOptions:
    cache_dir: str  # "none": no cache
    min_agreement: float  # bf16 / int8: least top-1 agreement with Keras fp32
    max_image_pixels: int  # calibration images are decoded like uploads
    # openvino: infer requests compiled (--parallel-batches); above 1 with the
    # THROUGHPUT hint, so that that many batches run at once
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
    spec: ModelSpec,
    engine: str,
    precision: str,
    options: EngineOptions,
    files: list[Path] | None,
) -> Predictor:
    """An onnx or openvino predictor: from the cache, or converted now."""
    version = _engine_version(engine)
    if engine == "openvino":
        from keras_server.engines import openvino_engine

        openvino_engine.check_supported(precision)
    inputs = _key_inputs(spec, engine, version, precision, files)
    cache = None if options.cache_dir.lower() == "none" else Path(options.cache_dir).expanduser()
    if inputs is not None and cache is not None:
        key = key_of(inputs)
        store = ConversionCache(cache)
        entry = store.get(key)
        if entry is not None:
            log.info("model %r: conversion cache hit (%s)", spec.name, entry.path)
            return _open_and_check(spec, engine, precision, entry, options)
        log.info("model %r: conversion cache miss, converting into %s", spec.name, cache)
        try:
            entry = store.build(
                key,
                inputs,
                lambda d: convert_apart(spec, engine, precision, d, options=options, files=files),
            )
        except (OSError, CorruptEntry) as exc:
            log.warning("conversion cache %s unusable (%s): converting without it", cache, exc)
        else:
            return _open_and_check(spec, engine, precision, entry, options)
    elif inputs is None:
        log.info(
            "model %r: not cached (--weights none draws new random weights at every start)",
            spec.name,
        )
    with tempfile.TemporaryDirectory(prefix="keras-server-convert-") as tmp:
        meta = convert_apart(spec, engine, precision, Path(tmp), options=options, files=files)
        # Both runtimes have read the files once this returns.
        return _open_and_check(spec, engine, precision, Entry(Path(tmp), meta), options)


def _key_inputs(
    spec: ModelSpec, engine: str, version: str, precision: str, files: list[Path] | None
) -> dict[str, Any] | None:
    """What a converted model depends on, or None when it must not be cached."""
    if spec.builtin is not None:
        model: dict[str, Any] = {"builtin": spec.builtin.constructor, "size": spec.builtin.size}
        weights = spec.weights
        if weights.lower() == "none":
            return None
        if weights == "imagenet":
            # Keras's published ImageNet files: fixed for a Keras version.
            weights_id = f"imagenet (keras {_package_version('keras')})"
        elif Path(weights).is_file():
            weights_id = file_sha256(Path(weights))
        else:
            return None  # loading it will fail with the reason
    elif Path(spec.source).is_file():
        model, weights_id = {"file": file_sha256(Path(spec.source))}, "in the file"
    else:
        return None
    return {
        "engine": engine,
        "engine_version": version,
        "precision": precision,
        "model": model,
        "weights": weights_id,
        "preprocessing": mode_of(spec),
        "calibration": calibration.digest(files) if files else None,
        "check_images": CHECK_IMAGES,
        "tools": {name: _package_version(name) for name in TOOLS},
    }


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def check_images(input_shape: tuple[int, int, int]) -> np.ndarray:
    """A fixed batch of noise images: the same on every start."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (CHECK_IMAGES, *input_shape), dtype=np.uint8)


def _predict_all(predictor: Predictor, images: np.ndarray, chunk: int = 16) -> np.ndarray:
    parts = [predictor.predict(images[i : i + chunk]) for i in range(0, len(images), chunk)]
    return np.concatenate(parts)


def convert_apart(
    spec: ModelSpec,
    engine: str,
    precision: str,
    directory: Path,
    *,
    options: EngineOptions,
    files: list[Path] | None,
) -> dict[str, Any]:
    """`_convert` run in a child process; returns the entry's meta, or raises
    the child's ModelLoadError (EngineError) in this process."""
    context = multiprocessing.get_context("spawn")
    records = context.Queue()
    receive, send = context.Pipe(duplex=False)
    levels = (logging.getLogger().getEffectiveLevel(), log.getEffectiveLevel())
    child = context.Process(
        target=_convert_in_child,
        kwargs={
            "send": send,
            "records": records,
            "levels": levels,
            "spec": spec,
            "engine": engine,
            "precision": precision,
            "directory": str(directory),
            "options": options,
            "files": files,
        },
        name=f"convert-{spec.name}",
        # Ends with this process (a stopped server leaves no converter behind).
        daemon=True,
    )
    relay = logging.handlers.QueueListener(records, _Relay())
    relay.start()
    try:
        child.start()
        send.close()  # the child holds the only writer: EOF when it dies
        try:
            outcome = receive.recv()
        except EOFError:
            outcome = None
        child.join()
    finally:
        relay.stop()  # after the child's join: its last records are relayed first
        receive.close()
        records.close()
    if outcome is None:
        raise EngineError(f"the conversion of model {spec.name!r} {_death(child.exitcode)}")
    kind, value = outcome
    if kind == "meta":
        return dict(value)
    if kind == "refused":
        raise value  # the child's ModelLoadError or EngineError, as raised there
    raise EngineError(f"converting model {spec.name!r} failed in its child process: {value}")


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        why = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"process was killed by {name}{why}; use --engine keras"
    return f"process exited with status {exitcode} without a result; use --engine keras"


class _Relay(logging.Handler):
    """Hands a child's log record to this process's logger of the same name."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


def _convert_in_child(
    *,
    send: Connection,
    records: Any,
    levels: tuple[int, int],
    spec: ModelSpec,
    engine: str,
    precision: str,
    directory: str,
    options: EngineOptions,
    files: list[Path] | None,
) -> None:
    """The child's side of `convert_apart`: sends ("meta", meta), ("refused",
    the ModelLoadError) or ("failed", the unexpected exception as text)."""
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    root.setLevel(levels[0])
    logging.getLogger("keras_server").setLevel(levels[1])
    try:
        meta = _convert(spec, engine, precision, Path(directory), options=options, files=files)
        send.send(("meta", meta))
    except ModelLoadError as exc:
        send.send(("refused", exc))
    except Exception as exc:
        log.error("conversion failed:\n%s", traceback.format_exc().rstrip())
        send.send(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        send.close()
        records.close()
        records.join_thread()  # every record is in the pipe before the child exits


def _convert(
    spec: ModelSpec,
    engine: str,
    precision: str,
    directory: Path,
    *,
    options: EngineOptions,
    files: list[Path] | None,
) -> dict[str, Any]:
    """Load the Keras model, convert it into `directory`; returns the entry's meta."""
    from keras_server.engines import onnx_engine
    from keras_server.engines.keras_engine import load_classifier

    started = time.perf_counter()
    classifier = load_classifier(spec)
    height, width, _ = classifier.input_shape
    images = check_images(classifier.input_shape)
    calibrating = np.empty((0, *classifier.input_shape), dtype=np.uint8)
    if files:
        loaded = calibration.load(files, (width, height), options.max_image_pixels)
        calibrating, held_out = calibration.split(loaded)
        images = np.concatenate([images, held_out])
        log.info(
            "--calibration-dir: %d images hold out for the fidelity check, %d calibrate",
            len(held_out),
            len(calibrating),
        )
    # Also the call Keras needs before it exports a model.
    reference = _predict_all(classifier, images)
    np.savez(directory / "reference.npz", images=images, keras=reference.astype(np.float32))
    onnx_path = directory / "model.onnx"
    onnx_engine.export(classifier, onnx_path)
    if engine == "openvino":
        from keras_server.engines import openvino_engine

        source = onnx_path
        if precision == "int8":
            source = directory / "model.int8.onnx"
            _quantize(classifier, onnx_path, source, calibrating)
        openvino_engine.convert(source, directory / "model.xml")
        for leftover in directory.glob("*.onnx"):
            leftover.unlink()
    log.info(
        "model %r converted for %s %s in %.1f s",
        spec.name,
        engine,
        precision,
        time.perf_counter() - started,
    )
    return {
        "input_shape": list(classifier.input_shape),
        "channels": classifier.channels,
        "outputs": classifier.outputs,
        "description": classifier.description,
        "preprocessing": mode_of(spec),
    }


def _quantize(classifier: Classifier, source: Path, target: Path, images: np.ndarray) -> None:
    from keras_server.engines import onnx_engine

    input_name = onnx_engine.session(source).get_inputs()[0].name
    step = calibration.CALIBRATION_BATCH
    batches = [classifier.batch(images[i : i + step]) for i in range(0, len(images), step)]
    calibration.quantize(source, target, batches, input_name)


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

    return openvino_engine.OpenVinoClassifier(
        openvino_engine.compile_model(
            entry.file("model.xml"),
            precision,
            mode,
            int(meta["channels"]),
            requests=parallel_batches,
            streams=streams,
        ),
        description=f"{meta['description']}, OpenVINO {openvino_engine.version()} {precision}"
        + (f", {streams} streams a batch" if streams > 1 else ""),
        precision=precision,
        requests=parallel_batches,
        streams=streams,
        **common,
    )


def _open_and_check(
    spec: ModelSpec, engine: str, precision: str, entry: Entry, options: EngineOptions
) -> Predictor:
    """Open the converted model and hold it to Keras's outputs on the reference set."""
    predictor = _open(
        spec, engine, precision, entry,
        parallel_batches=options.parallel_batches, streams=options.openvino_streams,
    )  # fmt: skip
    with np.load(entry.file("reference.npz")) as reference:
        images, expected = reference["images"], reference["keras"]
    got = _predict_all(predictor, images)
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
    elif not measured.agreement >= options.min_agreement:
        raise EngineError(
            f"--precision {precision}: top-1 agreement with Keras fp32 is "
            f"{100 * measured.agreement:.1f}% on {measured.images} held-out images, below "
            f"--min-agreement {options.min_agreement:g}; use --precision fp32, or calibrate "
            "on images closer to the traffic (--calibration-dir)"
        )
    return predictor
