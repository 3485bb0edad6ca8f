"""The models registry: every model a web process routes to, each with its
own queue on every Redis shard, its router (serving/traffic.py) and the input
size its uploads are resized to.

The input size comes from the model's live workers (their heartbeat says
what the loaded model takes, read from the process's one WorkerView,
serving/workers.py), or, before any worker beats, from the built-in
catalogue.

Which models: those configured (the models file, or the flags' one model),
always; with --models-from workers (the default) also every model a worker
beats for, learned from the registry each worker's heartbeat writes
(`Keys.models`: model name -> its queue, version and last beat), read with
each survey of the WorkerView: a new model's worker serves through every
unrestarted web server within a second of its first heartbeat. A learned
model whose last worker left answers 503 "no live worker" until
--model-grace seconds after its last beat, then is forgotten (404). A Redis
that cannot be read forgets nothing: a learned model is forgotten only
--model-grace after the last beat anyone saw. TensorFlow-free.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import redis

from keras_server.broker.failures import reason
from keras_server.broker.messages import Keys, WorkerInfo
from keras_server.broker.placement import ShardSet
from keras_server.catalog import NAME, Models, ModelSpec, model_specs
from keras_server.serving.traffic import Router
from keras_server.serving.workers import ShardState, Survey, WorkerView
from keras_server.settings import Settings

log = logging.getLogger(__name__)

# How often a web process reads the models registry (--models-from workers):
# a new model's worker is routed within this of its first heartbeat.
DISCOVERY_INTERVAL_S = 1.0


@dataclass
class ServedModel:
    spec: ModelSpec
    shards: ShardSet  # the model's own queue (its versions': router.shards_for)
    # The process's survey of the workers (Deployment sets it).
    view: WorkerView | None = field(default=None, repr=False)
    # Which version answers each request, and its queue (serving/traffic.py).
    router: Router = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.router = Router(self.spec.name, self.shards, self.live_workers)

    @property
    def name(self) -> str:
        return self.spec.name

    def survey(self) -> list[ShardState]:
        """This model's queue on each shard, read now: reachable, depth, live
        workers, the jobs' backlog. A shard marked down is not asked (see shards.ShardSet).
        Only the WorkerView calls this; everyone else reads the view."""
        found = []
        for queue in self.shards.queues:
            where = queue.shard.name
            down = queue.shard.down_reason()
            if down is not None:
                found.append(ShardState(self.name, where, reachable=False, error=down))
                continue
            try:
                depths, workers = tuple(queue.depths()), queue.workers()
                with queue.shard.watch():
                    backlog = queue.jobs.backlog()
            except redis.RedisError as exc:
                # An unreachable host was marked down by the queue; one that
                # refuses is up but cannot be read now: either way, says why.
                found.append(ShardState(self.name, where, reachable=False, error=reason(exc)))
                continue
            live = {wid: info for wid, info in workers.items() if info is not None}
            found.append(ShardState(self.name, where, True, depths, live, backlog))
        return found

    def live_workers(self, fresh: bool = False) -> list[WorkerInfo]:
        """Live workers over the reachable shards, from the process's view
        (`fresh`: a survey at most WorkerView.FRESH_MIN_S old)."""
        if self.view is None:
            return Survey(tuple(self.survey())).live_workers()
        return self.view.live_workers(self.name, fresh)

    def input_size(self, workers: list[WorkerInfo] | None = None) -> tuple[int, int] | None:
        """(width, height) to resize uploads to; None while unknown."""
        if workers is None:
            workers = self.live_workers()
        sizes = {w.input_size for w in workers if w.input_size}
        if not sizes:
            return self.spec.static_size
        return min(sizes)  # several would be a misconfiguration


@dataclass
class Deployment:
    """The models a web process routes: those it was configured with (the
    models file, or the flags' one model), and with --models-from workers
    also those it learned from the live workers' registry (`discover`).
    `view` is the process's one survey of the workers (serving/workers.py)."""

    models: dict[str, ServedModel]
    default: str
    settings: Settings | None = None
    # Learned models are added and forgotten by rebinding `models` (a new
    # dict each time), so a reader always sees one whole set.
    configured: frozenset[str] = frozenset()
    view: WorkerView = field(init=False, repr=False)
    _discovered_at: float = field(default=-DISCOVERY_INTERVAL_S, repr=False)
    # The latest registry entry seen for each learned model: a Redis blip
    # that hides the registry forgets nothing before --model-grace.
    _seen: dict[str, Registered] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.configured:
            self.configured = frozenset(self.models)
        self.view = WorkerView(lambda: list(self.models.values()), before=self.discover)
        for model in self.models.values():
            model.view = self.view

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
        # and health record (shards.Shard).
        return ShardSet.connect(
            settings.redis_urls,
            keys,
            timeout=settings.redis_timeout,
            levels=settings.priority_levels,
            partitions=settings.queue_partitions,
        )

    def survey(self, fresh: bool = False) -> Survey:
        """Every model's queue on every shard, from the process's view."""
        return self.view.survey(fresh)

    def discover(self, now: float | None = None) -> None:
        """With --models-from workers, at most every DISCOVERY_INTERVAL_S:
        read the registry (`Keys.models`, every shard that is up) and route
        each model a worker has beaten for within --model-grace; forget the
        learned ones none has. A configured model is never forgotten, and a
        learned one whose queue is a configured model's is ignored."""
        if self.settings is None or self.settings.models_from != "workers":
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._discovered_at < DISCOVERY_INTERVAL_S:
                return
            self._discovered_at = now
        for name, entry in self._read_registry().items():
            if name not in self._seen or entry.at > self._seen[name].at:
                self._seen[name] = entry
        current = self.models
        taken = {current[n].shards.queues[0].keys.queue_name for n in self.configured}
        wall = time.time()
        learned: dict[str, ServedModel] = {}
        for name, entry in list(self._seen.items()):
            if name in self.configured or wall - entry.at > self.settings.model_grace:
                self._seen.pop(name, None)
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
                model.view = self.view
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
        """Each model the registry names, with its latest beat over the
        shards that answered (none: nothing is learned or forgotten now)."""
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
                log.warning("model registry at %s unreadable (%s)", queue.shard.name, reason(exc))
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

    def get(self, name: str | None = None) -> ServedModel | None:
        """The model named `name` (None: the default); learned ones are
        looked for at most every DISCOVERY_INTERVAL_S."""
        if name is not None and name not in self.models:
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
