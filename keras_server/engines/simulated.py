"""A simulated model for capacity work — a load-testing aid, not a classifier.

`--model sim` serves this instead of ResNet50: each forward pass sleeps
`batch_ms + n * image_ms` and returns well-formed, deterministic probabilities
over the ImageNet classes (derived from the pixels, so equal images get equal
answers). On 2 CPU cores the real ResNet50 saturates the machine by itself, so
scale-out (more workers, more web servers, more Redis shards) is measured with
this; it imports no TensorFlow and starts in milliseconds.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence

import numpy as np

from keras_server.catalog import SIM_SIZE
from keras_server.engines.predictor import TOP_K, Fidelity
from keras_server.labels import imagenet_labels


class SimulatedModel:
    """A `predictor.Predictor` that only sleeps."""

    engine = "sim"
    precision = "fp32"
    fidelity: Fidelity | None = None

    def __init__(self, batch_ms: float, image_ms: float, top_k: int = TOP_K) -> None:
        self.batch_s = batch_ms / 1000
        self.image_s = image_ms / 1000
        self.top_k = top_k
        self.labels: Sequence[str] = imagenet_labels()
        self.description = (
            f"SIMULATED model ({batch_ms:g} ms per batch + {image_ms:g} ms per image)"
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (SIM_SIZE, SIM_SIZE, 3)

    def predict(self, images: np.ndarray) -> np.ndarray:
        time.sleep(self.batch_s + len(images) * self.image_s)
        # A softmax over logits seeded by a CRC of each image's pixels: a few
        # microseconds, where a mean colour took most of a millisecond of the
        # CPU that load tests measure the web tier with.
        seeds = [zlib.crc32(image.tobytes()) for image in images]
        logits = np.stack(
            [np.random.default_rng(s).standard_normal(len(self.labels)) * 3 for s in seeds]
        )
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
