"""Quotas per API key, counted per image: after a transport has named the
caller's key (serving/keys.py), the core asks its quota in Redis
(broker/quotas.py, shared by every web process, the gRPC front and every
server) and refuses with OverQuota (429, RESOURCE_EXHAUSTED over gRPC).

Two steps, so that a refusal costs as little as it can:
- `gate`, before the request's body is read: a key with nothing left is
  refused at once, nothing counted;
- `charge`, once its images are counted (by the pipeline, before any is
  decoded; a job's as they are read): each image counts one, all or none,
  and a request with more images than the key has left is refused whole.
Open paths and CORS preflights carry no key and count nothing.

A metered answer, refused or not, carries `RateLimit-Limit`,
`RateLimit-Remaining` and `RateLimit-Reset` (the IETF draft's fields); a 429
also `Retry-After`.

The quota lives on the first Redis of --redis-url. When that Redis cannot be
asked (unreachable, or refusing: out of memory, read-only, ...; failures.py
decides), the request goes through unmetered: a quota is never the reason a
request fails. That is logged once when it starts and once when it ends, and
every such request is counted (`keras_server_api_key_requests_total` with
`quota="unenforced"`). Any other error is a bug.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import redis

from keras_server import metrics
from keras_server.broker.failures import Kind, kind_of, reason
from keras_server.broker.messages import Keys
from keras_server.broker.quotas import Decision, Quota, Quotas
from keras_server.serving.failures import OverQuota
from keras_server.settings import Settings

log = logging.getLogger(__name__)

PERIOD_WORDS = {1.0: "a second", 60.0: "a minute", 3600.0: "an hour", 86400.0: "a day"}


def describe(quota: Quota) -> str:
    """e.g. "10 images a second, 20 at once"."""
    per = PERIOD_WORDS.get(quota.period, f"every {quota.period:g} s")
    images = "image" if quota.rate == 1 else "images"
    return f"{quota.rate} {images} {per}, {quota.burst} at once"


def refusal(name: str, quota: Quota, decision: Decision, images: int = 1) -> str:
    """What a request over its quota is told."""
    left = (
        f" ({images} images sent, {decision.remaining} left now)"
        if images > 1 and decision.remaining
        else ""
    )
    return (
        f"the API key {name!r} is over its quota of {describe(quota)}{left}; retry in "
        f"{decision.headers['Retry-After']} s"
    )


@dataclass
class Caller:
    """Who sent a request: the key's name and quota (None: no quota), and the
    latest decision on it (for the RateLimit-* fields of the answer)."""

    name: str
    quota: Quota | None
    decision: Decision | None = field(default=None)


class Limiter:
    """One process's gate to the shared quotas."""

    def __init__(self, quotas: Quotas, key_names: bool = False) -> None:
        self.quotas = quotas
        # --metrics-key-names: the key's name as a metric label, else "-".
        self.key_names = key_names
        self._lock = threading.Lock()
        self._unenforced = False  # since the last failure, until Redis answers again

    @classmethod
    def from_settings(cls, settings: Settings) -> Limiter:
        keys = Keys(settings.queue_name)
        quotas = Quotas.open(settings.redis_urls[0], keys, timeout=settings.redis_timeout)
        return cls(quotas, settings.metrics_key_names)

    def _count(self, caller: Caller, verdict: str) -> None:
        name = caller.name if self.key_names else "-"
        metrics.API_KEY_REQUESTS.labels(name, verdict).inc()

    def gate(self, caller: Caller) -> None:
        """Refuse (OverQuota) a caller with nothing left, counting nothing."""
        self._ask(caller, 0)

    def charge(self, caller: Caller, images: int) -> None:
        """Count `images` against the caller's quota, or refuse them all (OverQuota)."""
        self._ask(caller, images)

    def _ask(self, caller: Caller, images: int) -> None:
        if caller.quota is None:
            if images:
                self._count(caller, "none")
            return
        try:
            if images:
                decision = self.quotas.take(caller.name, caller.quota, images)
            else:
                decision = self.quotas.check(caller.name, caller.quota)
        except redis.RedisError as exc:
            kind = kind_of(exc)
            if kind is Kind.BUG:
                raise
            self._count(caller, "unenforced")
            self._note(failed=exc, kind=kind)
            return
        self._note()
        caller.decision = decision
        if images or not decision.allowed:
            verdict = "within" if decision.allowed else "over"
            self._count(caller, verdict)
        if not decision.allowed:
            log.warning("API key %r is over its quota (%s)", caller.name, describe(caller.quota))
            message = refusal(caller.name, caller.quota, decision, max(images, 1))
            raise OverQuota(message, decision.headers)

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
