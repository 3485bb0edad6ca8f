"""What a web server routes to: every model of the deployment, each with its
own queue on every Redis shard, and the input size its uploads are resized to.

The input size comes from the model's live workers (their heartbeat says
what the loaded model takes), or, before any worker beats, from the built-in
catalogue. `Deployment.survey` reads each model's queue on each shard
(reachable, depth at each priority level, live workers) for /readyz, /models and the metrics, so
the three always agree. TensorFlow-free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis

from keras_server.broker.failures import reason
from keras_server.broker.messages import Keys, WorkerInfo
from keras_server.broker.shards import ShardSet
from keras_server.catalog import Models, ModelSpec
from keras_server.settings import Settings
from keras_server.web.routing import Router

# How long a learned input size is trusted before asking Redis again.
SIZE_TTL_S = 5.0


@dataclass(frozen=True)
class ShardState:
    """One model's queue on one shard, as read at one moment."""

    model_name: str
    shard: str  # host:port/db, no password
    reachable: bool
    depths: tuple[int, ...] = ()  # requests waiting at each priority level, 1 first
    workers: dict[str, WorkerInfo] = field(default_factory=dict)  # live ones, by id
    error: str = ""  # why it was unreachable

    @property
    def depth(self) -> int:
        """Requests waiting at every level."""
        return sum(self.depths)


@dataclass(frozen=True)
class Survey:
    """Every model's queue on every shard."""

    states: tuple[ShardState, ...]

    def __iter__(self) -> Iterator[ShardState]:
        return iter(self.states)

    def of(self, model_name: str) -> list[ShardState]:
        return [s for s in self.states if s.model_name == model_name]

    def live_workers(self, model_name: str | None = None) -> list[WorkerInfo]:
        """Live workers of the model named `model_name` (default: of every
        model) over the reachable shards."""
        states = self.states if model_name is None else self.of(model_name)
        return [info for s in states for info in s.workers.values()]


@dataclass
class ServedModel:
    spec: ModelSpec
    shards: ShardSet  # the model's own queue (its versions': router.shards_for)
    _size: tuple[float, tuple[int, int] | None] = field(default=(0.0, None), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Which version answers each request, and its queue (web/routing.py).
    router: Router = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.router = Router(self.spec.name, self.shards)

    @property
    def name(self) -> str:
        return self.spec.name

    def survey(self) -> list[ShardState]:
        """This model's queue on each shard: reachable, depth, live workers.
        A shard marked down is not asked (see shards.ShardSet)."""
        found = []
        for queue in self.shards.queues:
            where = self.shards.name(queue)
            down = queue.shard.down_reason()
            if down is not None:
                found.append(ShardState(self.name, where, reachable=False, error=down))
                continue
            try:
                depths, workers = tuple(queue.depths()), queue.workers()
            except redis.RedisError as exc:
                # An unreachable host was marked down by the queue; one that
                # refuses is up but cannot be read now: either way, says why.
                found.append(ShardState(self.name, where, reachable=False, error=reason(exc)))
                continue
            live = {wid: info for wid, info in workers.items() if info is not None}
            found.append(ShardState(self.name, where, True, depths, live))
        return found

    def live_workers(self) -> list[WorkerInfo]:
        """Live workers over the reachable shards (unreachable ones are skipped)."""
        return Survey(tuple(self.survey())).live_workers()

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
            # Every model's queue on a shard shares that shard's connections
            # and health record (request_queue.Shard).
            shards = ShardSet.connect(
                settings.redis_urls,
                keys,
                timeout=settings.redis_timeout,
                levels=settings.priority_levels,
            )
            served[spec.name] = ServedModel(spec, shards)
        return cls(served, default)

    def unready(self, survey: Survey) -> list[str]:
        """Why the deployment is not ready, from `survey`; empty when it is:
        every model has a reachable shard, and a live worker on each one."""
        missing = []
        for name in self.models:
            reachable = [s for s in survey.of(name) if s.reachable]
            missing += [
                f"no live worker for model {name!r} at {s.shard}"
                for s in reachable
                if not s.workers
            ]
            if not reachable:
                missing.append(f"no reachable Redis shard for model {name!r}")
        return missing

    def survey(self) -> Survey:
        """Every model's queue on every shard, read now."""
        return Survey(tuple(s for model in self.models.values() for s in model.survey()))

    def get(self, name: str | None = None) -> ServedModel | None:
        return self.models.get(self.default if name is None else name)
