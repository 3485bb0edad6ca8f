"""Converting a Keras model for onnx or openvino, in a child process.

A conversion runs in a child process (multiprocessing's 'spawn' context: a
fresh interpreter, nothing inherited): the child loads Keras, computes the
reference outputs (`opening.check_images`, plus the held-out images of
`--calibration-dir`), exports and converts, writes the entry's files and
exits, handing back TensorFlow, the Keras model, the ONNX export and the
converter's memory (GBs for ResNet50) to the system. The serving process then
opens the entry and runs the fidelity check exactly as a warm start does
(`opening.py`), so a cold start serves with the memory of a warm one. The
child's log records are relayed through this process's loggers; an error it
raises comes back as the same ModelLoadError or EngineError (so `--engine
auto` still falls back to keras on an EngineError), and a child that dies is
an EngineError naming its exit status.

`key_inputs` names what a converted model depends on: its conversion cache
key (`conversion_cache.py`), or None for `--weights none`, whose random
weights are drawn anew at every start and never cached.
"""

from __future__ import annotations

import importlib.metadata
import logging
import logging.handlers
import multiprocessing
import signal
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_server.catalog import ModelSpec
from keras_server.engines import calibration
from keras_server.engines.conversion_cache import file_sha256
from keras_server.engines.opening import CHECK_IMAGES, check_images, predict_all
from keras_server.engines.predictor import EngineError, ModelLoadError
from keras_server.engines.preprocess import mode_of

if TYPE_CHECKING:
    from keras_server.engines.keras_engine import Classifier

log = logging.getLogger(__name__)

# The packages whose versions shape a converted model: part of the cache key.
TOOLS = ("keras", "tensorflow", "tf2onnx", "onnx", "onnxruntime")


def key_inputs(
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


def convert_apart(
    spec: ModelSpec,
    engine: str,
    precision: str,
    directory: Path,
    *,
    max_image_pixels: int,
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
            "max_image_pixels": max_image_pixels,
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
    max_image_pixels: int,
    files: list[Path] | None,
) -> None:
    """The child's side of `convert_apart`: sends ("meta", meta), ("refused",
    the ModelLoadError) or ("failed", the unexpected exception as text)."""
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    root.setLevel(levels[0])
    logging.getLogger("keras_server").setLevel(levels[1])
    try:
        meta = _convert(
            spec, engine, precision, Path(directory), max_image_pixels=max_image_pixels, files=files
        )
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
    max_image_pixels: int,
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
        loaded = calibration.load(files, (width, height), max_image_pixels)
        calibrating, held_out = calibration.split(loaded)
        images = np.concatenate([images, held_out])
        log.info(
            "--calibration-dir: %d images hold out for the fidelity check, %d calibrate",
            len(held_out),
            len(calibrating),
        )
    # Also the call Keras needs before it exports a model.
    reference = predict_all(classifier, images)
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
