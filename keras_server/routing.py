"""What a web server routes to: every model of the deployment, each with its
own queue on every Redis shard, and the input size its uploads are resized to.

The input size comes from the model's live workers (their heartbeat says
what the loaded model takes), or, before any worker beats, from the built-in
catalogue. TensorFlow-free.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import redis

from .catalog import Models, ModelSpec
from .protocol import Keys, WorkerInfo
from .settings import Settings
from .shards import ShardSet

# How long a learned input size is trusted before asking Redis again.
SIZE_TTL_S = 5.0


@dataclass
class ServedModel:
    spec: ModelSpec
    shards: ShardSet
    _size: tuple[float, tuple[int, int] | None] = field(default=(0.0, None), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def live_workers(self) -> list[WorkerInfo]:
        """Live workers over the reachable shards (unreachable ones are skipped)."""
        found = []
        for queue in self.shards.queues:
            try:
                found += [info for info in queue.workers().values() if info is not None]
            except redis.RedisError:
                continue
        return found

    def input_size(self, workers: list[WorkerInfo] | None = None) -> tuple[int, int] | None:
        """(width, height) to resize uploads to; None while unknown. Pass the
        live `workers` if the caller has just read them."""
        now = time.monotonic()
        with self._lock:
            learned_at, size = self._size
            if size is not None and now - learned_at < SIZE_TTL_S:
                return size
        if workers is None:
            workers = self.live_workers()
        sizes = {w.input_size for w in workers if w.input_size}
        if not sizes:
            return self.spec.static_size
        size = min(sizes)  # several would be a misconfiguration
        with self._lock:
            self._size = (now, size)
        return size


@dataclass
class Deployment:
    models: dict[str, ServedModel]
    default: str

    @classmethod
    def from_settings(cls, settings: Settings, models: Models | None = None) -> Deployment:
        """Every model of `models` (the entry point's, else read from `settings`)
        on every shard of `settings`."""
        specs, default = models or settings.model_specs()
        served = {}
        for spec in specs:
            keys = Keys.for_model(settings.queue_name, spec.name, default)
            shards = ShardSet.connect(settings.redis_urls, keys, settings.result_timeout)
            served[spec.name] = ServedModel(spec, shards)
        return cls(served, default)

    def get(self, name: str | None = None) -> ServedModel | None:
        return self.models.get(self.default if name is None else name)
