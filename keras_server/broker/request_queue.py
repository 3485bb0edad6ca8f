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

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from keras_server.broker.failures import Kind, classify, reason
from keras_server.broker.jobs import JobStore, completed
from keras_server.broker.messages import BadMessage, Keys, WorkerInfo, job_item

log = logging.getLogger(__name__)

Pipeline = redis.client.Pipeline

# BLPOP/BLMOVE treat a timeout of 0 as "forever": never let rounding get us there.
MIN_BLOCK_S = 0.01
SENTINEL_SCHEME = "redis+sentinel://"
# How often a host marked down is pinged to see whether it is back.
PROBE_INTERVAL_S = 0.5

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


def connect(url: str, *, timeout: float) -> redis.Redis:
    """A client for `url` that gives up on a silent server after `timeout` s.

    A hung host (stopped process, network partition) keeps its connections
    open and never answers; without a read timeout each command would wait
    for it indefinitely. Blocking calls (BLPOP, BLMOVE) go through
    `Shard.block`, which reads their reply with a longer timeout. Nothing is retried
    behind our back: the web tier answers 503 at once while Redis is down,
    and the worker loop has its own backoff.

    `redis+sentinel://host:port[,host:port...]/MASTER[/DB]` asks those Redis
    Sentinels for the current master of MASTER, and again after a failover.
    """
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
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


def label(url: str) -> str:
    """host:port/db of a Redis URL, without any password: safe for logs and metrics."""
    if url.startswith(SENTINEL_SCHEME):
        _, master, db, _ = parse_sentinel_url(url)
        return f"sentinel:{master}/{db}"
    kwargs = redis.connection.parse_url(url)
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


