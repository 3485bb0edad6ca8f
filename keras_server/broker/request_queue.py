"""The Redis queue between web servers and model workers.

Web side: `push_all` one request's images (refused at once, all of them, when
the queue is full), then `wait_results` blocks in Redis (BLPOP) on their own
result keys (`push` and `wait_result` are the one-request forms).

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
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from keras_server.broker.messages import BadMessage, Keys, WorkerInfo

Pipeline = redis.client.Pipeline

# BLPOP/BLMOVE treat a timeout of 0 as "forever": never let rounding get us there.
MIN_BLOCK_S = 0.01
SENTINEL_SCHEME = "redis+sentinel://"

# KEYS: queue. ARGV: max depth, then the payloads. All of them or none:
# returns the new depth, or -1 if they do not all fit.
_PUSH_ALL = """
if redis.call('LLEN', KEYS[1]) + #ARGV - 1 > tonumber(ARGV[1]) then return -1 end
return redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
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


def connect(url: str, *, timeout: float, read_timeout: float | None = None) -> redis.Redis:
    """A client for `url` that gives up on a silent server after `timeout` s.

    A hung host (stopped process, network partition) keeps its connections
    open and never answers; without a read timeout each command would wait
    for it indefinitely. A client that makes blocking calls (BLPOP, BLMOVE)
    needs a `read_timeout` longer than its longest block. Nothing is retried
    behind our back: the web tier answers 503 at once while Redis is down,
    and the worker loop has its own backoff.

    `redis+sentinel://host:port[,host:port...]/MASTER[/DB]` asks those Redis
    Sentinels for the current master of MASTER, and again after a failover.
    """
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout if read_timeout is None else read_timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 30,
    }
    if url.startswith(SENTINEL_SCHEME):
        sentinels, master, db, password = parse_sentinel_url(url)
        sentinel = Sentinel(
            sentinels,
            sentinel_kwargs={"socket_connect_timeout": timeout, "socket_timeout": timeout},
            **options,
        )
        return sentinel.master_for(master, db=db, password=password)
    return redis.Redis.from_url(url, **options)


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """(sentinel addresses, master name, db, password) of a redis+sentinel:// URL."""
    rest = url.removeprefix(SENTINEL_SCHEME)
    password = None
    if "@" in rest:
        credentials, rest = rest.rsplit("@", 1)
        password = unquote(credentials.split(":", 1)[-1]) or None
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts or len(parts) > 2:
        raise ValueError(f"expected {SENTINEL_SCHEME}HOST:PORT[,HOST:PORT...]/MASTER[/DB]")
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"sentinel address {host!r}: expected HOST:PORT")
        sentinels.append((name.strip("[]"), int(port)))
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError(f"database {parts[1]!r}: expected a number")
    return sentinels, parts[0], int(parts[1]) if len(parts) == 2 else 0, password


class RequestQueue:
    """One model's queue on one Redis.

    `client` runs the quick commands; `waiter`, if given, the blocking ones
    (BLPOP, BLMOVE), whose read timeout must outlast the block. Two clients,
    so a quick command on a hung host fails after the short timeout rather
    than the long one.
    """

    def __init__(self, client: redis.Redis, keys: Keys, waiter: redis.Redis | None = None) -> None:
        self.client = client
        self.waiter = waiter or client
        self.keys = keys
        self._push_all = client.register_script(_PUSH_ALL)
        self._claim_more = client.register_script(_CLAIM_MORE)
        self._requeue = client.register_script(_REQUEUE)

    @classmethod
    def open(cls, url: str, keys: Keys, *, timeout: float, wait_timeout: float) -> RequestQueue:
        """A queue on `url`: quick commands give up after `timeout` s, blocking
        ones (which never block longer than `wait_timeout`) after `wait_timeout`."""
        return cls(
            connect(url, timeout=timeout),
            keys,
            connect(url, timeout=timeout, read_timeout=wait_timeout),
        )

    def close(self) -> None:
        self.client.close()
        if self.waiter is not self.client:
            self.waiter.close()

    # -- web side ---------------------------------------------------------

    def push(self, payload: bytes, max_depth: int | None = None) -> int:
        """Queue a request unless `max_depth` are waiting; returns the new depth."""
        if max_depth is None:
            return int(self.client.rpush(self.keys.queue, payload))
        return self.push_all([payload], max_depth)

    def push_all(self, payloads: Sequence[bytes], max_depth: int) -> int:
        """Queue several requests at once, or none of them when they would take
        the queue past `max_depth` (QueueFull); returns the new depth."""
        depth = int(self._push_all(keys=[self.keys.queue], args=[max_depth, *payloads]))
        if depth < 0:
            raise QueueFull(f"{len(payloads)} more would take the queue past {max_depth}")
        return depth

    def wait_results(self, request_ids: Sequence[str], timeout: float) -> dict[str, bytes]:
        """Block until every one of `request_ids` is answered or `timeout`
        passes; returns the answers that came, by request id."""
        deadline = time.monotonic() + timeout
        keys = {self.keys.result(i): i for i in request_ids}
        found: dict[str, bytes] = {}
        while keys:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # BLPOP takes whichever of the keys is answered first.
            reply = self.waiter.blpop(list(keys), timeout=max(remaining, MIN_BLOCK_S))
            if reply is None:
                break
            key = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
            found[keys.pop(key)] = reply[1]
        return found

    def wait_result(self, request_id: str, timeout: float) -> bytes | None:
        """Block until the worker answers `request_id`, or `timeout` passes.

        BLPOP both waits and removes the answer, so nothing is left behind.
        """
        return self.wait_results([request_id], timeout).get(request_id)

    def depth(self) -> int:
        return int(self.client.llen(self.keys.queue))

    # -- worker side ------------------------------------------------------

    def claim_first(self, worker_id: str, wait: float) -> bytes | None:
        """Block up to `wait` s for one request and move it to the processing list."""
        processing = self.keys.processing(worker_id)
        return self.waiter.blmove(
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
            more = self.waiter.blmove(queue, processing, remaining, "LEFT", "RIGHT")
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
