"""int8 calibration: the user's own images, decoded exactly like uploads.

`--calibration-dir DIR` holds images like those the service will see. They
are decoded with `images.load_image`, the web tier's own decoder, at the
model's input size; every fifth is held out to measure the int8 model's
fidelity against Keras, the rest calibrate it. Quantization is ONNX Runtime's
`quantize_static` (QDQ, per-channel, signed 8-bit weights and activations,
min-max calibration), whose output OpenVINO runs as int8. Imported only when
a model is converted (never by the web tier).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from keras_server.engines.predictor import ModelLoadError
from keras_server.images import ImageError, load_image

log = logging.getLogger(__name__)

MAX_FILES = 500  # the first files, by name, are used
HELD_OUT_EVERY = 5
MAX_HELD_OUT = 100
CALIBRATION_BATCH = 8


def files_of(directory: str | None) -> list[Path]:
    """The files of `directory` (by name, at most MAX_FILES), or why there are none."""
    if not directory:
        raise ModelLoadError(
            "--precision int8 needs --calibration-dir DIR: a directory of images like the "
            "ones the service will see (a few hundred is plenty)"
        )
    path = Path(directory)
    if not path.is_dir():
        raise ModelLoadError(f"--calibration-dir {path}: no such directory")
    try:
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as exc:
        raise ModelLoadError(f"--calibration-dir {path}: cannot list it ({exc})") from None
    if not files:
        raise ModelLoadError(f"--calibration-dir {path}: the directory holds no files")
    return files[:MAX_FILES]


def digest(files: list[Path]) -> str:
    """A hash of the files' names and contents: part of the cache key."""
    h = hashlib.sha256()
    for file in files:
        h.update(file.name.encode() + b"\0")
        try:
            with file.open("rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        except OSError as exc:
            raise unreadable(file, exc) from None
    return h.hexdigest()


def unreadable(file: Path, exc: OSError) -> ModelLoadError:
    """A file that cannot be read stops the start (calibrating on the others
    would hide it), wherever it is read."""
    return ModelLoadError(
        f"--calibration-dir {file.parent}: cannot read {file.name} "
        f"({exc.strerror or exc}); remove it or make it readable"
    )


def load(files: list[Path], size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """The readable images among `files` as uint8 RGB (n, height, width, 3)."""
    images, skipped = [], []
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise unreadable(file, exc) from None
        try:
            images.append(load_image(data, size, max_pixels))
        except ImageError as exc:
            skipped.append(f"{file.name} ({exc})")
    if skipped:
        log.warning(
            "--calibration-dir: %d files skipped, not readable images: %s",
            len(skipped),
            "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
        )
    directory = files[0].parent
    if not images:
        raise ModelLoadError(
            f"--calibration-dir {directory}: none of its {len(files)} files is a readable image"
        )
    if len(images) < 2:
        raise ModelLoadError(
            f"--calibration-dir {directory}: only one readable image; at least two are needed "
            "(one to calibrate, one held out)"
        )
    return np.stack(images)


def split(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(calibration images, held-out images): every fifth image is held out."""
    held = np.zeros(len(images), dtype=bool)
    held[::HELD_OUT_EVERY] = True
    held_out = images[held][:MAX_HELD_OUT]
    return images[~held], held_out


def quantize(source: Path, target: Path, batches: list[np.ndarray], input_name: str) -> None:
    """Write `source` (an fp32 ONNX model) to `target` quantized to int8 QDQ,
    calibrated on `batches` (already preprocessed, as the model takes them)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds: Iterator[dict[str, np.ndarray]] = iter({input_name: b} for b in batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    try:
        quantize_static(
            str(source),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    except Exception as exc:
        raise ModelLoadError(
            f"int8 quantization failed ({type(exc).__name__}: {exc}); use --precision fp32"
        ) from None
