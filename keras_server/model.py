"""The model: ResNet50 from keras.applications, loaded once, run on batches.

This is the only module that imports Keras (and so TensorFlow); the web tier
never loads it. `load_classifier` never falls back silently to random
weights: what it cannot load, it refuses with a ModelLoadError saying why and
what to pass instead. With `engine="onnx"` it hands the loaded model to
`onnx_engine` (imported only from here), which runs it in ONNX Runtime.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np
from keras.applications import resnet50

from .protocol import INPUT_SIZE
from .worker import ModelLoadError

if TYPE_CHECKING:
    from .onnx_engine import OnnxClassifier

log = logging.getLogger(__name__)

NUM_CLASSES = 1000


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, as Keras's decode_predictions names them.

    Shipped with the package (from Keras's own class index) because Keras
    downloads its copy at run time, which fails offline.
    """
    text = resources.files(__package__).joinpath("imagenet_class_index.json").read_text()
    index = json.loads(text)
    return [index[str(i)][1] for i in range(len(index))]


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 RGB images (n, h, w, 3) -> the float32 batch ResNet50 takes.

    Shared by both engines, so they differ only in what runs the forward pass.
    """
    return resnet50.preprocess_input(images.astype("float32"))


@dataclass
class Classifier:
    """A Keras classifier with its labels and its input preprocessing."""

    model: keras.Model
    labels: list[str]
    description: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (INPUT_SIZE[1], INPUT_SIZE[0], 3)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, classes), for uint8 RGB images (n, h, w, 3)."""
        batch = preprocess(images)
        # predict_on_batch runs one compiled step (no per-call overhead of
        # predict(), no recompilation for each new batch size once warmed up).
        return np.asarray(self.model.predict_on_batch(batch))

    def warm_up(self, batch_size: int) -> None:
        """Compile before the first request: batch 1 and the full batch traced
        once make the compiled step accept every size in between."""
        for n in sorted({1, batch_size}):
            self.predict(np.zeros((n, *self.input_shape), dtype=np.uint8))


def load_classifier(weights: str, engine: str = "keras") -> Classifier | OnnxClassifier:
    """ResNet50 with `weights`: 'imagenet', 'none', or a .weights.h5/.keras path,
    run by `engine`: 'keras', or 'onnx' (the same model exported to ONNX Runtime)."""
    classifier = _load_keras(weights)
    if engine == "onnx":
        from .onnx_engine import from_keras

        return from_keras(classifier)
    if engine != "keras":
        raise ModelLoadError(f"--engine {engine}: expected keras or onnx")
    return classifier


def _load_keras(weights: str) -> Classifier:
    """The Keras model itself; the ONNX engine is built from it."""
    started = time.perf_counter()
    log.info("loading ResNet50 (weights=%s)", weights)
    if weights == "imagenet":
        model = _imagenet_resnet50()
        description = "ResNet50, ImageNet weights"
    elif weights.lower() == "none":
        model = resnet50.ResNet50(weights=None)
        description = "ResNet50, RANDOM weights"
        log.warning(
            "serving ResNet50 with RANDOM weights (--weights none): the pipeline "
            "works but the predictions are meaningless"
        )
    else:
        model = _load_file(Path(weights))
        description = f"ResNet50, weights from {weights}"
    _check(model, weights)
    log.info("model loaded in %.1f s: %s", time.perf_counter() - started, description)
    return Classifier(model=model, labels=imagenet_labels(), description=description)


def _imagenet_resnet50() -> keras.Model:
    try:
        return resnet50.ResNet50(weights="imagenet")
    except Exception as exc:  # Keras raises a bare Exception for a failed download.
        raise ModelLoadError(
            "could not get the ImageNet weights for ResNet50 "
            f"({type(exc).__name__}: {exc}).\n"
            "Keras downloads them once (about 100 MB) into ~/.keras/models/. Without "
            "network access, either copy resnet50_weights_tf_dim_ordering_tf_kernels.h5 "
            "there, pass --weights PATH to a .weights.h5 or .keras file, or pass "
            "--weights none to serve random weights (for demos and tests only)."
        ) from None


def _load_file(path: Path) -> keras.Model:
    if not path.is_file():
        raise ModelLoadError(
            f"--weights {path}: no such file. Pass 'imagenet', 'none', or the path "
            "of a .weights.h5 or .keras file."
        )
    try:
        if path.suffix == ".keras":
            return keras.saving.load_model(path, compile=False)
        if path.suffix == ".h5":
            model = resnet50.ResNet50(weights=None)
            model.load_weights(path)
            return model
    except Exception as exc:
        raise ModelLoadError(
            f"--weights {path}: cannot load it ({type(exc).__name__}: {exc})"
        ) from None
    raise ModelLoadError(f"--weights {path}: expected a .weights.h5 or .keras file")


def _check(model: keras.Model, weights: str) -> None:
    expected_in = (None, INPUT_SIZE[1], INPUT_SIZE[0], 3)
    if tuple(model.input_shape) != expected_in or tuple(model.output_shape) != (
        None,
        NUM_CLASSES,
    ):
        raise ModelLoadError(
            f"--weights {weights}: the model takes {model.input_shape} and gives "
            f"{model.output_shape}; this server needs {expected_in} -> (None, {NUM_CLASSES})"
        )
