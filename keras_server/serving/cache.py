"""The shared response cache (`--response-cache-ttl`, per model in the
models file; off by default): an upload seen before is answered from Redis,
without decoding it or queueing it.

What a cached answer is. The worker's answer to one image, byte for byte
(the JSON of a `/predict` answer, or the probabilities answer v2 asks for,
messages.py), so a hit goes down the same path as a miss from there and
the body is the same. Only successful answers are stored.

Its key (messages.Keys.cached): the model's name, the version that made the
answer, the answer's form (`/predict`: `top<k>`, the model's top_k; v2:
`p<k>`, probabilities and the k classes named for its classification
output, `p<k>-<dtype>` when the input was pixels rather than a file), and a
hash of the uploaded bytes (the encoded file; the pixels' raw bytes), so a
hit skips decoding: SHA-256, cut to 128 bits. A cryptographic hash, because
the cache is shared: with one whose collisions can be made (xxHash), one
client could upload an image that collides with a popular one and have
everybody else answered with its classes. SHA-256 rather than BLAKE2b: the
SHA extensions of current x86 and ARM CPUs make it the faster of the two
(0.20 against 0.44 ms for a 235 KB upload, BENCHMARKS.md).

Versions. Each version has its own queue (serving/traffic.py), so a lookup uses
the version the request is routed to, when that is certain. When it is not
(no live worker, or workers whose queue names no version, all claiming the
model's one queue), the version is the one the model's live workers serve,
from the process's survey of the workers (serving/workers.py): one
live version is looked up under its own name; while versions are mixed or
none is live, lookups are skipped and counted, since any worker may answer.
An answer is always stored under the version it names, so a new version
never reads an older version's entries: they are different keys.

Several images: each is looked up and stored on its own, in one round trip
each way (MGET, then a pipeline of SETs); only the misses are decoded and
queued. `X-Cache` says `hit` when every image came from the cache, `miss`
when none did, `partial` otherwise.

Failures never fail a request: a cache Redis that is marked down, unreachable,
refusing (OOM, READONLY, ...) or too full (response_store.CacheFull) turns
the lookup into misses or drops the write, counted in
`keras_server_response_cache_skipped{operation, reason}`. Metrics count
images: `hits` + `misses` is every image looked for (skipped lookups are
misses too); `stored_bytes` what was written. TensorFlow-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from keras_server import metrics
from keras_server.broker.failures import Kind, kind_of, reason
from keras_server.broker.messages import Keys
from keras_server.broker.response_store import CacheDown, CacheFull, ResponseStore
from keras_server.serving.models import Deployment, ServedModel
from keras_server.settings import Settings

log = logging.getLogger(__name__)

HEADER = "X-Cache"
# 128 bits of the hash: collisions stay out of reach, and the key short.
DIGEST_HEX = 32


def digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()[:DIGEST_HEX]


@dataclass
class Lookup:
    """One request's images as looked up: what the cache answered, and how
    to store the rest."""

    model: ServedModel
    form: str
    digests: list[str | None]  # per image; None: not looked up (an empty file)
    hits: dict[int, bytes] = field(default_factory=dict)  # position -> cached answer

    @property
    def header(self) -> str:
        looked = sum(d is not None for d in self.digests)
        if self.hits and len(self.hits) == looked:
            return "hit"
        return "partial" if self.hits else "miss"


class ResponseCache:
    """The cache for every model of one web process whose TTL is above 0."""

    def __init__(self, store: ResponseStore, keys: dict[str, Keys]) -> None:
        self.redis_store = store
        self.keys = keys

    @classmethod
    def from_settings(cls, settings: Settings, deployment: Deployment) -> ResponseCache | None:
        """The cache, or None when no model has a TTL (the cache is off)."""
        cached = [m for m in deployment.models.values() if m.spec.response_cache_ttl]
        if not cached:
            return None
        url = settings.response_cache_url or settings.redis_urls[0]
        store = ResponseStore.open(url, timeout=settings.redis_timeout)
        keys = {
            m.name: Keys.for_model(settings.queue_name, m.name, deployment.default) for m in cached
        }
        log.info(
            "response cache at %s for %s",
            store.name,
            ", ".join(f"{m.name} ({m.spec.response_cache_ttl:g} s)" for m in cached),
        )
        return cls(store, keys)

    def on_for(self, model: ServedModel) -> bool:
        return model.name in self.keys

    def lookup(
        self,
        model: ServedModel,
        form: str,
        uploads: Sequence[bytes | memoryview],
        version: str | None = None,
    ) -> Lookup:
        """Look each non-empty upload up under `version`, the one the request
        is routed to (routing.Route.answered_by); None: under the one version
        the model's live workers serve, skipped while they serve several.
        Never raises for the cache's sake."""
        found = Lookup(
            model, form, [digest(data) if memoryview(data).nbytes else None for data in uploads]
        )
        wanted = [(i, d) for i, d in enumerate(found.digests) if d is not None]
        if not wanted:
            return found
        version = version or self._live_version(model)
        if version is None:
            _skipped(model, "lookup", "versions", len(wanted))
        else:
            keys = self.keys[model.name]
            try:
                answers = self.redis_store.get_many(
                    [keys.cached(model.name, version, form, d) for _, d in wanted]
                )
            except (redis.RedisError, CacheDown) as exc:
                _skipped(model, "lookup", _why(exc, "lookup"), len(wanted))
            else:
                found.hits = {
                    i: answer for (i, _), answer in zip(wanted, answers, strict=True) if answer
                }
        if found.hits:
            metrics.RESPONSE_CACHE_HITS.labels(model.name).inc(len(found.hits))
        if len(wanted) > len(found.hits):
            metrics.RESPONSE_CACHE_MISSES.labels(model.name).inc(len(wanted) - len(found.hits))
        return found

    def store(self, lookup: Lookup, answers: dict[int, bytes]) -> None:
        """Store the workers' successful `answers` (by position) under the
        version each names; never raises for the cache's sake."""
        model = lookup.model
        keys = self.keys[model.name]
        entries = {}
        for position, answer in answers.items():
            looked = lookup.digests[position]
            version = answered_version(answer)
            if looked is not None and version is not None:
                entries[keys.cached(model.name, version, lookup.form, looked)] = answer
        if not entries:
            return
        try:
            self.redis_store.put_many(entries, model.spec.response_cache_ttl or 0.0)
        except (redis.RedisError, CacheDown, CacheFull) as exc:
            _skipped(model, "store", _why(exc, "store"), len(entries))
            return
        metrics.RESPONSE_CACHE_STORED_BYTES.labels(model.name).inc(
            sum(len(v) for v in entries.values())
        )

    def _live_version(self, model: ServedModel) -> str | None:
        """The one version the model's live workers serve; None when they
        serve several, or none is live."""
        versions = {w.version or model.spec.version for w in model.live_workers()}
        return next(iter(versions)) if len(versions) == 1 else None


