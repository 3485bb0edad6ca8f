"""A model's traffic policy in Redis: one copy on each shard, kept the same.

The policy itself (a JSON object) is serving/traffic.py's; this module only keeps
its copies consistent, so that every web process routes by the same one:

- Each copy carries a `stamp` (microseconds since the epoch, and always past
  every stamp the writer read first, so one writer's changes are in order
  whatever the clocks say). Copies are ordered by (stamp, bytes): a total
  order, so two writes racing on several shards still settle on one.
- A write goes to every shard not marked down, each with a compare-and-set
  that never replaces a newer copy (`_SET_IF_NEWER`).
- A read asks every shard that is up and takes the newest copy whole, from
  one shard (never a mix). A shard holding an older copy, or none (one that
  was down, or hung, during a write, or restarted empty), is brought up to
  date on the spot: a shard that comes back never makes a process route by
  what it missed.

Stored before stamps existed (by an older web server), a copy counts as
stamp 0: older than any stamped one. `latest` is stored too, not deleted, so
that it outranks the weights it replaced on a shard that missed it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import redis

from keras_server.broker.placement import NoShardUp, ShardSet
from keras_server.broker.request_queue import RequestQueue

log = logging.getLogger(__name__)

STAMP = "stamp"

# KEYS: the policy key. ARGV: the new copy, its stamp. Sets it unless the
# copy there is as new or newer, by (stamp, bytes); returns 1 if it did.
_SET_IF_NEWER = """
local current = redis.call('GET', KEYS[1])
if current then
  local stamp = 0
  local ok, body = pcall(cjson.decode, current)
  if ok and type(body) == 'table' and type(body.stamp) == 'number' then stamp = body.stamp end
  local new = tonumber(ARGV[2])
  if stamp > new or (stamp == new and current >= ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


def stamp_of(raw: bytes | None) -> int:
    """A stored copy's stamp; 0 for none, or for one without a stamp."""
    if raw is None:
        return 0
    try:
        stamp = json.loads(raw).get(STAMP, 0)
    except (ValueError, AttributeError):
        return 0
    return int(stamp) if isinstance(stamp, int | float) and not isinstance(stamp, bool) else 0


def _order(raw: bytes | None) -> tuple[int, bytes]:
    return stamp_of(raw), raw or b""


def _get(queue: RequestQueue) -> bytes | None:
    with queue.shard.watch():
        raw: bytes | None = queue.client.get(queue.keys.traffic)
    return raw


def _set_if_newer(queue: RequestQueue, raw: bytes) -> bool:
    script = queue.client.register_script(_SET_IF_NEWER)
    with queue.shard.watch():
        return bool(script(keys=[queue.keys.traffic], args=[raw, stamp_of(raw)]))


def read(shards: ShardSet) -> bytes | None:
    """The newest copy among the shards that answer (None: none holds one,
    or none answered); each answering shard with an older copy gets the
    newest written back."""
    found: list[tuple[RequestQueue, bytes | None]] = []
    for queue in shards.up():
        try:
            found.append((queue, _get(queue)))
        except redis.RedisError as exc:
            log.debug("traffic policy on %s unreadable (%s)", queue.shard.name, exc)
    if not found:
        return None
    newest = max((raw for _, raw in found), key=_order)
    if newest is None:
        return None
    for queue, raw in found:
        if _order(raw) < _order(newest):
            try:
                _set_if_newer(queue, newest)
            except redis.RedisError as exc:
                log.warning(
                    "traffic policy on %s is stale and could not be updated (%s)",
                    queue.shard.name,
                    exc,
                )
            else:
                log.info("traffic policy on %s was stale: brought up to date", queue.shard.name)
    return newest


def write(shards: ShardSet, policy: Mapping[str, Any]) -> list[str]:
    """Store `policy` (a JSON object) on every shard that is up, stamped newer
    than any copy there; returns the shards written. NoShardUp when none
    was; a shard that fails is logged and left to be brought up to date by
    the next read once it answers."""
    queues = shards.up()
    seen = 0
    for queue in queues:
        try:
            seen = max(seen, stamp_of(_get(queue)))
        except redis.RedisError as exc:
            log.debug("traffic policy on %s unreadable (%s)", queue.shard.name, exc)
    stamp = max(time.time_ns() // 1000, seen + 1)
    raw = json.dumps({**policy, STAMP: stamp}, sort_keys=True).encode()
    written = []
    for queue in queues:
        if queue.shard.is_down():
            continue  # found unreachable just now: not asked again
        try:
            _set_if_newer(queue, raw)
        except redis.RedisError as exc:
            log.warning(
                "traffic policy not written on %s (%s): it is brought up to date once it answers",
                queue.shard.name,
                exc,
            )
            continue
        written.append(queue.shard.name)
    if not written:
        raise NoShardUp("no Redis shard took the traffic policy")
    return written
