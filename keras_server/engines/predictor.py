"""The one interface every engine implements (`Predictor`), and what the worker
needs of it. The engines live beside this module: Keras (`keras_engine.py`),
ONNX Runtime (`onnx_engine.py`) and OpenVINO (`openvino_engine.py`), chosen
by `choice.py`; the simulated model (`simulated.py`) implements it too. This
module imports neither the engines nor the worker loop, so nothing cycles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from keras_server import cpuinfo

log = logging.getLogger(__name__)

TOP_K = 5


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message is meant for the operator."""


class EngineError(ModelLoadError):
    """This engine cannot run the model here (missing, cannot convert or
    compile, unsupported CPU, outputs too far from Keras); `--engine auto`
    falls back to keras on it, an engine asked for by name stops."""


@dataclass(frozen=True)
class Fidelity:
    """How closely an engine's probabilities follow Keras fp32 on held-out images."""

    images: int  # how many images were compared
    agreement: float  # share of images whose top-1 class is Keras's (0..1)
    max_difference: float  # largest |engine - keras| over every class probability

    def as_dict(self) -> dict[str, float | int]:
        return {
            "images": self.images,
            "top1_agreement": round(self.agreement, 6),
            "max_probability_difference": float(f"{self.max_difference:.3g}"),
        }


def parallel_batches_for(requested: int, engine: str) -> int:
    """How many batches a worker runs at once on `engine` (claim loops per
    queue, and for OpenVINO infer requests compiled): `requested`, or for 0
    (--parallel-batches' default) one per core for OpenVINO on a CPU with
    AMX, else 1. On the AMX Xeon's 2 cores, two batches at once on a
    single-threaded stream each served 2-5 % more images/s at 32 clients than
    one batch split over both streams: a split batch waits for its slower
    half, and with every request in the engine a core idled meanwhile (6-7 %
    of the machine, `perf sched`), where the loop whose stream is free
    claims the next batch (BENCHMARKS.md, "Parallel batches"). Without AMX
    two batches at once were not measured to pay."""
    if requested:
        return requested
    cores = cpuinfo.cores()
    return cores if engine == "openvino" and cores > 1 and cpuinfo.has_amx() else 1


class Predictor(Protocol):
    """What the worker knows of a model; every engine implements it: its class
    `labels`; `input_shape`, (height, width, 3), the uint8 RGB images the
    worker takes off the wire; `top_k`, how many classes each answer lists;
    `description`, the model, its weights and what runs it, for heartbeats
    and /models; `engine`, what runs the forward pass (keras, onnx, openvino
    or sim); `precision`, fp32, bf16 or int8; `fidelity`, measured against
    Keras fp32 at start-up (None for Keras itself)."""

    @property
    def labels(self) -> Sequence[str]: ...

    @property
    def input_shape(self) -> tuple[int, int, int]: ...

    @property
    def top_k(self) -> int: ...

    @property
    def description(self) -> str: ...

    @property
    def engine(self) -> str: ...

    @property
    def precision(self) -> str: ...

    @property
    def fidelity(self) -> Fidelity | None: ...

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (n, classes) for uint8 RGB images (n, h, w, 3)."""
        ...


def top_k(
    probabilities: np.ndarray, labels: Sequence[str], k: int = TOP_K
) -> list[dict[str, object]]:
    """The k most likely classes, highest first, in the API's shape."""
    best = top_indices(probabilities, k)
    return [{"label": labels[i], "probability": float(probabilities[i])} for i in best]


def top_indices(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest, largest first (ties in index order)."""
    k = min(k, probabilities.shape[-1])
    best = np.argpartition(-probabilities, k - 1)[:k]
    return best[np.argsort(-probabilities[best], kind="stable")]


def fidelity(expected: np.ndarray, got: np.ndarray) -> Fidelity:
    """Compare an engine's probabilities `got` with Keras's `expected`."""
    agreement = float(np.mean(np.argmax(got, axis=-1) == np.argmax(expected, axis=-1)))
    difference = float(np.max(np.abs(got.astype(np.float64) - expected)))
    return Fidelity(images=len(expected), agreement=agreement, max_difference=difference)


def warm_up(predictor: Predictor, batch_size: int) -> None:
    """Run batch 1 and the full batch once before the first request: the first
    run at a size compiles (Keras) or allocates buffers (ONNX Runtime,
    OpenVINO), and once both ends are traced Keras's compiled step takes every
    size in between."""
    for n in sorted({1, batch_size}):
        predictor.predict(np.zeros((n, *predictor.input_shape), dtype=np.uint8))


def timed_warm_up(predictor: Predictor, batch_size: int) -> None:
    started = time.perf_counter()
    warm_up(predictor, batch_size)
    log.info(
        "model warmed up in %.1f s (batch sizes 1..%d)", time.perf_counter() - started, batch_size
    )
