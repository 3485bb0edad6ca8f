"""Which workers are alive, and what happens to a dead one's claims: each
claim loop beats (a heartbeat key with a TTL, its id in the workers set, its
version and the models registry entry), and any live worker's `reap_dead`
puts the claims of one whose heartbeat expired back at the head of their own
level's queue (scripts.REQUEUE), then `sweep`s the queues of versions left
without a live worker onto the model's.

`Liveness` is a part of RequestQueue (request_queue.py), kept here: it uses
the queue's client, shard, keys, levels and version.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import redis

from keras_server import metrics
from keras_server.broker.messages import BadMessage, Keys, UnknownFormat, WorkerInfo
from keras_server.broker.scripts import SWEEP_CHUNK, WAKEUP_TOKENS

if TYPE_CHECKING:
    from keras_server.broker.shards import Shard

log = logging.getLogger(__name__)

Pipeline = redis.client.Pipeline


class Liveness:
    """Heartbeats, reaping and sweeping, for one model's queue on one shard."""

    client: redis.Redis
    shard: Shard
    keys: Keys
    queue_keys: Keys
    levels: int
    version: str
    registry: str
    _unreadable: set[str]
    _requeue: Any
    _sweep: Any

    def beat(
        self, worker_id: str, info: WorkerInfo, ttl: float, pipe: Pipeline | None = None
    ) -> None:
        """Say `worker_id` is alive for the next `ttl` seconds."""
        own = pipe is None
        p = self.client.pipeline(transaction=True) if own else pipe
        p.set(self.keys.heartbeat(worker_id), info.encode(), px=max(int(ttl * 1000), 1))
        p.sadd(self.keys.workers, worker_id)
        if self.version:
            p.hset(self.keys.worker_versions, worker_id, self.version)
            p.sadd(self.keys.known_versions, self.version)
        if own:
            with self.shard.watch():
                p.execute()
        if self.registry and info.name:
            # The deployment's registry is under the plain queue name's hash
            # tag, another slot on a cluster: never in the heartbeat's
            # transaction. A beat whose registry write fails is seen by the
            # web tier at the next one (it forgets a model after --model-grace).
            entry = {"queue": self.keys.queue_name, "version": info.version, "at": info.at}
            with self.shard.watch():
                self.client.hset(self.registry, info.name, json.dumps(entry))

    def leave(self, worker_id: str, pipe: Pipeline | None = None) -> None:
        own = pipe is None
        p = self.client.pipeline(transaction=True) if own else pipe
        p.delete(self.keys.heartbeat(worker_id))
        p.srem(self.keys.workers, worker_id)
        p.hdel(self.keys.worker_versions, worker_id)
        if own:
            with self.shard.watch():
                p.execute()

    def workers(self) -> dict[str, WorkerInfo | None]:
        """Every registered worker id, with its heartbeat (None: it stopped beating)."""
        with self.shard.watch():
            ids = sorted(m.decode() for m in self.client.smembers(self.keys.workers))
            if not ids:
                return {}
            beats = self.client.mget([self.keys.heartbeat(i) for i in ids])
        found: dict[str, WorkerInfo | None] = {}
        for worker_id, raw in zip(ids, beats, strict=True):
            try:
                found[worker_id] = None if raw is None else WorkerInfo.decode(raw)
            except UnknownFormat as exc:
                # Alive (it beats) but unreadable: neither routed to nor reaped.
                if worker_id not in self._unreadable:
                    self._unreadable.add(worker_id)
                    log.warning("worker %s left out: %s", worker_id, exc)
            except BadMessage:
                found[worker_id] = None
        return found

    def reap_dead(self, sweep_budget: float | None = None) -> dict[str, int]:
        """Requeue the claims of every worker whose heartbeat expired (onto
        its own version's queue), then sweep the queues of versions left
        without a live worker (`sweep`, for about `sweep_budget` seconds).

        Safe to run from any number of workers at once: each dead worker's
        list is moved by one atomic script, and a worker that beats again in
        the meantime is left alone. Returns {dead worker id: requests requeued}.
        """
        reaped = {}
        workers = self.workers()
        dead = [worker_id for worker_id, info in workers.items() if info is None]
        if dead:
            with self.shard.watch():
                versions = self.client.hmget(self.keys.worker_versions, dead)
        for worker_id, version in zip(dead, versions if dead else [], strict=True):
            with self.shard.watch():
                moved = int(
                    self._requeue(
                        keys=self._requeue_keys(worker_id, version.decode() if version else ""),
                        args=[worker_id, "1", WAKEUP_TOKENS],
                    )
                )
                if moved >= 0:
                    self.client.hdel(self.keys.worker_versions, worker_id)
            if moved >= 0:
                reaped[worker_id] = moved
        live = {info.version for info in workers.values() if info is not None and info.versioned}
        self.sweep(live, sweep_budget)
        return reaped

    def sweep(self, live: set[str], budget: float | None = None) -> dict[str, int]:
        """Move what waits on the queue of each version with no live worker
        (not in `live`) onto the model's queue, where any version's worker
        takes it: an unpinned request routed there just before that
        version's last worker left is answered rather than timed out, and a
        pinned one is refused by the worker that claims it. A queue of any
        length moves SWEEP_CHUNK requests per script call, so Redis serves
        its other clients in between; after `budget` seconds (None: no
        limit) no other call is made, and the next sweep goes on from there
        (the heartbeat sweeps, and must not be held up). Returns {version:
        requests moved}, those that moved any."""
        with self.shard.watch():
            known = {v.decode() for v in self.client.smembers(self.keys.known_versions)}
        moved = {}
        deadline = None if budget is None else time.monotonic() + budget
        for version in sorted(known - live):
            if moved and deadline is not None and time.monotonic() >= deadline:
                break  # every sweep makes one call at least
            source = self.keys.for_version(version)
            keys = [self.keys.wakeup, *source.queues(self.levels), *self.keys.queues(self.levels)]
            count = 0
            try:
                while True:
                    with self.shard.watch():
                        step = int(self._sweep(keys=keys, args=[WAKEUP_TOKENS, SWEEP_CHUNK]))
                    count += step
                    late = deadline is not None and time.monotonic() >= deadline
                    if step < SWEEP_CHUNK or late:
                        break
            except redis.ResponseError as exc:
                # The script failed in Redis (not an outage, which goes on to
                # the caller): the other versions are still swept.
                metrics.SWEEP_FAILURES.inc()
                log.error(
                    "version %s: sweeping its queue failed after %d moved: %s", version, count, exc
                )
                continue
            if count:
                log.info("version %s has no live worker: %d queued requests moved", version, count)
                moved[version] = count
        return moved

    def _requeue_keys(self, worker_id: str, version: str | None = None) -> list[str]:
        """The requeue script's keys: claims go back onto `version`'s queue
        (default: this queue's; "": the model's)."""
        k = self.keys
        target = self.queue_keys if version is None else (k.for_version(version) if version else k)
        return [
            k.processing(worker_id),
            k.workers,
            k.heartbeat(worker_id),
            target.wakeup,
            *target.queues(self.levels),
        ]
