"""`--engine onnx`: the loaded Keras model, exported to ONNX and run by ONNX Runtime.

Imported only by `model.py`, so neither the web tier nor `--engine keras`
loads onnxruntime. The export happens at start-up from the model already in
memory (whatever `--weights` loaded), so there is no second file to keep in
step with the weights. Before it serves, the engine must give Keras's own
outputs on a test batch within `TOLERANCE`; if it does not, or the export
fails, loading stops with a ModelLoadError rather than serving different
predictions.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .model import Classifier
from .worker import ModelLoadError

log = logging.getLogger(__name__)

# Largest |onnx - keras| allowed on any class probability of the test batch.
TOLERANCE = 1e-4
CHECK_BATCH = 4


@dataclass
class OnnxClassifier:
    """The same interface as model.Classifier (the worker's Predictor)."""

    session: ort.InferenceSession
    labels: Sequence[str]
    description: str
    input_shape: tuple[int, int, int]
    # The Keras classifier's own preprocessing: the engines differ only in
    # what runs the forward pass.
    batch: Callable[[np.ndarray], np.ndarray]
    top_k: int

    @property
    def input_name(self) -> str:
        return str(self.session.get_inputs()[0].name)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, classes), for uint8 RGB images (n, h, w, 3)."""
        batch = np.ascontiguousarray(self.batch(images), dtype=np.float32)
        return np.asarray(self.session.run(None, {self.input_name: batch})[0])


def check_batch(input_shape: tuple[int, int, int]) -> np.ndarray:
    """A fixed batch of noise images: the same on every start."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (CHECK_BATCH, *input_shape), dtype=np.uint8)


def from_keras(classifier: Classifier) -> OnnxClassifier:
    """Export `classifier`'s model to ONNX, load it, and check it against Keras."""
    started = time.perf_counter()
    images = check_batch(classifier.input_shape)
    # Keras exports only a model that has been called; this call is also the
    # reference the ONNX outputs are checked against.
    expected = classifier.predict(images)
    with tempfile.TemporaryDirectory(prefix="keras-server-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        # tf2onnx logs its internals at INFO on every export: not the operator's concern.
        logging.getLogger("tf2onnx").setLevel(max(log.getEffectiveLevel(), logging.WARNING))
        try:
            with warnings.catch_warnings():
                # tf2onnx's own deprecation noise, once per start.
                warnings.simplefilter("ignore")
                classifier.model.export(str(path), format="onnx", verbose=False)
            # The session reads the whole file now, so the directory can go.
            session = ort.InferenceSession(
                str(path), sess_options=ort.SessionOptions(), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelLoadError(
                f"--engine onnx: exporting the model to ONNX failed "
                f"({type(exc).__name__}: {exc}); use --engine keras"
            ) from None
    engine = OnnxClassifier(
        session=session,
        labels=classifier.labels,
        description=f"{classifier.description}, ONNX Runtime {ort.__version__}",
        input_shape=classifier.input_shape,
        batch=classifier.batch,
        top_k=classifier.top_k,
    )
    difference = float(np.max(np.abs(engine.predict(images) - expected)))
    if not difference <= TOLERANCE:
        raise ModelLoadError(
            f"--engine onnx: the exported model differs from Keras by up to {difference:.2g} "
            f"on the check batch (allowed {TOLERANCE:g}); use --engine keras"
        )
    log.info(
        "exported to ONNX and checked in %.1f s: largest difference from Keras %.2g (allowed %g)",
        time.perf_counter() - started,
        difference,
        TOLERANCE,
    )
    return engine
