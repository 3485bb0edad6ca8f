"""Several Redis instances ("shards"), each holding its own copy of the queue.

A web server knows every shard. Each request goes to one: the shorter queue
of two random shards that are up (power of two choices, counting the
requests at the request's level and above, those it would wait behind), and
its result is awaited on that same shard. A shard that fails is skipped,
without asking it anything, until its probe hears it again (shards.Shard,
one per Redis URL and process). A worker serves one shard or several (one
claim loop per shard, sharing the model: see worker.FairLock).

A model's queue spread over several hash tags (--queue-partitions, e.g.
over a Redis Cluster's masters) is one queue per partition here, each
picked like a shard; their Redis is one Shard, up or down as a whole.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import redis

from keras_server.broker.failures import Kind, kind_of
from keras_server.broker.messages import Keys
from keras_server.broker.request_queue import RequestQueue

__all__ = ["NoShardUp", "ShardSet"]


class NoShardUp(redis.ConnectionError):
    """Every shard is marked down; nothing was asked of any of them."""


def unreachable(exc: BaseException) -> bool:
    return kind_of(exc) is Kind.UNREACHABLE


class ShardSet:
    """One model's queues, one on each shard. Which shards are down is the
    shards' own record (shards.Shard), shared by every model."""

    def __init__(self, queues: Sequence[RequestQueue], rng: random.Random | None = None) -> None:
        if not queues:
            raise ValueError("at least one shard")
        self.queues = list(queues)
        self._rng = rng or random.Random()

    @classmethod
    def connect(
        cls,
        urls: Sequence[str],
        keys: Keys,
        *,
        timeout: float,
        levels: int = 1,
        partitions: int = 1,
    ) -> ShardSet:
        """The model's queue on each of `urls`, on each of its `partitions`
        hash tags there (Keys.partitions): a partition is picked, pushed to
        and awaited on like a shard of its own."""
        return cls(
            [
                RequestQueue.open(url, part, timeout=timeout, levels=levels)
                for url in urls
                for part in keys.partitions(partitions)
            ]
        )

    def up(self) -> list[RequestQueue]:
        """The shards not marked down, without asking any of them."""
        return [q for q in self.queues if not q.shard.is_down()]

    def pick(self, level: int = 1) -> RequestQueue:
        """The shorter queue of two random shards that are up, counting the
        requests a request at `level` would wait behind (levels 1 .. `level`)."""
        candidates = self.up()
        if not candidates:
            raise NoShardUp("no Redis shard is reachable")
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(candidates, 2)
        depths = {}
        for queue in (first, second):
            try:
                depths[id(queue)] = queue.depth(up_to=level)
            except redis.RedisError as exc:
                if not unreachable(exc):
                    raise  # marked down by the queue: the other one is asked
        if not depths:
            return first  # both failed just now: let the caller's push report it
        return min((first, second), key=lambda q: depths.get(id(q), float("inf")))

    def push(self, payload: bytes, max_depth: int, level: int = 1) -> RequestQueue:
        """Queue `payload` on a picked shard; returns the shard that took it."""
        return self.push_all([payload], max_depth, level)

    def push_all(self, payloads: Sequence[bytes], max_depth: int, level: int = 1) -> RequestQueue:
        """Queue several requests on one picked shard, all or none (see
        `RequestQueue.push_all`); returns the shard that took them, where
        they will be answered. A shard found unreachable is skipped and one
        other is tried; QueueFull and other errors propagate. A timed-out
        push may still have landed on the silent shard: its worker skips the
        copies once their deadline has passed, and nobody collects them."""
        queue = self.pick(level)
        try:
            queue.push_all(payloads, max_depth=max_depth, level=level)
            return queue
        except redis.RedisError as exc:
            others = [q for q in self.up() if q is not queue]
            if not unreachable(exc) or not others:
                raise
        retry = self._rng.choice(others)
        retry.push_all(payloads, max_depth=max_depth, level=level)
        return retry