def answered_version(answer: bytes) -> str | None:
    """The version a successful answer names; None for an error, or an
    answer that names none (such an answer is not stored)."""
    try:
        header = json.loads(answer.partition(b"\n")[0])
        made_by = header.get("model") if header.get("success") is True else None
        version = made_by.get("version") if isinstance(made_by, dict) else None
    except (ValueError, AttributeError):
        return None
    return version if isinstance(version, str) and version else None


# A failing cache fails every request's lookup: say so in the log at most
# this often per kind (the counter has every one).
LOG_EVERY_S = 10.0
_logged: dict[str, float] = {}


def _why(exc: BaseException, operation: str) -> str:
    """The skip's reason label: down (not asked), full, or failures.py's kind."""
    if isinstance(exc, CacheDown):
        return "down"
    if isinstance(exc, CacheFull):
        return "full"
    kind = kind_of(exc)
    if kind is Kind.BUG:
        log.error("response cache %s failed; skipped", operation, exc_info=exc)
    elif time.monotonic() - _logged.get(kind.value, -LOG_EVERY_S) >= LOG_EVERY_S:
        _logged[kind.value] = time.monotonic()
        log.warning("response cache %s skipped (%s): %s", operation, kind.value, reason(exc))
    return kind.value


def _skipped(model: ServedModel, operation: str, why: str, images: int) -> None:
    metrics.RESPONSE_CACHE_SKIPPED.labels(model.name, operation, why).inc(images)
