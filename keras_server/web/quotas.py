"""Quotas per API key, in the web tier: after auth.py has named the key,
`Limiter.admit` counts the request against the key's quota in Redis
(broker/quotas.py, shared by every web process and server) and refuses it
with a 429 when it is over.

Every request a key makes counts one, whatever its path or how many images
it carries (a gRPC call too: rpc/server.py asks `Limiter.check`, and answers
RESOURCE_EXHAUSTED when over); open paths and CORS preflights carry no key and count nothing.
A metered answer, refused or not, carries `RateLimit-Limit`,
`RateLimit-Remaining` and `RateLimit-Reset` (the IETF draft's fields); a 429
also `Retry-After`, in the shape of the API the path belongs to (errors.py).

The quota lives on the first Redis of --redis-url. When that Redis cannot be
asked (unreachable, or refusing: out of memory, read-only, ...; failures.py
decides), the request goes through unmetered: a quota is never the reason a
request fails. That is logged once when it starts and once when it ends, and
every such request is counted (`keras_server_api_key_requests_total` with
`quota="unenforced"`). Any other error is a bug, answered 500 by errors.py.
"""

from __future__ import annotations

import logging
import threading

import redis
from flask import Flask, Response, g

from keras_server import metrics
from keras_server.broker.failures import Kind, classify, reason
from keras_server.broker.messages import Keys
from keras_server.broker.quotas import Decision, Quota, Quotas
from keras_server.settings import Settings
from keras_server.web import errors

log = logging.getLogger(__name__)

PERIOD_WORDS = {1.0: "a second", 60.0: "a minute", 3600.0: "an hour", 86400.0: "a day"}


def describe(quota: Quota) -> str:
    """e.g. "10 requests a second, 20 at once"."""
    per = PERIOD_WORDS.get(quota.period, f"every {quota.period:g} s")
    requests = "request" if quota.rate == 1 else "requests"
    return f"{quota.rate} {requests} {per}, {quota.burst} at once"


def refusal(name: str, quota: Quota, decision: Decision) -> str:
    """What a request over its quota is told."""
    return (
        f"the API key {name!r} is over its quota of {describe(quota)}; retry in "
        f"{decision.headers['Retry-After']} s"
    )


class Limiter:
    """One web process's gate to the shared quotas."""

    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas
        self._lock = threading.Lock()
        self._unenforced = False  # since the last failure, until Redis answers again

    @classmethod
    def from_settings(cls, settings: Settings) -> Limiter:
        keys = Keys(settings.queue_name)
        return cls(Quotas.open(settings.redis_urls[0], keys, timeout=settings.redis_timeout))

    def check(self, name: str, quota: Quota | None) -> Decision | None:
        """Count one request of the key named `name` against `quota`, and say
        whether it is over (`Decision.allowed`); None when it is not metered:
        the key has no quota, or Redis could not be asked. Any front (HTTP,
        gRPC) answers the refusal in its own way."""
        if quota is None:
            metrics.API_KEY_REQUESTS.labels(name, "none").inc()
            return None
        try:
            decision = self.quotas.take(name, quota)
        except redis.RedisError as exc:
            kind = classify(exc)
            if kind is Kind.BUG:
                raise
            metrics.API_KEY_REQUESTS.labels(name, "unenforced").inc()
            self._note(failed=exc, kind=kind)
            return None
        self._note()
        metrics.API_KEY_REQUESTS.labels(name, "within" if decision.allowed else "over").inc()
        if not decision.allowed:
            log.warning("API key %r is over its quota (%s)", name, describe(quota))
        return decision

    def admit(self, name: str, quota: Quota | None) -> None:
        """`check`, for an HTTP request: errors.HttpError (429) when over; the
        decision of an admitted request is kept for `add_headers`."""
        decision = self.check(name, quota)
        if decision is None:
            return
        if not decision.allowed and quota is not None:
            raise errors.over_quota(refusal(name, quota, decision), decision.headers)
        g.quota_decision = decision

    def _note(self, failed: redis.RedisError | None = None, kind: Kind | None = None) -> None:
        """Log when quotas stop being enforced, and when they are again."""
        with self._lock:
            changed = self._unenforced != (failed is not None)
            self._unenforced = failed is not None
        if not changed:
            return
        if failed is not None and kind is not None:
            log.warning(
                "API key quotas are not enforced: Redis at %s is %s (%s); requests go "
                "through unmetered until it answers",
                self.quotas.shard.name,
                kind.value,
                reason(failed),
            )
        else:
            log.info("API key quotas are enforced again (Redis at %s)", self.quotas.shard.name)


def add_headers(response: Response) -> Response:
    """RateLimit-* on the answer to an admitted, metered request, errors included."""
    decision: Decision | None = g.get("quota_decision")
    if decision is not None:
        response.headers.update(decision.headers)
    return response


def install(app: Flask, settings: Settings) -> Limiter:
    """The limiter for `app`'s key check (auth.py), and its headers."""
    app.after_request(add_headers)
    return Limiter.from_settings(settings)
