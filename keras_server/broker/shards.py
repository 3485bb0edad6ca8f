"""Several Redis instances ("shards"), each holding its own copy of the queue.

A web server knows every shard. Each request goes to one: the shorter queue
of two random shards that are up (power of two choices), and its result is
awaited on that same shard. A shard that fails — refuses connections, or
stays silent past --redis-timeout like a hung host — is marked down: requests
skip it without asking it anything, and a background probe pings it until it
answers again. A worker serves one shard or several (one claim loop per
shard, sharing the model: see worker.FairLock).

With one shard all of this reduces to that shard.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence

import redis

from keras_server.broker.messages import Keys
from keras_server.broker.request_queue import RequestQueue, parse_sentinel_url

log = logging.getLogger(__name__)

# How often a down shard is pinged to see whether it is back.
PROBE_INTERVAL_S = 0.5

# What a shard that cannot answer raises: refused or reset connections, and
# reads that time out on a host that keeps its connections open but is silent.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


class NoShardUp(redis.ConnectionError):
    """Every shard is marked down; nothing was asked of any of them."""


def label(url: str) -> str:
    """host:port/db of a Redis URL, without any password: safe for logs and metrics."""
    if url.startswith("redis+sentinel://"):
        _, master, db, _ = parse_sentinel_url(url)
        return f"sentinel:{master}/{db}"
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
        self._down: set[int] = set()
        self._lock = threading.Lock()
        self._probing = False
        self._rng = rng or random.Random()

    @classmethod
    def connect(
        cls, urls: Sequence[str], keys: Keys, *, timeout: float, wait_timeout: float
    ) -> ShardSet:
        queues = [
            RequestQueue.open(url, keys, timeout=timeout, wait_timeout=wait_timeout) for url in urls
        ]
        return cls(queues, [label(url) for url in urls])

    def name(self, queue: RequestQueue) -> str:
        return self.names[id(queue)]

    def is_down(self, queue: RequestQueue) -> bool:
        with self._lock:
            return id(queue) in self._down

    def up(self) -> list[RequestQueue]:
        """The shards not marked down, without asking any of them."""
        with self._lock:
            return [q for q in self.queues if id(q) not in self._down]

    def mark_down(self, queue: RequestQueue, error: Exception) -> None:
        """Skip `queue` until the probe hears from it again."""
        with self._lock:
            newly = id(queue) not in self._down
            self._down.add(id(queue))
            start_probe = not self._probing
            self._probing = True
        if newly:
            log.warning(
                "Redis shard %s failed (%s); skipping it until it answers", self.name(queue), error
            )
        if start_probe:
            threading.Thread(target=self._probe, name="shard-probe", daemon=True).start()

    def _probe(self) -> None:
        """Ping the down shards until every one answers again."""
        event = threading.Event()
        while True:
            with self._lock:
                down = [q for q in self.queues if id(q) in self._down]
                if not down:
                    self._probing = False
                    return
            for queue in down:
                try:
                    queue.client.ping()
                except redis.RedisError:
                    continue
                with self._lock:
                    self._down.discard(id(queue))
                log.info("Redis shard %s answers again", self.name(queue))
            event.wait(PROBE_INTERVAL_S)

    def pick(self) -> RequestQueue:
        """The shorter queue of two random shards that are up."""
        candidates = self.up()
        if not candidates:
            raise NoShardUp("no Redis shard is reachable")
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(candidates, 2)
        depths = {}
        for queue in (first, second):
            try:
                depths[id(queue)] = queue.depth()
            except UNREACHABLE as exc:
                self.mark_down(queue, exc)
        if not depths:
            return first  # both failed just now: let the caller's push report it
        return min((first, second), key=lambda q: depths.get(id(q), float("inf")))

    def push(self, payload: bytes, max_depth: int) -> RequestQueue:
        """Queue `payload` on a picked shard; returns the shard that took it."""
        return self.push_all([payload], max_depth)

    def push_all(self, payloads: Sequence[bytes], max_depth: int) -> RequestQueue:
        """Queue several requests on one picked shard, all or none (see
        `RequestQueue.push_all`); returns the shard that took them, where
        they will be answered.

        A shard that cannot be reached is marked down and one other is tried.
        A timed-out push may still have landed on the silent shard; if it wakes
        up, its worker skips the copies once their deadline has passed, and
        nobody collects an answer to them. QueueFull and other errors propagate.
        """
        queue = self.pick()
        try:
            queue.push_all(payloads, max_depth=max_depth)
            return queue
        except UNREACHABLE as exc:
            self.mark_down(queue, exc)
            others = [q for q in self.up() if q is not queue]
            if not others:
                raise
        retry = self._rng.choice(others)
        try:
            retry.push_all(payloads, max_depth=max_depth)
        except UNREACHABLE as exc:
            self.mark_down(retry, exc)
            raise
        return retry
