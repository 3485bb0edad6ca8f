"""The Redis queue between web servers and model workers.

Web side: `push` a request, then `wait_result` blocks in Redis (BLPOP) on that
request's own result key. Worker side: `claim` blocks for the first queued
request, then takes up to a batch more in one MULTI/EXEC (LRANGE + LTRIM), so
any number of workers can share a queue with no request taken twice and none
lost; `put_results` answers a batch in one round trip.

Methods that write take an optional pipeline so a caller can make several
writes one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .protocol import Keys

Pipeline = redis.client.Pipeline


def connect(url: str, *, block_seconds: float) -> redis.Redis:
    """A client for `url` whose reads outlast a blocking call of `block_seconds`.

    Connecting fails fast and nothing is retried behind our back: the web tier
    must answer 503 promptly while Redis is down, and the worker loop has its
    own backoff.
    """
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=2.0,
        socket_timeout=block_seconds + 5.0,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )


class RequestQueue:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    # -- web side ---------------------------------------------------------

    def push(self, payload: bytes, pipe: Pipeline | None = None) -> None:
        (pipe or self.client).rpush(self.keys.queue, payload)

    def wait_result(self, request_id: str, timeout: float) -> bytes | None:
        """Block until the worker answers `request_id`, or `timeout` passes.

        BLPOP both waits and removes the answer, so nothing is left behind.
        """
        # BLPOP treats 0 as "forever": never let rounding get us there.
        reply = self.client.blpop([self.keys.result(request_id)], timeout=max(timeout, 0.01))
        return None if reply is None else reply[1]

    def depth(self) -> int:
        return int(self.client.llen(self.keys.queue))

    # -- worker side ------------------------------------------------------

    def claim(self, max_items: int, wait: float) -> list[bytes]:
        """Take up to `max_items` requests, oldest first; [] if none came in `wait` s.

        Blocks in Redis for the first one (no polling), then takes whatever else
        is already queued, atomically, up to the batch size.
        """
        first = self.client.blpop([self.keys.queue], timeout=max(wait, 0.01))
        if first is None:
            return []
        if max_items == 1:
            return [first[1]]
        with self.client.pipeline(transaction=True) as pipe:
            pipe.lrange(self.keys.queue, 0, max_items - 2)
            pipe.ltrim(self.keys.queue, max_items - 1, -1)
            rest, _ = pipe.execute()
        return [first[1], *rest]

    def put_results(
        self, results: Mapping[str, bytes], ttl: float, pipe: Pipeline | None = None
    ) -> None:
        """Answer each request id; answers nobody collects expire after `ttl` s."""
        if not results:
            return
        own = pipe is None
        p = self.client.pipeline(transaction=False) if own else pipe
        for request_id, payload in results.items():
            key = self.keys.result(request_id)
            p.rpush(key, payload)
            p.pexpire(key, max(int(ttl * 1000), 1))
        if own:
            p.execute()
