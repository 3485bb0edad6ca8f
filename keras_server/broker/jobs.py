"""Asynchronous jobs in Redis: the record, the items waiting, the results.

A job is made by the web tier (`POST /jobs`) and driven by the workers, so it
goes on whatever web server took it: killed after its 202, nothing is lost.

- `stage` writes the job's encoded requests (decoded images, as any queued
  request) to its own items list, a chunk at a time, so the web process
  never holds them all; `create` then writes the record, the file names and
  the items that failed to decode, and adds the job to the set of jobs to
  feed, in one MULTI/EXEC. Until then nothing runs, and the staged list
  expires with the job's TTL if the web server dies first.
- `feed` moves items from the jobs' lists onto the model's queue, round robin
  between jobs, only while the queue holds fewer than a target (a couple of
  batches): a job's thousand images never sit in the queue at once, and a
  request queued meanwhile waits behind at most that many. Every claim loop
  calls it before it claims (one Lua call), and the web tier once after
  `create`, so an idle worker wakes at once. Moved by one script, an item is
  always in exactly one list; from the queue on, the queue's crash-safe
  claims keep it (a worker killed mid-batch: its claims are requeued).
- The worker answers an item (its request id names the job and the index:
  messages.job_item) by `record`, inside the MULTI/EXEC that releases its
  claim: the result lands in the job's results hash once (HSETNX: a requeued
  item run twice counts once), the counts move, and the last one marks the
  job done and renews its TTL (`--job-ttl` from completion); a job with a
  callback_url then has its callback pending (`Keys.callbacks`), in the same
  script, so it is delivered even if the worker dies the next moment
  (pending_callbacks.py; a job done at `create`, every item undecodable, too).
- `cancel` marks the record cancelled and deletes the items not yet fed;
  items already on the queue are dropped by the worker before they reach
  the model (`cancelled`), so no item not yet run is ever run.

Every key name comes from messages.Keys. The feed script reads the items
lists of the jobs named in the set, keys it builds from the prefix it is
given: they share the queue's hash tag (messages.Keys), so on a Redis
Cluster they are on the script's own slot.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.cluster import ClusterPipeline

from keras_server.broker.messages import Keys

log = logging.getLogger(__name__)

Pipeline = redis.client.Pipeline

# KEYS: jobs set, queue. ARGV: the job keys' prefix ("<queue-name>:job:"), the
# queue depth to fill up to. Round robin over the jobs; a job whose items are
# all moved leaves the set. Returns how many items were moved.
_FEED = """
local want = tonumber(ARGV[2]) - redis.call('LLEN', KEYS[2])
if want <= 0 then return 0 end
local ids = redis.call('SMEMBERS', KEYS[1])
local moved = 0
local live = #ids
while want > 0 and live > 0 do
  live = 0
  for _, id in ipairs(ids) do
    if want > 0 then
      local item = redis.call('LMOVE', ARGV[1] .. id .. ':items', KEYS[2], 'LEFT', 'RIGHT')
      if item then
        moved = moved + 1
        want = want - 1
        live = live + 1
      else
        redis.call('SREM', KEYS[1], id)
      end
    end
  end
end
return moved
"""

# KEYS: the job's record, items, names, results (Keys.job_keys), the pending callbacks. ARGV:
# index, result, "1" if it failed, TTL in ms, now, job id. Returns 0 (ignored:
# no such job, cancelled, or the item answered already), 1 (recorded), 2
# (recorded, and the job is done: its callback, if it has one, is pending).
_RECORD = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'cancelled' or state == 'done' then return 0 end
if redis.call('HSETNX', KEYS[4], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[3] == '1' and 'failed' or 'succeeded', 1)
local counts = redis.call('HMGET', KEYS[1], 'succeeded', 'failed', 'total')
if tonumber(counts[1]) + tonumber(counts[2]) >= tonumber(counts[3]) then
  redis.call('HSET', KEYS[1], 'state', 'done', 'finished', ARGV[5])
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
  local url = redis.call('HGET', KEYS[1], 'callback_url')
  if url and url ~= '' then redis.call('ZADD', KEYS[5], ARGV[5], ARGV[6]) end
  return 2
end
if state == 'queued' then redis.call('HSET', KEYS[1], 'state', 'running') end
return 1
"""

# KEYS: the job's record, its items, the jobs set. ARGV: job id, now. Returns
# 1 if cancelled now, 0 if it had ended already (done or cancelled).
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished', ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Job:
    """A job's record as read back."""

    id: str
    state: str
    model: str
    owner: str
    total: int
    succeeded: int
    failed: int
    created: float
    finished: float | None
    callback_url: str

    @classmethod
    def decode(cls, job_id: str, fields: dict[bytes, bytes]) -> Job:
        text = {k.decode(): v.decode() for k, v in fields.items()}
        return cls(
            id=job_id,
            state=text["state"],
            model=text.get("model", ""),
            owner=text.get("owner", ""),
            total=int(text["total"]),
            succeeded=int(text.get("succeeded", 0)),
            failed=int(text.get("failed", 0)),
            created=float(text.get("created", 0)),
            finished=float(text["finished"]) if text.get("finished") else None,
            callback_url=text.get("callback_url", ""),
        )

    def summary(self) -> dict[str, Any]:
        """Its state and counts, as `GET /jobs/<id>` and the callback say them."""
        return {
            "id": self.id,
            "state": self.state,
            "model": self.model,
            "total": self.total,
            "done": self.succeeded + self.failed,
            "succeeded": self.succeeded,
            "failed": self.failed,
        }


