"""The Keras engine: a `keras.applications` network or a saved `.keras` file,
loaded once from its spec (catalog.ModelSpec), checked, and run on batches.

The only module that imports Keras (and so TensorFlow); the web tier never
loads it, and neither does an engine served from the conversion cache. The
other engines (`onnx_engine`, `openvino_engine`) convert the `Classifier`
built here; `choice.py` picks one. `load_classifier` never falls back
silently to random weights, and refuses
a model it cannot serve (not an image model, or not as many outputs as
labels) with a ModelLoadError saying why, before the server takes traffic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from keras_server.catalog import ModelSpec, labels_for
from keras_server.engines.predictor import TOP_K, Fidelity, ModelLoadError
from keras_server.engines.preprocess import Preprocess, batch_of, mode_of, preprocessing

log = logging.getLogger(__name__)


@dataclass
class Classifier:
    """A Keras classifier with its labels and its input preprocessing: the
    `predictor.Predictor` of the keras engine."""

    model: keras.Model
    labels: Sequence[str]
    description: str
    preprocess: Preprocess  # float32 RGB 0..255 batch -> what the model takes
    top_k: int = TOP_K
    engine: str = "keras"
    precision: str = "fp32"
    fidelity: Fidelity | None = None  # Keras is the reference

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The images the worker takes off the wire: RGB at the model's size."""
        _, height, width, _ = self.model.input_shape
        return (int(height), int(width), 3)

    @property
    def channels(self) -> int:
        """What the network itself takes: 1 (grey) or 3."""
        return int(self.model.input_shape[-1])

    @property
    def outputs(self) -> int:
        return int(self.model.output_shape[-1])

    def batch(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB images (n, h, w, 3) -> the float32 batch the model takes."""
        return batch_of(images, self.channels, self.preprocess)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (or scores), shape (n, classes)."""
        # predict_on_batch runs one compiled step (no per-call overhead of
        # predict(), no recompilation for each new batch size once warmed up).
        return np.asarray(self.model.predict_on_batch(self.batch(images)))


def load_classifier(spec: ModelSpec) -> Classifier:
    """Build, load and check the Keras model `spec` describes; the other
    engines are converted from it."""
    started = time.perf_counter()
    log.info("loading model %r from %s (weights=%s)", spec.name, spec.source, spec.weights)
    if spec.builtin:
        model, description = _builtin(spec)
    else:
        model = _load_keras_file(Path(spec.source), f"model {spec.name!r}")
        description = f"{spec.name} from {Path(spec.source).name}"
    labels = _labels(spec, model)
    _check(spec, model, labels)
    log.info("model %r loaded in %.1f s: %s", spec.name, time.perf_counter() - started, description)
    return Classifier(model, labels, description, preprocessing(mode_of(spec)), spec.top_k)


def _builtin(spec: ModelSpec) -> tuple[keras.Model, str]:
    assert spec.builtin is not None
    build = getattr(keras.applications, spec.builtin.constructor)
    pretty = spec.builtin.constructor
    if spec.weights == "imagenet":
        try:
            return build(weights="imagenet"), f"{pretty}, ImageNet weights"
        except Exception as exc:  # Keras raises a bare Exception for a failed download.
            raise ModelLoadError(
                f"could not get the ImageNet weights for {pretty} "
                f"({type(exc).__name__}: {exc}).\n"
                "Keras downloads them once into ~/.keras/models/. Without network access, "
                "either copy the weights file there, pass --weights PATH to a .weights.h5 "
                "or .keras file, or pass --weights none to serve random weights (for demos "
                "and tests only)."
            ) from None
    if spec.weights.lower() == "none":
        log.warning(
            "serving %s with RANDOM weights (--weights none): the pipeline works but the "
            "predictions are meaningless",
            pretty,
        )
        return build(weights=None), f"{pretty}, RANDOM weights"
    path = Path(spec.weights)
    if path.suffix == ".keras":
        return _load_keras_file(path, "--weights"), f"{pretty}, from {path.name}"
    _must_exist(path, "--weights")
    if path.suffix != ".h5":
        raise ModelLoadError(f"--weights {path}: expected a .weights.h5 or .keras file")
    model = build(weights=None)
    try:
        model.load_weights(path)
    except Exception as exc:
        raise ModelLoadError(
            f"--weights {path}: cannot load it ({type(exc).__name__}: {exc})"
        ) from None
    return model, f"{pretty}, weights from {path.name}"


def _must_exist(path: Path, what: str) -> None:
    if not path.is_file():
        raise ModelLoadError(
            f"{what} {path}: no such file. Pass 'imagenet', 'none', or the path of a "
            ".weights.h5 or .keras file."
        )


def _load_keras_file(path: Path, what: str) -> keras.Model:
    _must_exist(path, what)
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:
        raise ModelLoadError(
            f"{what} {path}: cannot load it ({type(exc).__name__}: {exc})"
        ) from None


def _labels(spec: ModelSpec, model: keras.Model) -> tuple[str, ...]:
    if spec.labels or not spec.is_file:
        return labels_for(spec)
    outputs = model.output_shape[-1] if len(model.output_shape) == 2 else None
    if outputs == 1000:
        log.info("model %r has 1000 outputs and no labels file: using ImageNet's", spec.name)
        return labels_for(spec)
    raise ModelLoadError(
        f"model {spec.name!r}: a .keras model needs a labels file (--labels, or labels = "
        "in the models file): one class name per line, or a JSON list"
    )


def _check(spec: ModelSpec, model: keras.Model, labels: Sequence[str]) -> None:
    """Refuse what we cannot serve, before taking traffic."""
    if len(model.inputs) != 1:
        raise ModelLoadError(f"model {spec.name!r} takes {len(model.inputs)} inputs, not one image")
    shape = tuple(model.input_shape)
    if (
        len(shape) != 4
        or not all(isinstance(n, int) and n > 0 for n in shape[1:3])
        or shape[3] not in (1, 3)
    ):
        raise ModelLoadError(
            f"model {spec.name!r} takes input {shape}: not an image batch "
            "(None, height, width, 1 or 3 channels) of a fixed size"
        )
    out = tuple(model.output_shape) if not isinstance(model.output_shape, list) else None
    if out is None or len(out) != 2:
        raise ModelLoadError(
            f"model {spec.name!r} gives {model.output_shape}: expected one vector of class "
            "scores per image"
        )
    if out[1] != len(labels):
        raise ModelLoadError(
            f"model {spec.name!r} gives {out[1]} classes but has {len(labels)} labels"
        )
    if shape[3] == 1 and spec.preprocessing in ("caffe", "torch"):
        raise ModelLoadError(
            f"model {spec.name!r}: {spec.preprocessing} preprocessing needs 3 channels"
        )
