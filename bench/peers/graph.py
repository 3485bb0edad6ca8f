"""What each peer server serves: the project's graph, its decode, its answer.

The peers are configured through the environment (`PeerConfig.to_env`): mosec
parses the command line itself and spawns its workers, and a LitServe worker
is a fresh process too, so each process reads the same variables. Their
decode is `PeerConfig.decode`: plain Pillow as their users would write it
(`bench.limit.plain_pillow`), or keras-server's `load_image`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bench.limit import LOAD_IMAGE, PILLOW, plain_pillow
from keras_server.catalog import BUILTINS, ModelSpec
from keras_server.engines.choice import EngineOptions, load_predictor
from keras_server.engines.predictor import Predictor, top_k, warm_up
from keras_server.images import ImageError, load_image
from keras_server.settings import Settings

log = logging.getLogger(__name__)

ENV_PREFIX = "BENCH_PEER_"
MAX_IMAGE_PIXELS = Settings().max_image_pixels  # keras-server's default
# How long a request may wait for its answer: keras-server's default
# --result-timeout, given to each peer in place of its own.
TIMEOUT_S = Settings().result_timeout


@dataclass(frozen=True)
class PeerConfig:
    """The graph a peer serves and how it batches."""

    model: str  # a keras.applications network keras-server knows (catalog.BUILTINS)
    weights: str  # the saved random weights (the conversion cache's key)
    calibration_dir: str
    cache_dir: str
    engine: str
    precision: str
    batch_size: int
    wait_ms: float  # the longest a batch waits to fill
    decode: str = PILLOW  # one of bench.limit.DECODES
    streams: int = 1  # --openvino-streams: infer requests a batch is split over
    peer_streams: int = 1  # the peers' (as their users load the graph: LATENCY)
    parallel_batches: int = 1  # --parallel-batches: keras-server's batches at once

    def for_peers(self) -> PeerConfig:
        """The configuration a peer loads the graph with: one batch at a time."""
        return dataclasses.replace(self, streams=self.peer_streams, parallel_batches=1)

    def to_env(self) -> dict[str, str]:
        return {
            ENV_PREFIX + f.name.upper(): str(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_env(cls) -> PeerConfig:
        values: dict[str, object] = {
            f.name: os.environ[ENV_PREFIX + f.name.upper()] for f in dataclasses.fields(cls)
        }
        values["batch_size"] = int(str(values["batch_size"]))
        values["wait_ms"] = float(str(values["wait_ms"]))
        values["streams"] = int(str(values["streams"]))
        values["peer_streams"] = int(str(values["peer_streams"]))
        values["parallel_batches"] = int(str(values["parallel_batches"]))
        return cls(**values)  # type: ignore[arg-type]

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) the network takes: the decode process needs it before
        any model loads."""
        size = BUILTINS[self.model].size
        return size, size

    def spec(self) -> ModelSpec:
        """The spec the server's flags and `bench.engines.measure_raw` build:
        the same conversion-cache key, so every system (and the harness's own
        `load`) loads the same converted graph."""
        return ModelSpec(
            name=self.model, source=self.model, weights=self.weights, engine=self.engine,
            precision=self.precision, calibration_dir=self.calibration_dir,
        )  # fmt: skip


def load(config: PeerConfig) -> Predictor:
    """The predictor keras-server's worker would run, warmed up as it is.

    Random weights give int8 calibration nothing to go on, so the agreement
    floor is 0, as the benchmark's keras-server runs with `--min-agreement 0`.
    """
    options = EngineOptions(
        config.cache_dir, 0.0, MAX_IMAGE_PIXELS,
        parallel_batches=config.parallel_batches, openvino_streams=config.streams,
    )  # fmt: skip
    predictor = load_predictor(config.spec(), options)
    warm_up(predictor, config.batch_size)
    return predictor


def decode(data: bytes, config: PeerConfig) -> np.ndarray:
    """An upload decoded as `config.decode` says: uint8 RGB at the model's size."""
    if config.decode == LOAD_IMAGE:
        return load_image(data, config.input_size, MAX_IMAGE_PIXELS)
    try:
        return plain_pillow(data, config.input_size)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        # Pillow's own errors (not an image, truncated, too many pixels): the
        # peers answer ImageError as a bad request.
        raise ImageError(str(exc)) from None


def answers(predictor: Predictor, images: Sequence[np.ndarray]) -> list[dict[str, object]]:
    """One forward pass; each image's answer in /predict's body."""
    probabilities = predictor.predict(np.stack(images))
    return [
        {"success": True, "predictions": top_k(p, predictor.labels, predictor.top_k)}
        for p in probabilities
    ]