class JobStore:
    """The jobs of one model's queue on one Redis (`client`, `keys`)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._feed = client.register_script(_FEED)
        self._record = client.register_script(_RECORD)
        self._cancel = client.register_script(_CANCEL)

    # -- web side ---------------------------------------------------------

    def backlog(self) -> int:
        """Items of every job not yet moved onto the queue."""
        ids = [m.decode() for m in self.client.smembers(self.keys.jobs)]
        if not ids:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.llen(self.keys.job_items(job_id))
        return sum(int(n) for n in pipe.execute())

    def stage(self, job_id: str, payloads: Sequence[bytes], ttl: float) -> None:
        """Append encoded requests to the job's items (not fed until `create`)."""
        if not payloads:
            return
        key = self.keys.job_items(job_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.rpush(key, *payloads)
        pipe.pexpire(key, _ms(ttl))
        pipe.execute()

    def discard(self, job_id: str) -> None:
        """Forget a job whose submission failed before `create`."""
        self.client.delete(*self.keys.job_keys(job_id))

    def create(
        self,
        job_id: str,
        *,
        model: str,
        owner: str,
        names: Sequence[str],
        failures: dict[int, bytes],
        ttl: float,
        callback_url: str = "",
    ) -> bool:
        """Write the record and make the job's staged items runnable; True when
        nothing is left to run (every item failed to decode): it is done."""
        now = time.time()
        done = len(failures) == len(names)
        record: dict[str, Any] = {
            "state": "done" if done else "queued",
            "model": model,
            "owner": owner,
            "total": len(names),
            "succeeded": 0,
            "failed": len(failures),
            "created": repr(now),
            "callback_url": callback_url,
        }
        if done:
            record["finished"] = repr(now)
        keys = self.keys
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(keys.job(job_id), mapping=record)
        if names:
            pipe.rpush(keys.job_names(job_id), *names)
        if failures:
            pipe.hset(keys.job_results(job_id), mapping={str(i): r for i, r in failures.items()})
        for key in keys.job_keys(job_id):
            pipe.pexpire(key, _ms(ttl))
        if not done:
            pipe.sadd(keys.jobs, job_id)
        elif callback_url:
            pipe.zadd(keys.callbacks, {job_id: now})  # due now, as _RECORD adds it
        pipe.execute()
        return done

    def get(self, job_id: str) -> Job | None:
        fields = self.client.hgetall(self.keys.job(job_id))
        return Job.decode(job_id, fields) if fields else None

    def items(self, job: Job, offset: int, limit: int) -> list[tuple[str, bytes | None]]:
        """(file name, result or None while it has none) of items offset ..
        offset + limit - 1, in submission order."""
        if limit <= 0 or offset >= job.total:
            return []
        last = min(offset + limit, job.total) - 1
        pipe = self.client.pipeline(transaction=False)
        pipe.lrange(self.keys.job_names(job.id), offset, last)
        pipe.hmget(self.keys.job_results(job.id), [str(i) for i in range(offset, last + 1)])
        names, results = pipe.execute()
        return [(n.decode("utf-8", "replace"), r) for n, r in zip(names, results, strict=False)]

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job: True if it was, False if it had ended."""
        keys = [self.keys.job(job_id), self.keys.job_items(job_id), self.keys.jobs]
        return bool(self._cancel(keys=keys, args=[job_id, repr(time.time())]))

    # -- both sides ---------------------------------------------------------

    def feed(self, depth: int, queue: str | None = None) -> int:
        """Move job items onto the queue until it holds `depth`; how many moved.

        `queue` (default: the model's queue) is where job items wait: the
        lowest priority level once levels exist."""
        prefix = self.keys.job("")
        target = queue or self.keys.queue
        return int(self._feed(keys=[self.keys.jobs, target], args=[prefix, depth]))

    # -- worker side ----------------------------------------------------------

    def cancelled(self, job_ids: Iterable[str]) -> set[str]:
        """Which of `job_ids` must not run: cancelled, or gone (expired)."""
        ids = sorted(set(job_ids))
        if not ids:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self.keys.job(job_id), "state")
        states = pipe.execute()
        return {i for i, s in zip(ids, states, strict=True) if s in (None, b"cancelled")}

    def record(self, pipe: Pipeline, job_id: str, index: int, result: bytes, ttl: float) -> bool:
        """Queue in `pipe` the recording of one item's result; its reply in the
        transaction is 0 when it was ignored, 2 when this completes the job
        (see `recorded`, `completed`). Returns whether the result is a failure."""
        failed = not json.loads(result).get("success", False)
        keys = [*self.keys.job_keys(job_id), self.keys.callbacks]
        args = [index, result, "1" if failed else "0", _ms(ttl), repr(time.time()), job_id]
        if isinstance(pipe, ClusterPipeline):
            # EVALSHA in a cluster's transaction cannot load a script the
            # node lacks (a replica just promoted, say): NOSCRIPT would fail
            # this command alone and the rest of the transaction run. The
            # script's text costs a few hundred bytes per item.
            pipe.execute_command("EVAL", _RECORD, len(keys), *keys, *args)
            return None
        self._record(keys=keys, args=args, client=pipe)
        return failed


def recorded(reply: object) -> bool:
    """Whether a `record` reply says the item's result was recorded (not
    ignored: no such job, cancelled, or the item answered already)."""
    return reply in (1, 2)


def completed(reply: object) -> bool:
    """Whether a `record` reply says the job is now done."""
    return reply == 2


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)
