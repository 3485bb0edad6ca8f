"""The Keras engine: a `keras.applications` network or a saved `.keras` file,
loaded once from its spec (catalog.ModelSpec), checked, and run on batches.

The only module that imports Keras (and so TensorFlow); the web tier never
loads it, and neither does an engine served from the conversion cache. The
other engines (`onnx_engine`, `openvino_engine`) convert the `Classifier`
built here; `choice.py` picks one. `load_classifier` never falls back
silently to random weights, and refuses
a model it cannot serve (not an image model, or not as many outputs as
labels) with a ModelLoadError saying why, before the server takes traffic.

Grad-CAM (`Classifier.gradcam`, asked for by a request's `"explain":
"gradcam"`, broker/messages.py) is computed here, with TensorFlow's
GradientTape: the gradient of the class's log-probability with respect to a
convolutional layer's output, averaged over the image per channel, weighs
that layer's channels; their weighted sum, clipped at 0 and divided by its
largest value, is the heat map, one cell per position of the layer's output.
The layer is the models file's `gradcam_layer`, or else the last one whose
output is 4-D (batch, rows, columns, channels), checked at load.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

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
    gradcam_layer: str = ""  # the layer Grad-CAM explains from ("": found at load)
    _gradcam_model: keras.Model | None = field(default=None, init=False, repr=False)

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

    def gradcam(self, image: np.ndarray, index: int) -> np.ndarray:
        """The Grad-CAM heat map of class `index` for one uint8 RGB image
        (h, w, 3): float32 (rows, columns) in [0, 1], the layer's grid."""
        if self._gradcam_model is None:
            layer = self.model.get_layer(self.gradcam_layer or last_spatial_layer(self.model))
            self._gradcam_model = keras.Model(self.model.inputs, [layer.output, self.model.output])
        batch = tf.convert_to_tensor(self.batch(image[np.newaxis]))
        with tf.GradientTape() as tape:
            features, probabilities = self._gradcam_model(batch, training=False)
            # The log keeps the gradient alive where the softmax saturates.
            score = tf.math.log(probabilities[:, index] + 1e-12)
        gradients = tape.gradient(score, features)
        weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))[0].numpy()
        top = float(cam.max())
        return (cam / top if top > 0 else np.zeros_like(cam)).astype(np.float32)


def last_spatial_layer(model: keras.Model) -> str:
    """The name of the last layer whose output is 4-D (batch, rows, columns,
    channels): the last convolutional stage, where Grad-CAM looks."""
    for layer in reversed(model.layers):
        shape = getattr(layer, "output", None) is not None and layer.output.shape
        if shape and len(shape) == 4:
            return layer.name
    raise ModelLoadError("the model has no layer with a 4-D output for Grad-CAM")


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
    layer = _gradcam_layer(spec, model)
    log.info("model %r loaded in %.1f s: %s", spec.name, time.perf_counter() - started, description)
    return Classifier(
        model, labels, description, preprocessing(mode_of(spec)), spec.top_k, gradcam_layer=layer
    )


def _gradcam_layer(spec: ModelSpec, model: keras.Model) -> str:
    """The layer Grad-CAM explains from: the one the models file names,
    checked, else the last 4-D one ("" when there is none: Grad-CAM then
    fails alone, the model still serves)."""
    if spec.gradcam_layer is None:
        try:
            return last_spatial_layer(model)
        except ModelLoadError:
            log.warning("model %r: no layer with a 4-D output, so no Grad-CAM", spec.name)
            return ""
    try:
        shape = model.get_layer(spec.gradcam_layer).output.shape
    except (ValueError, AttributeError) as exc:
        raise ModelLoadError(
            f"model {spec.name!r}: gradcam_layer {spec.gradcam_layer!r}: {exc}"
        ) from None
    if len(shape) != 4:
        raise ModelLoadError(
            f"model {spec.name!r}: gradcam_layer {spec.gradcam_layer!r} gives {tuple(shape)}, "
            "not a 4-D (batch, rows, columns, channels) output"
        )
    return spec.gradcam_layer


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
