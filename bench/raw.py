"""The forward pass alone, in process: what the served numbers are measured against.

It times the very `predict` the worker calls (preprocessing included) on the
sample photos as the web tier sends them (uint8 224x224x3), at the server's
batch size and one image at a time, after the same warm-up the server does.
"""

from __future__ import annotations

import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keras_server.engines.predictor import Predictor, warm_up
from keras_server.images import load_image
from stress_test import percentile

RESNET50_INPUT = (224, 224)  # (width, height) the web tier resizes to for ResNet50

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawResult:
    engine: str
    batch_size: int
    # images per second in the median of `batch_runs` passes of `batch_size` images
    # (the median: a busy machine's stalls should not decide it)
    batch_throughput: float
    # per-pass seconds at batch_size (median) and for one image (median, p99)
    batch_seconds: float
    single_p50: float
    single_p99: float
    batch_runs: int
    single_runs: int
    # seconds to get the engine ready (ONNX: export + check), if measured
    setup_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_batch(
    images: list[Path], size: int, input_size: tuple[int, int] = RESNET50_INPUT
) -> np.ndarray:
    """`size` images cycled from the sample photos, decoded as the web tier does
    for a network taking `input_size` (width, height)."""
    decoded = [load_image(p.read_bytes(), input_size, 50_000_000) for p in images]
    return np.stack([decoded[i % len(decoded)] for i in range(size)])


def measure(
    engine: str,
    predictor: Predictor,
    batch: np.ndarray,
    *,
    batch_runs: int,
    single_runs: int,
    setup_seconds: float | None = None,
    parallel: int = 1,
) -> RawResult:
    """Time `predictor.predict` on `batch` and on its images one at a time;
    `parallel`: the batch passes as the server runs them, that many at once
    (--parallel-batches; the throughput counts them all)."""
    warm_up(predictor, len(batch))
    # One untimed pass at each size: first calls still allocate.
    predictor.predict(batch)
    predictor.predict(batch[:1])
    passes = []
    with ThreadPoolExecutor(parallel) as pool:
        for _ in range(batch_runs):
            started = time.perf_counter()
            list(pool.map(predictor.predict, [batch] * parallel))
            passes.append((time.perf_counter() - started) / parallel)
    singles = []
    for i in range(single_runs):
        image = batch[i % len(batch)][None]
        started = time.perf_counter()
        predictor.predict(image)
        singles.append(time.perf_counter() - started)
    singles.sort()
    result = RawResult(
        engine=engine,
        batch_size=len(batch),
        batch_throughput=len(batch) / statistics.median(passes),
        batch_seconds=statistics.median(passes),
        single_p50=statistics.median(singles),
        single_p99=percentile(singles, 99),
        batch_runs=batch_runs,
        single_runs=single_runs,
        setup_seconds=setup_seconds,
    )
    log.info(
        "raw %s: %.1f img/s at batch %d, one image p50 %.0f ms",
        engine,
        result.batch_throughput,
        result.batch_size,
        result.single_p50 * 1000,
    )
    return result
