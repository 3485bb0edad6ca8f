"""The Redis queue between web servers and model workers.

Web side: `push` a request (refused at once when the queue is full), then
`wait_result` blocks in Redis (BLPOP) on that request's own result key.

Worker side, crash-safe: a claim moves requests from the queue into the
worker's own processing list (`claim_first`: BLMOVE, blocking without polling;
then `claim_more`: a short Lua script doing LRANGE + LTRIM + RPUSH atomically
for the rest), so a claimed request is always in exactly one place. `finish` writes the
answers and empties the processing list in one MULTI/EXEC. A worker keeps a
heartbeat key with a TTL; when it stops beating (kill -9, lost machine), any
live worker's `reap_dead` puts its claimed requests back at the head of the
queue.

Methods that only write take an optional pipeline so a caller can make several
writes one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .protocol import BadMessage, Keys, WorkerInfo

Pipeline = redis.client.Pipeline

# BLPOP/BLMOVE treat a timeout of 0 as "forever": never let rounding get us there.
MIN_BLOCK_S = 0.01

# KEYS: queue. ARGV: payload, max depth. Returns the new depth, or -1 if full.
_PUSH = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
return redis.call('RPUSH', KEYS[1], ARGV[1])
"""

# KEYS: queue, processing list. ARGV: how many. Returns the items moved.
_CLAIM_MORE = """
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #items > 0 then
  redis.call('LTRIM', KEYS[1], #items, -1)
  redis.call('RPUSH', KEYS[2], unpack(items))
end
return items
"""

# KEYS: processing list, queue, workers set, heartbeat. ARGV: worker id,
# "1" to act only if the heartbeat is gone. Puts the items back at the head of
# the queue, oldest first; returns how many, or -1 if the worker is alive.
_REQUEUE = """
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[4]) == 1 then return -1 end
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #items, 1, -1 do redis.call('LPUSH', KEYS[2], items[i]) end
redis.call('DEL', KEYS[1])
if ARGV[2] == '1' then redis.call('SREM', KEYS[3], ARGV[1]) end
return #items
"""


class QueueFull(Exception):
    """The queue holds --max-queue requests already: come back later."""


def connect(url: str, *, block_seconds: float) -> redis.Redis:
    """A client for `url` whose reads outlast a blocking call of `block_seconds`.

    Connecting fails fast and nothing is retried behind our back: the web tier
    must answer 503 within a second while Redis is down, and the worker loop
    has its own backoff.
    """
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=0.5,
        socket_timeout=block_seconds + 5.0,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )


