"""Several Redis instances ("shards"), each holding its own copy of the queue.

A web server knows every shard. Each request goes to one: the shorter queue
of two random healthy shards (power of two choices), and its result is
awaited on that same shard. A shard that fails is skipped for a short
cool-down, then tried again. A worker serves one shard or several (one claim
loop per shard, sharing the model: see worker.FairLock).

With one shard all of this reduces to that shard.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence

import redis

from .protocol import Keys
from .queue import RequestQueue, connect

log = logging.getLogger(__name__)

COOLDOWN_S = 2.0


def label(url: str) -> str:
    """host:port/db of a Redis URL, without any password: safe for logs and metrics."""
    kwargs = redis.connection.parse_url(url)
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


class ShardSet:
    def __init__(
        self,
        queues: Sequence[RequestQueue],
        names: Sequence[str],
        rng: random.Random | None = None,
    ) -> None:
        if not queues or len(queues) != len(names):
            raise ValueError("one name per shard, at least one shard")
        self.queues = list(queues)
        self.names = dict(zip(map(id, queues), names, strict=True))
        self._down_until: dict[int, float] = {}
        self._lock = threading.Lock()
        self._rng = rng or random.Random()

    @classmethod
    def connect(cls, urls: Sequence[str], keys: Keys, block_seconds: float) -> ShardSet:
        queues = [RequestQueue(connect(url, block_seconds=block_seconds), keys) for url in urls]
        return cls(queues, [label(url) for url in urls])

    def name(self, queue: RequestQueue) -> str:
        return self.names[id(queue)]

    def healthy(self) -> list[RequestQueue]:
        now = time.monotonic()
        with self._lock:
            up = [q for q in self.queues if self._down_until.get(id(q), 0) <= now]
        # All marked down: try them all rather than refuse without asking.
        return up or list(self.queues)

    def mark_down(self, queue: RequestQueue, error: Exception) -> None:
        with self._lock:
            self._down_until[id(queue)] = time.monotonic() + COOLDOWN_S
        log.warning(
            "Redis shard %s failed (%s); skipping it for %g s", self.name(queue), error, COOLDOWN_S
        )

    def pick(self) -> RequestQueue:
        """The shorter queue of two random healthy shards."""
        candidates = self.healthy()
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(candidates, 2)
        depths = {}
        for queue in (first, second):
            try:
                depths[id(queue)] = queue.depth()
            except redis.ConnectionError as exc:
                self.mark_down(queue, exc)
        if not depths:
            return first  # both failed just now: let the caller's push report it
        return min((first, second), key=lambda q: depths.get(id(q), float("inf")))

    def push(self, payload: bytes, max_depth: int) -> RequestQueue:
        """Queue `payload` on a picked shard; returns the shard that took it.

        A shard that cannot be reached is marked down and one other is tried.
        QueueFull and other errors propagate.
        """
        queue = self.pick()
        try:
            queue.push(payload, max_depth=max_depth)
            return queue
        except redis.ConnectionError as exc:
            self.mark_down(queue, exc)
            others = [q for q in self.healthy() if q is not queue]
            if not others:
                raise
        retry = self._rng.choice(others)
        retry.push(payload, max_depth=max_depth)
        return retry

    def push_all(self, payloads: Sequence[bytes], max_depth: int) -> RequestQueue:
        """Queue several requests on one picked shard, all or none (see
        `RequestQueue.push_all`): they are answered on that same shard."""
        queue = self.pick()
        try:
            queue.push_all(payloads, max_depth=max_depth)
            return queue
        except redis.ConnectionError as exc:
            self.mark_down(queue, exc)
            others = [q for q in self.healthy() if q is not queue]
            if not others:
                raise
        retry = self._rng.choice(others)
        retry.push_all(payloads, max_depth=max_depth)
        return retry
