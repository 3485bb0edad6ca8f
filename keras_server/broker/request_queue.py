"""The Redis queue between web servers and model workers.

Priorities: one list per level (`Keys.queue_at`; level 1, the highest, is the
plain queue name, so entries queued before priorities existed are served).
A web server pushes each request onto its level's list. Workers take from the
highest level that holds anything.

Web side: `push_all` one request's images onto one level (one MULTI: RPUSH
and a wake-up token; taken back and refused at once, all of them, when that
level held --max-queue already: the cap is per level, so a flood at a low
level never refuses an interactive request), then `wait_results` blocks in
Redis (BLPOP) on their own result keys (`push` and `wait_result` are the
one-request forms).

Worker side, crash-safe: a claim moves requests from the queues into the
worker's own processing list in one Lua script (`_CLAIM`: highest level first,
LRANGE + LTRIM + RPUSH per level), so a claimed request is always in exactly
one place. BLMOVE, which blocked on one list, cannot watch several levels, so
a worker that finds every level empty blocks (BLPOP) on the wake-up list
(`Keys.wakeup`): every push adds a token to it (a few at most, see
WAKEUP_TOKENS), in the same transaction as the push. No wake-up is lost: the claim
that found nothing and the push are each atomic, so a push after the claim
leaves a token the BLPOP takes at once. A stale token (its request claimed by
a worker that was not blocked) costs one empty claim; the claim script
deletes the list whenever it leaves every level empty, so tokens never pile
up. A request pushed without a token (by a web server from before
priorities, during a rolling upgrade) is found by the claim after each
blocking wait's timeout. `claim_first` takes one request (with `top_only`,
from level 1 alone: BLMOVE on that one list); `claim_more` fills the batch,
at most `max_lower` of it from levels below 1.

`finish` writes the answers and empties the processing list in one
MULTI/EXEC. A worker keeps a heartbeat key with a TTL; when it stops beating
(kill -9, lost machine), any live worker's `reap_dead` puts its claimed
requests back at the head of their own level's queue (the script reads each
entry's `"priority"`), with wake-up tokens.

Methods that only write take an optional pipeline so a caller can make several
writes one transaction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from keras_server.broker.failures import Kind, kind_of, reason
from keras_server.broker.jobs import JobStore, completed, recorded
from keras_server.broker.messages import BadMessage, Keys, WorkerInfo, job_item

log = logging.getLogger(__name__)

Pipeline = redis.client.Pipeline

# BLPOP and BLMOVE treat a timeout of 0 as "forever": never let rounding get us there.
MIN_BLOCK_S = 0.01
SENTINEL_SCHEME = "redis+sentinel://"
# How often a host marked down is pinged to see whether it is back.
PROBE_INTERVAL_S = 0.5

# Most wake-up tokens the list holds: enough to wake that many blocked
# workers (claim loops) on one shard at once; the others find the work when
# they next look, which they do before blocking again.
WAKEUP_TOKENS = 64

# KEYS: processing list, the wake-up lists (ARGV[4] of them), then the
# queues, highest level first (the first ARGV[3] of them are level 1: a
# version's queue and the model's). ARGV: how many, how many of them at most
# from below level 1, level-1 queues, wake-up lists. Returns {how many came
# from below level 1, the items moved...}, highest level first, oldest first
# within a level.
_CLAIM = """
local want, lower = tonumber(ARGV[1]), tonumber(ARGV[2])
local top, wakes = tonumber(ARGV[3]), tonumber(ARGV[4])
local first = 2 + wakes
local result, lowered, waiting = {0}, 0, 0
for i = first, #KEYS do
  local take = want - (#result - 1)
  local below = i >= first + top
  if below and take > lower - lowered then take = lower - lowered end
  if take > 0 then
    local items = redis.call('LRANGE', KEYS[i], 0, take - 1)
    if #items > 0 then
      redis.call('LTRIM', KEYS[i], #items, -1)
      redis.call('RPUSH', KEYS[1], unpack(items))
      for _, item in ipairs(items) do result[#result + 1] = item end
      if below then lowered = lowered + #items end
    end
  end
  waiting = waiting + redis.call('LLEN', KEYS[i])
end
if waiting == 0 then
  for i = 2, first - 1 do redis.call('DEL', KEYS[i]) end
end
result[1] = lowered
return result
"""

# KEYS: the wake-up list, then a version's queues, then the model's, each
# highest level first (as many of each). Moves every request left on the
# version's queues to the tail of the model's, level by level; returns how
# many.
_SWEEP = """
local levels = (#KEYS - 1) / 2
local moved = 0
for level = 1, levels do
  local items = redis.call('LRANGE', KEYS[1 + level], 0, -1)
  if #items > 0 then
    redis.call('DEL', KEYS[1 + level])
    redis.call('RPUSH', KEYS[1 + levels + level], unpack(items))
    moved = moved + #items
  end
end
local tokens = math.min(moved, tonumber(ARGV[1]) - redis.call('LLEN', KEYS[1]))
for i = 1, tokens do redis.call('RPUSH', KEYS[1], '1') end
return moved
"""

# KEYS: processing list, workers set, heartbeat, wake-up list, then the
# queues, highest level first. ARGV: worker id, "1" to act only if the
# heartbeat is gone, token cap. Puts each item back at the head of its own
# level's queue (its header's "priority"; none, or past the last level: the
# nearest level there is), oldest first; returns how many, or -1 if the
# worker is alive.
_REQUEUE = """
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local levels = #KEYS - 4
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #items, 1, -1 do
  local item = items[i]
  local level = 1
  local newline = string.find(item, '\\n', 1, true)
  local header = newline and string.sub(item, 1, newline - 1) or item
  if string.find(header, '"priority"', 1, true) then
    local ok, message = pcall(cjson.decode, header)
    if ok and type(message) == 'table' and type(message.priority) == 'number' then
      level = math.max(1, math.min(levels, math.floor(message.priority)))
    end
  end
  redis.call('LPUSH', KEYS[4 + level], item)
end
redis.call('DEL', KEYS[1])
if ARGV[2] == '1' then redis.call('SREM', KEYS[2], ARGV[1]) end
local tokens = math.min(#items, tonumber(ARGV[3]) - redis.call('LLEN', KEYS[4]))
for i = 1, tokens do redis.call('RPUSH', KEYS[4], '1') end
return #items
"""


@dataclass
class Finished:
    """What one `finish` did to jobs: the jobs it completed, and the items
    it recorded in their jobs (a requeued item answered twice counts once)."""

    jobs_done: list[str] = field(default_factory=list)
    items_succeeded: int = 0
    items_failed: int = 0


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
            if kind_of(exc) is Kind.UNREACHABLE:
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

    def __init__(
        self, shard: Shard, keys: Keys, levels: int = 1, version: str = "", registry: str = ""
    ) -> None:
        """`levels`: --priority-levels, the queues a worker takes from.
        `version`: the model version this queue is for: pushes go onto its
        own queue (`Keys.for_version`), and a worker claims from it first,
        then from the model's (requests queued unversioned, by a web server
        from before versions had queues, or swept off a version whose last
        worker left). "": the model's queue alone. Results, claims,
        heartbeats and jobs are the model's (`keys`) either way. `registry`:
        the deployment's models hash (`Keys.models`), where each heartbeat
        names the model and its queue; "": not written."""
        if levels < 1:
            raise ValueError(f"{levels} priority levels")
        self.shard = shard
        self.client = shard.client
        self.keys = keys
        self.levels = levels
        self.version = version
        self.registry = registry
        # Where pushes go and what `depths` counts.
        self.queue_keys = keys.for_version(version) if version else keys
        self._claim = self.client.register_script(_CLAIM)
        self._requeue = self.client.register_script(_REQUEUE)
        self._sweep = self.client.register_script(_SWEEP)
        self.jobs = JobStore(self.client, keys)

    @classmethod
    def open(
        cls,
        url: str,
        keys: Keys,
        *,
        timeout: float,
        levels: int = 1,
        version: str = "",
        registry: str = "",
    ) -> RequestQueue:
        """A queue on `url`, over this process's Shard for it: commands give
        up on a silent host after `timeout` s, blocking ones `timeout` s after
        Redis should have ended them."""
        return cls(Shard.of(url, timeout), keys, levels, version, registry)

    def of_version(self, version: str) -> RequestQueue:
        """The same model's queue for `version`, on the same shard."""
        return RequestQueue(self.shard, self.keys, self.levels, version)

    def _level(self, level: int) -> int:
        if not 1 <= level <= self.levels:
            raise ValueError(f"priority level {level} is not in 1..{self.levels}")
        return level

    # -- web side ---------------------------------------------------------

    def push(self, payload: bytes, max_depth: int | None = None, level: int = 1) -> int:
        """Queue a request at `level` unless `max_depth` wait there; returns
        that level's new depth."""
        return self.push_all([payload], max_depth if max_depth is not None else 2**62, level)

    def push_all(self, payloads: Sequence[bytes], max_depth: int, level: int = 1) -> int:
        """Queue several requests at once at `level`, or none of them when
        they would take that level past `max_depth` (QueueFull); returns the
        level's new depth.

        One MULTI, no Lua: a script's arguments are copied into Lua strings,
        which cost Redis 11-35x a plain RPUSH for an image (BENCHMARKS.md,
        "Redis per request"). The same transaction leaves a wake-up token per
        request (at most WAKEUP_TOKENS wait), so no blocked worker misses the
        push. Past `max_depth` the payloads are taken back (LREM from the
        tail, one MULTI): refused, unless a worker claimed some of them
        meanwhile, which makes the request accepted after all (what was taken
        back goes on the queue again). Two pushes racing at the limit may both
        be refused where one would have fit; a token left behind only wakes a
        worker that finds nothing."""
        queue = self.queue_keys.queue_at(self._level(level))
        tokens = min(len(payloads), WAKEUP_TOKENS)
        with self.shard.watch():
            pipe = self.client.pipeline(transaction=True)
            pipe.rpush(queue, *payloads)
            pipe.rpush(self.queue_keys.wakeup, *[b"1"] * tokens)
            pipe.ltrim(self.queue_keys.wakeup, 0, WAKEUP_TOKENS - 1)
            depth = int(pipe.execute()[0])
            if depth <= max_depth:
                return depth
            pipe = self.client.pipeline(transaction=True)
            for payload in payloads:
                pipe.lrem(queue, -1, payload)  # from the tail: where ours are
            removed = [int(n) for n in pipe.execute()]
            taken = [p for p, n in zip(payloads, removed, strict=True) if n]
            if 0 < len(taken) < len(payloads):
                return int(self.client.rpush(queue, *taken))
        if len(taken) < len(payloads):
            return depth  # a worker had claimed all of them: nothing taken back
        raise QueueFull(f"{len(payloads)} more would take the level-{level} queue past {max_depth}")

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

    def depths(self) -> list[int]:
        """Requests waiting at each level, highest first: on this version's
        queue; on the model's queue, the model's and every version's
        together (two round trips)."""
        with self.shard.watch():
            names = [self.queue_keys]
            if not self.version:
                known = sorted(v.decode() for v in self.client.smembers(self.keys.known_versions))
                names += [self.keys.for_version(v) for v in known]
            pipe = self.client.pipeline(transaction=False)
            for keys in names:
                for key in keys.queues(self.levels):
                    pipe.llen(key)
            counts = [int(n) for n in pipe.execute()]
        return [sum(counts[level :: self.levels]) for level in range(self.levels)]

    def depth(self, up_to: int | None = None) -> int:
        """Requests waiting at levels 1 .. `up_to` (default: every level):
        with `up_to`, those a request pushed at that level would wait behind."""
        return sum(self.depths()[: up_to or self.levels])

    # -- worker side ------------------------------------------------------

    def _take(self, worker_id: str, count: int, max_lower: int) -> tuple[list[bytes], int]:
        """(up to `count` requests moved to the worker's processing list,
        highest level first, at most `max_lower` from below level 1; how many
        of them came from below level 1)."""
        # A version's worker takes its own queue's level first, then the
        # model's, level by level.
        sources = [self.queue_keys, self.keys] if self.version else [self.keys]
        queues = [q.queue_at(level) for level in range(1, self.levels + 1) for q in sources]
        keys = [
            self.keys.processing(worker_id),
            *self._wakeups(),
            *queues,
        ]
        args = [count, max(max_lower, 0), len(sources), len(sources)]
        with self.shard.watch():
            reply = self._claim(keys=keys, args=args)
        return list(reply[1:]), int(reply[0])

    def _wakeups(self) -> list[str]:
        return [self.queue_keys.wakeup, self.keys.wakeup] if self.version else [self.keys.wakeup]

    def _wait_for_push(self, block: float) -> bool:
        """Block up to `block` s for a wake-up token; whether one came."""
        block = max(block, MIN_BLOCK_S)
        with self.shard.watch():
            return self.shard.block("BLPOP", *self._wakeups(), block, seconds=block) is not None

    def claim_first(self, worker_id: str, wait: float, top_only: bool = False) -> bytes | None:
        """Block up to `wait` s for one request, from the highest level that
        holds any (`top_only`: from level 1 alone), and move it to the
        processing list."""
        if top_only:
            # One list: BLMOVE blocks on it, atomically, without tokens.
            block = max(wait, MIN_BLOCK_S)
            processing = self.keys.processing(worker_id)
            with self.shard.watch():
                found: bytes | None = self.shard.block(
                    "BLMOVE", self.queue_keys.queue_at(1), processing, "LEFT", "RIGHT", block,
                    seconds=block,
                )  # fmt: skip
            return found
        until = time.monotonic() + max(wait, MIN_BLOCK_S)
        while True:
            items, _ = self._take(worker_id, 1, 1)
            if items:
                return items[0]
            remaining = until - time.monotonic()
            if remaining <= 0:
                return None
            if not self._wait_for_push(remaining):
                # Timed out: one last look, for a push that left no token.
                items, _ = self._take(worker_id, 1, 1)
                return items[0] if items else None

    def claim_more(
        self, worker_id: str, max_items: int, until: float, max_lower: int | None = None
    ) -> list[bytes]:
        """Take up to `max_items` more, at most `max_lower` of them from below
        level 1 (default: no limit): whatever is queued, highest level first,
        and then, until the monotonic time `until`, whatever arrives
        (mosec-style batch filling)."""
        lower_left = max_items if max_lower is None else max_lower
        items: list[bytes] = []
        while len(items) < max_items:
            taken, lowered = self._take(worker_id, max_items - len(items), lower_left)
            items += taken
            lower_left -= lowered
            remaining = until - time.monotonic()
            if len(items) >= max_items or remaining < MIN_BLOCK_S:
                break
            if not self._wait_for_push(remaining):
                items += self._take(worker_id, max_items - len(items), lower_left)[0]
                break
        return items

    def finish(
        self,
        worker_id: str,
        results: Mapping[str, bytes],
        ttl: float,
        pipe: Pipeline | None = None,
        *,
        job_ttl: float = 86400.0,
    ) -> Finished:
        """Answer each request and release the worker's claims, atomically.

        Answers nobody collects expire after `ttl` seconds. A job's item is
        answered into its job's record instead (jobs.JobStore.record), kept
        `job_ttl` once the job is done. Returns what this did to jobs
        (nothing when the caller's `pipe` runs the transaction)."""
        own = pipe is None
        p = self.client.pipeline(transaction=True) if own else pipe
        items: list[tuple[int, str, bool]] = []  # (reply position, job id, failed)
        for request_id, payload in results.items():
            item = job_item(request_id)
            if item is not None:
                position = len(p.command_stack)
                failed = self.jobs.record(p, item[0], item[1], payload, job_ttl)
                items.append((position, item[0], failed))
                continue
            key = self.keys.result(request_id)
            p.rpush(key, payload)
            p.pexpire(key, max(int(ttl * 1000), 1))
        p.delete(self.keys.processing(worker_id))
        finished = Finished()
        if not own:
            return finished
        with self.shard.watch():
            replies = p.execute()
        for position, job_id, failed in items:
            if not recorded(replies[position]):
                continue
            if failed:
                finished.items_failed += 1
            else:
                finished.items_succeeded += 1
            if completed(replies[position]):
                finished.jobs_done.append(job_id)
        return finished

    def requeue(self, worker_id: str) -> int:
        """Put the worker's unanswered claims back at the head of their levels' queues."""
        with self.shard.watch():
            return int(
                self._requeue(
                    keys=self._requeue_keys(worker_id), args=[worker_id, "0", WAKEUP_TOKENS]
                )
            )

    # -- liveness ---------------------------------------------------------

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
        if self.registry and info.name:
            entry = {"queue": self.keys.queue_name, "version": info.version, "at": info.at}
            p.hset(self.registry, info.name, json.dumps(entry))
        if own:
            with self.shard.watch():
                p.execute()

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
            except BadMessage:
                found[worker_id] = None
        return found

    def reap_dead(self) -> dict[str, int]:
        """Requeue the claims of every worker whose heartbeat expired (onto
        its own version's queue), then sweep the queues of versions left
        without a live worker (`sweep`).

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
        self.sweep(live)
        return reaped

    def sweep(self, live: set[str]) -> dict[str, int]:
        """Move what waits on the queue of each version with no live worker
        (not in `live`) onto the model's queue, where any version's worker
        takes it: an unpinned request routed there just before that
        version's last worker left is answered rather than timed out, and a
        pinned one is refused by the worker that claims it. Returns
        {version: requests moved}, those that moved any."""
        with self.shard.watch():
            known = {v.decode() for v in self.client.smembers(self.keys.known_versions)}
        moved = {}
        for version in sorted(known - live):
            source = self.keys.for_version(version)
            keys = [self.keys.wakeup, *source.queues(self.levels), *self.keys.queues(self.levels)]
            with self.shard.watch():
                count = int(self._sweep(keys=keys, args=[WAKEUP_TOKENS]))
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
