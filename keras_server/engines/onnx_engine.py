"""`--engine onnx`: the loaded Keras model, exported to ONNX and run by ONNX Runtime.

`export` writes the ONNX file from the Keras model already in memory
(whatever `--weights` loaded), so there is no second file to keep in step
with the weights; `conversion.py` exports it (and converts the same file for
OpenVINO) and `opening.py` checks the engine's outputs against Keras's before
it serves. Imported only by those and `choice.py`, so neither the web tier
nor `--engine keras` loads onnxruntime.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from keras_server.engines.predictor import EngineError, Fidelity
from keras_server.engines.preprocess import Preprocess, batch_of

if TYPE_CHECKING:
    from keras_server.engines.keras_engine import Classifier

log = logging.getLogger(__name__)


@dataclass
class OnnxClassifier:
    """The `predictor.Predictor` of the onnx engine."""

    session: ort.InferenceSession
    labels: Sequence[str]
    description: str
    input_shape: tuple[int, int, int]
    channels: int
    # The same numpy preprocessing as the Keras engine: the engines differ
    # only in what runs the forward pass.
    preprocess: Preprocess
    top_k: int
    engine: str = "onnx"
    precision: str = "fp32"
    fidelity: Fidelity | None = None

    @property
    def input_name(self) -> str:
        return str(self.session.get_inputs()[0].name)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, classes), for uint8 RGB images (n, h, w, 3)."""
        batch = batch_of(images, self.channels, self.preprocess)
        return np.asarray(self.session.run(None, {self.input_name: batch})[0])


def export(classifier: Classifier, path: Path) -> None:
    """Write `classifier`'s Keras model to `path` as ONNX (tf2onnx, dynamic batch).

    Keras exports only a model that has been called: the caller has run it
    (its reference outputs are what the engines are checked against)."""
    # tf2onnx logs its internals at INFO on every export: not the operator's concern.
    logging.getLogger("tf2onnx").setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            # tf2onnx's own deprecation noise, once per conversion.
            warnings.simplefilter("ignore")
            classifier.model.export(str(path), format="onnx", verbose=False)
    except Exception as exc:
        raise EngineError(
            f"exporting the model to ONNX failed ({type(exc).__name__}: {exc}); use --engine keras"
        ) from None


def session(path: Path) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(
            str(path), sess_options=ort.SessionOptions(), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise EngineError(
            f"ONNX Runtime cannot load {path} ({type(exc).__name__}: {exc}); use --engine keras"
        ) from None


def version() -> str:
    return str(ort.__version__)
