"""What a web server routes to: every model of the deployment, each with its
own queue on every Redis shard, and the input size its uploads are resized to.

The input size comes from the model's live workers (their heartbeat says
what the loaded model takes), or, before any worker beats, from the built-in
catalogue. `Deployment.survey` reads each model's queue on each shard
(reachable, depth at each priority level, live workers) for /readyz, /models and the metrics, so
the three always agree.

Which models: those configured (the models file, or the flags' one model),
always; with --models-from workers (the default) also every model a worker
beats for, learned from the registry each worker's heartbeat writes
(`Keys.models`: model name -> its queue, version and last beat), read at
most every DISCOVERY_INTERVAL_S: a new model's worker serves through every
unrestarted web server within a second of its first heartbeat. A learned
model whose last worker left answers 503 "no live worker" until
--model-grace seconds after its last beat, then is forgotten (404). Which
version of a model answers is web/routing.py's. TensorFlow-free.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis

from keras_server.broker.failures import reason
from keras_server.broker.messages import Keys, WorkerInfo
from keras_server.broker.shards import ShardSet
from keras_server.catalog import NAME, Models, ModelSpec, model_specs
from keras_server.settings import Settings
from keras_server.web.routing import Router

log = logging.getLogger(__name__)

# How long a learned input size is trusted before asking Redis again.
SIZE_TTL_S = 5.0
# How often a web process reads the models registry (--models-from workers):
# a new model's worker is routed within this of its first heartbeat.
DISCOVERY_INTERVAL_S = 1.0


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
    """The models a web process routes: those it was configured with (the
    models file, or the flags' one model), and with --models-from workers
    also those it learned from the live workers' registry (`discover`)."""

    models: dict[str, ServedModel]
    default: str
    settings: Settings | None = None
    # Learned models are added and forgotten by rebinding `models` (a new
    # dict each time), so a reader always sees one whole set.
    configured: frozenset[str] = frozenset()
    _discovered_at: float = field(default=-DISCOVERY_INTERVAL_S, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.configured:
            self.configured = frozenset(self.models)

    @classmethod
    def from_settings(cls, settings: Settings, models: Models | None = None) -> Deployment:
        """Every model of `models` (the entry point's, else read from `settings`)
        on every shard of `settings`."""
        specs, default = models or model_specs(settings)
        served = {}
        for spec in specs:
            keys = Keys.for_model(settings.queue_name, spec.name, default)
            served[spec.name] = ServedModel(spec, cls._connect(settings, keys))
        return cls(served, default, settings)

    @staticmethod
    def _connect(settings: Settings, keys: Keys) -> ShardSet:
        # Every model's queue on a shard shares that shard's connections
        # and health record (request_queue.Shard).
        return ShardSet.connect(
            settings.redis_urls,
            keys,
            timeout=settings.redis_timeout,
            levels=settings.priority_levels,
        )

    @property
    def learning(self) -> bool:
        return self.settings is not None and self.settings.models_from == "workers"

    def discover(self, now: float | None = None) -> None:
        """With --models-from workers, at most every DISCOVERY_INTERVAL_S:
        read the registry (`Keys.models`, every shard that is up) and route
        each model a worker has beaten for within --model-grace; forget the
        learned ones none has. A configured model is never forgotten, and a
        learned one whose queue is a configured model's is ignored."""
        if not self.learning or self.settings is None:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._discovered_at < DISCOVERY_INTERVAL_S:
                return
            self._discovered_at = now
        found = self._read_registry()
        current = self.models
        taken = {current[n].shards.queues[0].keys.queue_name for n in self.configured}
        wall = time.time()
        learned: dict[str, ServedModel] = {}
        for name, entry in found.items():
            if name in self.configured or wall - entry.at > self.settings.model_grace:
                continue
            if entry.queue in taken:
                log.debug("model %r: its queue %r is a configured model's", name, entry.queue)
                continue
            model = current.get(name)
            if model is None or model.shards.queues[0].keys.queue_name != entry.queue:
                spec = ModelSpec(
                    name=name, source=f"{name}.keras", version=entry.version or "1",
                    response_cache_ttl=0.0,
                )  # fmt: skip
                model = ServedModel(spec, self._connect(self.settings, Keys(entry.queue)))
                # A learned model without live workers is a 503 at once:
                # nobody is coming to claim what would be queued.
                model.router.wait_for_workers = False
                log.info("learned model %r (queue %r) from its workers", name, entry.queue)
            learned[name] = model
        kept = {n: m for n, m in current.items() if n in self.configured}
        gone = set(current) - set(kept) - set(learned)
        for name in sorted(gone):
            log.info("forgot model %r: no worker for %g s", name, self.settings.model_grace)
        self.models = {**kept, **learned}

    def _read_registry(self) -> dict[str, Registered]:
        """Each model the registry names, with its latest beat over the shards."""
        if self.settings is None:
            return {}
        found: dict[str, Registered] = {}
        root = Keys(self.settings.queue_name)
        any_model = next(iter(self.models.values()), None)
        queues = any_model.shards.up() if any_model else []
        for queue in queues:
            try:
                with queue.shard.watch():
                    raw = queue.client.hgetall(root.models)
            except redis.RedisError as exc:
                log.debug("model registry at %s unreadable (%s)", queue.shard.name, exc)
                continue
            for name, value in raw.items():
                entry = Registered.decode(value)
                key = name.decode() if isinstance(name, bytes) else name
                if entry is None or not NAME.match(key):
                    continue
                if key not in found or entry.at > found[key].at:
                    found[key] = entry
        return found

    def unready(self, survey: Survey) -> list[str]:
        """Why the deployment is not ready, from `survey`; empty when it is:
        every configured model has a reachable shard, and a live worker on
        each one (a learned model comes and goes with its workers)."""
        missing = []
        for name in self.models:
            if name not in self.configured:
                continue
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
        self.discover()
        return Survey(tuple(s for model in self.models.values() for s in model.survey()))

    def get(self, name: str | None = None) -> ServedModel | None:
        """The model named `name` (None: the default); learned ones are
        looked for at most every DISCOVERY_INTERVAL_S."""
        self.discover()
        return self.models.get(self.default if name is None else name)


@dataclass(frozen=True)
class Registered:
    """A model's entry in the registry (`Keys.models`)."""

    queue: str
    version: str
    at: float  # Unix time of its latest beat

    @classmethod
    def decode(cls, raw: bytes | str) -> Registered | None:
        try:
            body = json.loads(raw)
            queue, version, at = body["queue"], body.get("version", ""), float(body["at"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if not isinstance(queue, str) or not isinstance(version, str) or not math.isfinite(at):
            return None
        return cls(queue, version, at)
