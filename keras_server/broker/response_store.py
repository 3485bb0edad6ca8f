"""The response cache's Redis: read and write cached answers, and never fill
a Redis that the queue needs.

The serving core (serving/cache.py) decides what is cached and under which
key (messages.Keys.cached); this module only talks to Redis. The store is
one Redis (`--response-cache-url`, default the first --redis-url), reached
through this process's `shards.Shard` for that URL: when it is the
queue's Redis, the cache shares its connections and its health record, so a
host found unreachable is skipped by both until its probe hears it again.
Every command goes through `Shard.watch`; errors reach the caller, who
classifies them (failures.py) and counts them.

Bounded memory. A Redis with `maxmemory` and an `allkeys-*` eviction policy
(the production setup: a Redis of its own for the cache) evicts old entries
by itself, so writes always go. Under any other policy (`noeviction`, the
queue's; `volatile-*`, which would evict the queue's result keys and
heartbeats first), Redis refuses writes only when it is full, and then it
refuses the queue's too: so the store stops writing (`CacheFull`) once the
Redis uses FULL_SHARE of its maxmemory, read with INFO every ROOM_CHECK_S,
and leaves the rest to the queue. Without maxmemory nothing bounds it but
the entries' TTL (docs/operations.md, "Response cache").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence

import redis

from keras_server.broker.failures import reason
from keras_server.broker.shards import Shard

log = logging.getLogger(__name__)

# Writes stop when a Redis without an allkeys-* policy is this full.
FULL_SHARE = 0.9
# How often the Redis's memory is read (INFO memory) to decide that.
ROOM_CHECK_S = 1.0


class CacheDown(Exception):
    """The cache's Redis is marked down (see shards.Shard): nothing was asked."""


class CacheFull(Exception):
    """The cache's Redis is too full to write to without starving the queue."""


class ResponseStore:
    """Cached answers in one Redis, shared by every web process that names it."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.client = shard.client
        self._lock = threading.Lock()
        self._room: tuple[float, bool] = (-ROOM_CHECK_S, True)  # (checked at, writes go)
        self._info_refused = False

    @classmethod
    def open(cls, url: str, *, timeout: float) -> ResponseStore:
        return cls(Shard.of(url, timeout))

    @property
    def name(self) -> str:
        return self.shard.name

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The answers cached under `keys`, None where there is none.
        CacheDown when the host is marked down; redis-py errors as they come."""
        self._check_up()
        with self.shard.watch():
            if len(keys) == 1:  # the common case: GET costs a little less than MGET
                return [self.client.get(keys[0])]
            found: list[bytes | None] = self.client.mget(keys)
        return found

    def put_many(self, entries: Mapping[str, bytes], ttl: float) -> None:
        """Store `entries` for `ttl` seconds, in one round trip. CacheDown,
        CacheFull (nothing written), or redis-py's errors."""
        self._check_up()
        if not self._has_room():
            raise CacheFull(f"Redis at {self.name} is {FULL_SHARE:.0%} full")
        px = max(int(ttl * 1000), 1)
        if len(entries) == 1:  # a pipeline object costs more than the command
            ((key, value),) = entries.items()
            with self.shard.watch():
                self.client.set(key, value, px=px)
            return
        pipe = self.client.pipeline(transaction=False)
        for key, value in entries.items():
            pipe.set(key, value, px=px)
        with self.shard.watch():
            pipe.execute()

    def _check_up(self) -> None:
        down = self.shard.down_reason()
        if down is not None:
            raise CacheDown(down)

    def _has_room(self) -> bool:
        """Whether a write leaves the Redis its headroom (read at most every
        ROOM_CHECK_S; concurrent callers may read it twice, harmlessly)."""
        now = time.monotonic()
        with self._lock:
            checked, room = self._room
        if now - checked < ROOM_CHECK_S:
            return room
        if self._info_refused:
            return True
        try:
            with self.shard.watch():
                info = self.client.info("memory")
        except redis.ResponseError as exc:
            # INFO refused (an ACL without +info: it is in @dangerous): the
            # Redis's own limit still refuses writes when it is full; never
            # asked again.
            log.warning(
                "response cache at %s: INFO refused (%s); writes go on until Redis itself "
                "refuses them (allow +info to keep %.0f%% free for the queue)",
                self.name,
                reason(exc),
                100 * (1 - FULL_SHARE),
            )
            self._info_refused = True
            return True
        limit = int(info.get("maxmemory", 0))
        policy = str(info.get("maxmemory_policy", "noeviction"))
        room = (
            limit == 0
            or policy.startswith("allkeys")
            or (int(info.get("used_memory", 0)) < FULL_SHARE * limit)
        )
        with self._lock:
            if room != self._room[1]:
                log.warning(
                    "response cache at %s: %s",
                    self.name,
                    "writing again"
                    if room
                    else f"{FULL_SHARE:.0%} of maxmemory used "
                    f"under {policy}: no more writes until it drops",
                )
            self._room = (now, room)
        return room