class Shard:
    """One Redis, as this process sees it: one connection pool and one health
    record, shared by every model's queue on it, in the web tier and in the
    worker alike (`Shard.of`).

    A host that cannot be reached — refuses connections, or stays silent past
    `timeout` like a hung host — is marked down by whichever caller meets it
    first (`watch`, see failures.py): every queue on it is skipped without
    asking it anything, and one probe thread pings it until it answers.
    """

    _registry: dict[tuple[str, float], Shard] = {}  # noqa: RUF012 (the process's own)
    _registry_lock = threading.Lock()

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.name = label(url)
        self.timeout = timeout
        self.client = connect(url, timeout=timeout)
        self._lock = threading.Lock()
        self._down: str | None = None  # why, while marked down
        self._probing = False

    @classmethod
    def of(cls, url: str, timeout: float) -> Shard:
        """This process's Shard for `url`. One settings table per process
        means one --redis-timeout, so one Shard per URL."""
        with cls._registry_lock:
            found = cls._registry.get((url, timeout))
            if found is None:
                found = cls._registry[(url, timeout)] = cls(url, timeout)
            return found

    def is_down(self) -> bool:
        return self.down_reason() is not None

    def down_reason(self) -> str | None:
        """Why the host is marked down (what it failed with); None while up."""
        with self._lock:
            return self._down

    def mark_down(self, error: BaseException) -> None:
        """Skip this host until the probe hears from it again."""
        with self._lock:
            newly = self._down is None
            if newly:
                self._down = reason(error)
            start_probe, self._probing = not self._probing, True
        if newly:
            log.warning(
                "Redis shard %s failed (%s); skipping it until it answers", self.name, error
            )
        if start_probe:
            threading.Thread(target=self._probe, name="shard-probe", daemon=True).start()

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Mark the host down when what runs inside finds it unreachable; every
        error goes on to the caller."""
        try:
            yield
        except redis.RedisError as exc:
            if classify(exc) is Kind.UNREACHABLE:
                self.mark_down(exc)
            raise

    def block(self, *command: Any, seconds: float) -> Any:
        """Run a blocking command (BLPOP, BLMOVE) that Redis ends after
        `seconds`, reading its reply for `seconds` plus --redis-timeout: a nil
        reply that comes a little late is not a hung host."""
        pool = self.client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_command(*command)
            return connection.read_response(timeout=seconds + self.timeout)
        except BaseException:
            # Its reply may still come: this connection is never reused.
            connection.disconnect()
            raise
        finally:
            pool.release(connection)

    def _probe(self) -> None:
        """Ping the host every PROBE_INTERVAL_S until it answers."""
        event = threading.Event()
        while True:
            try:
                self.client.ping()
            except redis.RedisError:
                event.wait(PROBE_INTERVAL_S)
                continue
            with self._lock:
                self._down, self._probing = None, False
            log.info("Redis shard %s answers again", self.name)
            return


class RequestQueue:
    """One model's queue on one Redis (`shard`): its connections and health
    are the shard's, shared with every other queue on the same Redis.

    Every command goes through `Shard.watch`, so an unreachable host is
    marked down whoever meets it: the web tier, the surveys, the worker.
    """

    def __init__(self, shard: Shard, keys: Keys) -> None:
        self.shard = shard
        self.client = shard.client
        self.keys = keys
        self._push_all = self.client.register_script(_PUSH_ALL)
        self._claim_more = self.client.register_script(_CLAIM_MORE)
        self._requeue = self.client.register_script(_REQUEUE)
        self.jobs = JobStore(self.client, keys)

    @classmethod
    def open(cls, url: str, keys: Keys, *, timeout: float) -> RequestQueue:
        """A queue on `url`, over this process's Shard for it: commands give
        up on a silent host after `timeout` s, blocking ones `timeout` s after
        Redis should have ended them."""
        return cls(Shard.of(url, timeout), keys)

    # -- web side ---------------------------------------------------------

    def push(self, payload: bytes, max_depth: int | None = None) -> int:
        """Queue a request unless `max_depth` are waiting; returns the new depth."""
        if max_depth is None:
            with self.shard.watch():
                return int(self.client.rpush(self.keys.queue, payload))
        return self.push_all([payload], max_depth)

    def push_all(self, payloads: Sequence[bytes], max_depth: int) -> int:
        """Queue several requests at once, or none of them when they would take
        the queue past `max_depth` (QueueFull); returns the new depth."""
        with self.shard.watch():
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
            block = max(remaining, MIN_BLOCK_S)
            with self.shard.watch():
                reply = self.shard.block("BLPOP", *keys, block, seconds=block)
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
        with self.shard.watch():
            return int(self.client.llen(self.keys.queue))

    # -- worker side ------------------------------------------------------

    def claim_first(self, worker_id: str, wait: float) -> bytes | None:
        """Block up to `wait` s for one request and move it to the processing list."""
        return self._blmove(self.keys.processing(worker_id), max(wait, MIN_BLOCK_S))

    def _blmove(self, processing: str, block: float) -> bytes | None:
        with self.shard.watch():
            found: bytes | None = self.shard.block(
                "BLMOVE", self.keys.queue, processing, "LEFT", "RIGHT", block, seconds=block
            )
        return found

    def claim_more(self, worker_id: str, max_items: int, until: float) -> list[bytes]:
        """Take up to `max_items` more: whatever is queued, and then, until the
        monotonic time `until`, whatever arrives (mosec-style batch filling)."""
        queue, processing = self.keys.queue, self.keys.processing(worker_id)
        items: list[bytes] = []
        while len(items) < max_items:
            with self.shard.watch():
                items += self._claim_more(keys=[queue, processing], args=[max_items - len(items)])
            remaining = until - time.monotonic()
            if len(items) >= max_items or remaining < MIN_BLOCK_S:
                break
            more = self._blmove(processing, remaining)
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
        *,
        job_ttl: float = 86400.0,
    ) -> list[str]:
        """Answer each request and release the worker's claims, atomically.

        Answers nobody collects expire after `ttl` seconds. A job's item is
        answered into its job's record instead (jobs.JobStore.record), kept
        `job_ttl` once the job is done. Returns the jobs this completed
        (none when the caller's `pipe` runs the transaction)."""
        own = pipe is None
        p = self.client.pipeline(transaction=True) if own else pipe
        recorded: list[tuple[int, str]] = []  # (reply position, job id)
        for request_id, payload in results.items():
            item = job_item(request_id)
            if item is not None:
                recorded.append((len(p.command_stack), item[0]))
                self.jobs.record(p, item[0], item[1], payload, job_ttl)
                continue
            key = self.keys.result(request_id)
            p.rpush(key, payload)
            p.pexpire(key, max(int(ttl * 1000), 1))
        p.delete(self.keys.processing(worker_id))
        if not own:
            return []
        with self.shard.watch():
            replies = p.execute()
        return [job_id for position, job_id in recorded if completed(replies[position])]

    def requeue(self, worker_id: str) -> int:
        """Put the worker's unanswered claims back at the head of the queue."""
        with self.shard.watch():
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
            with self.shard.watch():
                p.execute()

    def leave(self, worker_id: str, pipe: Pipeline | None = None) -> None:
        own = pipe is None
        p = self.client.pipeline(transaction=True) if own else pipe
        p.delete(self.keys.heartbeat(worker_id))
        p.srem(self.keys.workers, worker_id)
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
                with self.shard.watch():
                    moved = int(
                        self._requeue(keys=self._requeue_keys(worker_id), args=[worker_id, "1"])
                    )
                if moved >= 0:
                    reaped[worker_id] = moved
        return reaped

    def _requeue_keys(self, worker_id: str) -> list[str]:
        k = self.keys
        return [k.processing(worker_id), k.queue, k.workers, k.heartbeat(worker_id)]