class RequestQueue:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._push = client.register_script(_PUSH)
        self._claim_more = client.register_script(_CLAIM_MORE)
        self._requeue = client.register_script(_REQUEUE)

    # -- web side ---------------------------------------------------------

    def push(self, payload: bytes, max_depth: int | None = None) -> int:
        """Queue a request unless `max_depth` are waiting; returns the new depth."""
        if max_depth is None:
            return int(self.client.rpush(self.keys.queue, payload))
        depth = int(self._push(keys=[self.keys.queue], args=[payload, max_depth]))
        if depth < 0:
            raise QueueFull(f"{max_depth} requests are already waiting")
        return depth

    def wait_result(self, request_id: str, timeout: float) -> bytes | None:
        """Block until the worker answers `request_id`, or `timeout` passes.

        BLPOP both waits and removes the answer, so nothing is left behind.
        """
        key = self.keys.result(request_id)
        reply = self.client.blpop([key], timeout=max(timeout, MIN_BLOCK_S))
        return None if reply is None else reply[1]

    def depth(self) -> int:
        return int(self.client.llen(self.keys.queue))

    # -- worker side ------------------------------------------------------

    def claim_first(self, worker_id: str, wait: float) -> bytes | None:
        """Block up to `wait` s for one request and move it to the processing list."""
        processing = self.keys.processing(worker_id)
        return self.client.blmove(
            self.keys.queue, processing, max(wait, MIN_BLOCK_S), "LEFT", "RIGHT"
        )

    def claim_more(self, worker_id: str, max_items: int, until: float) -> list[bytes]:
        """Take up to `max_items` more: whatever is queued, and then, until the
        monotonic time `until`, whatever arrives (mosec-style batch filling)."""
        queue, processing = self.keys.queue, self.keys.processing(worker_id)
        items: list[bytes] = []
        while len(items) < max_items:
            items += self._claim_more(keys=[queue, processing], args=[max_items - len(items)])
            remaining = until - time.monotonic()
            if len(items) >= max_items or remaining < MIN_BLOCK_S:
                break
            more = self.client.blmove(queue, processing, remaining, "LEFT", "RIGHT")
            if more is None:
                break
            items.append(more)
        return items

    def finish(
        self,
        worker_id: str,
        results: Mapping[str, bytes],
        ttl: float,
        pipe: Pipeline | None = None,
    ) -> None:
        """Answer each request and release the worker's claims, atomically.

        Answers nobody collects expire after `ttl` seconds.
        """
        own = pipe is None
        p = self.client.pipeline(transaction=True) if own else pipe
        for request_id, payload in results.items():
            key = self.keys.result(request_id)
            p.rpush(key, payload)
            p.pexpire(key, max(int(ttl * 1000), 1))
        p.delete(self.keys.processing(worker_id))
        if own:
            p.execute()

    def requeue(self, worker_id: str) -> int:
        """Put the worker's unanswered claims back at the head of the queue."""
        return int(self._requeue(keys=self._requeue_keys(worker_id), args=[worker_id, "0"]))

    # -- liveness ---------------------------------------------------------

    def beat(
        self, worker_id: str, info: WorkerInfo, ttl: float, pipe: Pipeline | None = None
    ) -> None:
        """Say `worker_id` is alive for the next `ttl` seconds."""
        own = pipe is None
        p = self.client.pipeline(transaction=True) if own else pipe
        p.set(self.keys.heartbeat(worker_id), info.encode(), px=max(int(ttl * 1000), 1))
        p.sadd(self.keys.workers, worker_id)
        if own:
            p.execute()

    def leave(self, worker_id: str, pipe: Pipeline | None = None) -> None:
        own = pipe is None
        p = self.client.pipeline(transaction=True) if own else pipe
        p.delete(self.keys.heartbeat(worker_id))
        p.srem(self.keys.workers, worker_id)
        if own:
            p.execute()

    def workers(self) -> dict[str, WorkerInfo | None]:
        """Every registered worker id, with its heartbeat (None: it stopped beating)."""
        ids = sorted(m.decode() for m in self.client.smembers(self.keys.workers))
        if not ids:
            return {}
        beats = self.client.mget([self.keys.heartbeat(i) for i in ids])
        found: dict[str, WorkerInfo | None] = {}
        for worker_id, raw in zip(ids, beats, strict=True):
            try:
                found[worker_id] = None if raw is None else WorkerInfo.decode(raw)
            except BadMessage:
                found[worker_id] = None
        return found

    def reap_dead(self) -> dict[str, int]:
        """Requeue the claims of every worker whose heartbeat expired.

        Safe to run from any number of workers at once: each dead worker's
        list is moved by one atomic script, and a worker that beats again in
        the meantime is left alone. Returns {dead worker id: requests requeued}.
        """
        reaped = {}
        for worker_id, info in self.workers().items():
            if info is None:
                moved = int(
                    self._requeue(keys=self._requeue_keys(worker_id), args=[worker_id, "1"])
                )
                if moved >= 0:
                    reaped[worker_id] = moved
        return reaped

    def _requeue_keys(self, worker_id: str) -> list[str]:
        k = self.keys
        return [k.processing(worker_id), k.queue, k.workers, k.heartbeat(worker_id)]
