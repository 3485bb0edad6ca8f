"""The Redis queue between web servers and model workers.

Priorities: one list per level (`Keys.queue_at`; level 1, the highest, is the
plain queue name).
A web server pushes each request onto its level's list. Workers take from the
highest level that holds anything.

Web side: `push_all` one request's images onto one level (one MULTI: RPUSH
and a wake-up token; taken back and refused at once, all of them, when that
level held --max-queue already: the cap is per level, so a flood at a low
level never refuses an interactive request), then `wait_results` blocks in
Redis (BLPOP) on their own result keys (`push` and `wait_result` are the
one-request forms).

Worker side, crash-safe: a claim moves requests from the queues into the
worker's own processing list in one Lua script (scripts.CLAIM: highest level first,
an LMOVE per request), so a claimed request is always in exactly
one place. BLMOVE, which blocked on one list, cannot watch several levels, so
a worker that finds every level empty blocks (BLPOP) on the wake-up list
(`Keys.wakeup`): every push adds a token to it (a few at most, see
WAKEUP_TOKENS), in the same transaction as the push. No wake-up is lost: the claim
that found nothing and the push are each atomic, so a push after the claim
leaves a token the BLPOP takes at once. A stale token (its request claimed by
a worker that was not blocked) costs one empty claim; the claim script
deletes the list whenever it leaves every level empty, so tokens never pile
up. `claim_first` takes one request (with `protected`, a level, from that
level's list alone: BLMOVE on that one list); `claim_more` fills the batch,
at most `max_lower` of it from the levels below `protected` (the worker's
protected level: worker/loop.py).

`finish` writes the answers and empties the processing list in one
MULTI/EXEC. A worker keeps a heartbeat key with a TTL; when it stops beating
(kill -9, lost machine), any live worker's `reap_dead` puts its claimed
requests back at the head of their own level's queue (the script reads each
entry's `"priority"`), with wake-up tokens.

Methods that only write take an optional pipeline so a caller can make several
writes one transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import redis

from keras_server.broker.jobs import JobStore, completed, recorded
from keras_server.broker.liveness import Liveness
from keras_server.broker.messages import Keys, job_item
from keras_server.broker.pending_callbacks import PendingCallbacks
from keras_server.broker.scripts import CLAIM, REQUEUE, SWEEP, WAKEUP_TOKENS
from keras_server.broker.shards import Shard

log = logging.getLogger(__name__)

Pipeline = redis.client.Pipeline

# BLPOP and BLMOVE treat a timeout of 0 as "forever": never let rounding get us there.
MIN_BLOCK_S = 0.01


@dataclass
class Finished:
    """What one `finish` did to jobs: the jobs it completed, and the items
    it recorded in their jobs (a requeued item answered twice counts once)."""

    jobs_done: list[str] = field(default_factory=list)
    items_succeeded: int = 0
    items_failed: int = 0


class QueueFull(Exception):
    """The queue holds --max-queue requests already: come back later."""


class RequestQueue(Liveness):
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
        then from the model's (requests queued while no worker was live, or
        for workers whose queue names no version, those swept off a version
        whose last worker left, and a job's items); "": the model's queue
        alone. Results, claims, heartbeats and jobs are the model's (`keys`)
        either way. `registry`: the deployment's models hash (`Keys.models`),
        where each heartbeat names the model and its queue; "": not written."""
        if levels < 1:
            raise ValueError(f"{levels} priority levels")
        self.shard = shard
        self.client = shard.client
        self.keys = keys
        self.levels = levels
        self.version = version
        self.registry = registry
        self._unreadable: set[str] = set()  # workers of another format, logged once
        # Where pushes go and what `depths` counts.
        self.queue_keys = keys.for_version(version) if version else keys
        self._claim = self.client.register_script(CLAIM)
        self._requeue = self.client.register_script(REQUEUE)
        self._sweep = self.client.register_script(SWEEP)
        self.jobs = JobStore(self.client, keys)
        self.callbacks = PendingCallbacks(self.client, keys)

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

    def _take(
        self, worker_id: str, count: int, max_lower: int, protected: int = 1
    ) -> tuple[list[bytes], int]:
        """(up to `count` requests moved to the worker's processing list,
        highest level first, at most `max_lower` from below level `protected`;
        how many of them came from below it)."""
        # A version's worker takes its own queue's level first, then the
        # model's, level by level.
        sources = [self.queue_keys, self.keys] if self.version else [self.keys]
        queues = [q.queue_at(level) for level in range(1, self.levels + 1) for q in sources]
        keys = [self.keys.processing(worker_id), *self._wakeups(), *queues]
        args = [count, max(max_lower, 0), len(sources) * protected, len(sources)]
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

    def claim_first(
        self, worker_id: str, wait: float, protected: int | None = None
    ) -> bytes | None:
        """Block up to `wait` s for one request, from the highest level that
        holds any (with `protected`, a level: from that level's list alone),
        and move it to the processing list."""
        if protected is not None:
            # The worker's hold for its protected level L, whose requests
            # (and those above it) should go before lower work. One list:
            # BLMOVE blocks on it, atomically, without tokens. Not a loop on
            # the wake-up list: its tokens stay while lower levels hold
            # anything, so that loop would spin for the whole hold. A request
            # above L (no batch held one for a second, or L would be its
            # level) waits out the hold at most, then goes first.
            block = max(wait, MIN_BLOCK_S)
            processing = self.keys.processing(worker_id)
            with self.shard.watch():
                found: bytes | None = self.shard.block(
                    "BLMOVE", self.queue_keys.queue_at(protected), processing, "LEFT", "RIGHT",
                    block, seconds=block,
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
                return None

    def claim_more(
        self,
        worker_id: str,
        max_items: int,
        until: float,
        max_lower: int | None = None,
        protected: int = 1,
    ) -> list[bytes]:
        """Take up to `max_items` more, at most `max_lower` of them from below
        level `protected` (default: no limit): whatever is queued, highest
        level first, and then, until the monotonic time `until`, whatever
        arrives (mosec-style batch filling)."""
        lower_left = max_items if max_lower is None else max_lower
        items: list[bytes] = []
        while len(items) < max_items:
            taken, lowered = self._take(worker_id, max_items - len(items), lower_left, protected)
            items += taken
            lower_left -= lowered
            remaining = until - time.monotonic()
            if len(items) >= max_items or remaining < MIN_BLOCK_S:
                break
            if not self._wait_for_push(remaining):
                items += self._take(worker_id, max_items - len(items), lower_left, protected)[0]
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
