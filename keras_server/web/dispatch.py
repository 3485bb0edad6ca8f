"""From uploads to answers, for every route: decode within the memory budget,
queue, await.

Decoding: `Decoder` turns an upload into the model's input within this
process's decode memory budget (images.DecodeBudget), refusing with a 503
(DecoderBusy) when the budget is spent, and counts its CPU time (written to
the counter in steps of FLUSH_CPU_S, not per image).

One HTTP request, several images: queue them together, await every answer.

`/predict` with repeated `image` fields and the v2 inference route both come
through here. Each image is its own queue entry, so it batches with everyone
else's; all of one request's entries go to one Redis shard in one script call,
all or none, so a full queue refuses the whole request and leaves nothing of
it queued. Their answers are awaited together on that shard.

With the response cache on, the images it answers are neither decoded nor
queued (web/response_cache.py); the others go as above.

Several images on `/predict` answer `200 {"success": true, "results": [...]}`,
one item per `image` field, in order: the single-image body (success or
error) plus `"filename"` and `"status"`, the HTTP status that image alone
would have had. A bad file fails only its own item. Only what fails the whole
request (too many images, the queue full or Redis down) is a plain error: an
errors.HttpError, or a redis-py error left to errors.py to classify.
Priorities and deadlines (`Urgency`): `/predict` reads `X-Priority: N`
(1 .. --priority-levels, 1 the highest and the default) and
`X-Request-Timeout: SECONDS` (capped by --result-timeout, its default); v2
reads Triton's `parameters.priority` and `parameters.timeout` (microseconds;
0 means the default for both, as in Triton). A value out of range is a 400
naming the range. Every image of a request waits at its level until its
deadline; a request past its deadline is never run (the worker skips it),
and its client gets 504.
TensorFlow-free.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from flask import Response, jsonify

from keras_server import logs, metrics, tracing
from keras_server.broker import messages
from keras_server.broker.failures import Kind, classify
from keras_server.broker.request_queue import QueueFull
from keras_server.images import DecodeBudget, DecoderBusy, ImageError, load_image
from keras_server.settings import Settings
from keras_server.web import errors
from keras_server.web.deployment import ServedModel
from keras_server.web.response_cache import HEADER, ResponseCache, top_k_form
from keras_server.web.routing import Route
from keras_server.web.uploads import Upload

log = logging.getLogger(__name__)

# Decode CPU is added up here and written to the Prometheus counter in steps of
# at least this much: a write per image (a lock, and under multiprocess mode an
# mmap write) was a measurable share of each request (issue 23). The counter
# lags the truth by less than this, per web process.
FLUSH_CPU_S = 0.05


class Decoder:
    """Uploads to model inputs, for all the threads of one web process."""

    def __init__(self, settings: Settings) -> None:
        self.max_pixels = settings.max_image_pixels
        self.budget = DecodeBudget(settings.decode_memory_bytes)
        self._cpu_lock = threading.Lock()
        self._cpu_pending = 0.0  # decode CPU seconds not yet on the counter

    def __call__(self, data: bytes, size: tuple[int, int]) -> np.ndarray:
        """`data` as an RGB uint8 array of `size`; ImageError (DecoderBusy, a
        503 with Retry-After, when the budget is spent) if not."""
        started = time.thread_time()
        try:
            with tracing.span("decode"):
                return load_image(data, size, self.max_pixels, self.budget)
        except DecoderBusy:
            metrics.DECODE_REFUSED.inc()
            log.warning("decode memory spent (%d MB in use): refused", self.budget.used >> 20)
            raise
        finally:
            self._count_cpu(time.thread_time() - started)

    def _count_cpu(self, seconds: float) -> None:
        with self._cpu_lock:
            self._cpu_pending += seconds
            if self._cpu_pending < FLUSH_CPU_S:
                return
            seconds, self._cpu_pending = self._cpu_pending, 0.0
        metrics.DECODE_CPU_SECONDS.inc(seconds)


PRIORITY_HEADER = "X-Priority"
TIMEOUT_HEADER = "X-Request-Timeout"
# Plain decimal seconds: float() would also take "nan", "1e9", "1_0".
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+", re.ASCII)


@dataclass(frozen=True)
class Urgency:
    """A request's priority level (1 the highest) and how long it may wait
    for its answer, in seconds (at most --result-timeout)."""

    priority: int
    timeout: float

    @classmethod
    def default(cls, settings: Settings) -> Urgency:
        """Level 1: interactive clients never wait behind anything unless
        they opt down; batch work (the lowest level) is what opts down."""
        return cls(1, settings.result_timeout)

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], settings: Settings) -> Urgency:
        """`X-Priority` and `X-Request-Timeout`; HttpError 400 naming the range."""
        urgency = cls.default(settings)
        priority, seconds = headers.get(PRIORITY_HEADER), headers.get(TIMEOUT_HEADER)
        if priority is not None:
            text = priority.strip()
            level = int(text) if text.isascii() and text.isdigit() else 0
            if not 1 <= level <= settings.priority_levels:
                raise errors.HttpError(400, _priority_range(PRIORITY_HEADER, settings))
            urgency = cls(level, urgency.timeout)
        if seconds is not None:
            text = seconds.strip()
            value = float(text) if _SECONDS.fullmatch(text) else 0.0
            if not value > 0:
                raise errors.HttpError(400, _timeout_range(TIMEOUT_HEADER, "seconds", settings))
            urgency = cls(urgency.priority, min(value, settings.result_timeout))
        return urgency

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any], settings: Settings) -> Urgency:
        """v2's `parameters.priority` and `parameters.timeout` (microseconds),
        as Triton reads them: 0, or absent, is the default."""
        urgency = cls.default(settings)
        priority, micros = parameters.get("priority", 0), parameters.get("timeout", 0)
        if not _whole(priority) or not 0 <= priority <= settings.priority_levels:
            raise errors.HttpError(
                400, _priority_range("parameters.priority", settings) + " (0: the default, 1)"
            )
        if not _whole(micros) or micros < 0:
            raise errors.HttpError(
                400, _timeout_range("parameters.timeout", "microseconds", settings)
            )
        timeout = min(micros / 1e6, settings.result_timeout) if micros else urgency.timeout
        return cls(priority or urgency.priority, timeout)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _priority_range(name: str, settings: Settings) -> str:
    return (
        f"{name} must be a whole number from 1 (the highest) to {settings.priority_levels} "
        "(--priority-levels)"
    )


def _timeout_range(name: str, unit: str, settings: Settings) -> str:
    return (
        f"{name} must be a number of {unit} greater than 0; more than "
        f"{settings.result_timeout:g} s (--result-timeout) is taken as that"
    )


def too_many(count: int, settings: Settings) -> errors.HttpError:
    return errors.HttpError(
        413,
        f"{count} images in one request; the limit is {settings.max_images} (--max-images)",
    )


def submit(
    model: ServedModel,
    jobs: Sequence[messages.ImageRequest],
    settings: Settings,
    route: Route | None = None,
) -> dict[str, bytes]:
    """Queue `jobs` for `model` on the queue `route` says (None: the model's
    own, which every version's workers claim) and wait for their answers
    until the earliest deadline; returns the answers that came, by request
    id. A full queue is an errors.HttpError, a failing Redis its redis-py
    error (errors.py classifies it): then nothing was queued, or nothing
    more will come."""
    shards = model.shards if route is None else route.shards
    logs.request_id.set(jobs[0].id if len(jobs) == 1 else f"{jobs[0].id}+{len(jobs) - 1}")
    traced = {tracing.MODEL: model.name, tracing.IMAGES: len(jobs)}
    try:
        with tracing.producer_span("enqueue", traced) as span:
            # The worker's batch span links to this one.
            if trace := tracing.traceparent():
                jobs = [dataclasses.replace(job, trace=trace) for job in jobs]
            queue = shards.push_all(
                [messages.encode_request(job) for job in jobs],
                max_depth=settings.max_queue,
                level=jobs[0].priority,
            )
            span.set_attribute(tracing.SHARD, shards.name(queue))
    except QueueFull:
        log.warning("queue full: %d images refused", len(jobs))
        raise errors.queue_full() from None
    metrics.QUEUED.labels(model.name, shards.name(queue)).inc(len(jobs))
    deadline = min(job.deadline for job in jobs)
    # The answers come back on the shard that took the requests.
    try:
        with tracing.span("wait", {**traced, tracing.SHARD: shards.name(queue)}) as span:
            answers = queue.wait_results([job.id for job in jobs], timeout=deadline - time.time())
            span.set_attribute(tracing.ANSWERED, len(answers))
            return answers
    except redis.RedisError as exc:
        # The queue marked an unreachable host down. Found silent past the
        # deadline (the read outlasts it by --redis-timeout), these are 504s.
        if classify(exc) is Kind.UNREACHABLE and time.time() >= deadline:
            return {}
        raise


def pinned(route: Route | None) -> str:
    """The version a request's entries name in their header ("": any)."""
    return route.version or "" if route is not None and route.pinned else ""


def timed_out(timeout: float) -> str:
    """A 504's message, for a request that waited `timeout` seconds."""
    return (
        f"no prediction within {timeout:g} s: the model workers are down or overloaded, "
        "and a request past its deadline is never run"
    )


def predict_many(
    model: ServedModel,
    uploads: list[Upload],
    settings: Settings,
    decode: Decoder,
    *,
    urgency: Urgency,
    route: Route,
    cache: ResponseCache | None = None,
) -> Response:
    """`/predict` with several `image` fields: one item per image, in order,
    all queued as `route` says; with the response cache on, each image is
    looked up on its own (X-Cache says hit, miss or partial)."""
    if len(uploads) > settings.max_images:
        raise too_many(len(uploads), settings)
    looked = (
        cache.lookup(model, top_k_form(model), [u.data for u in uploads], route.answered_by)
        if cache
        else None
    )
    items = _classify_each(
        model,
        uploads,
        settings,
        decode,
        urgency=urgency,
        route=route,
        cached=looked.hits if looked else {},
    )
    if cache and looked:
        cache.store(looked, items.answers)
    response = jsonify(success=True, results=items.results)
    if looked:
        response.headers[HEADER] = looked.header
    return response


@dataclass
class Items:
    """Several images' items, and what the workers answered (to cache)."""

    results: list[dict[str, Any]]  # one per upload, in order
    answers: dict[int, bytes]  # the workers' answers, by position (not the cached ones)


def _classify_each(
    model: ServedModel,
    uploads: list[Upload],
    settings: Settings,
    decode: Decoder,
    *,
    urgency: Urgency,
    route: Route,
    cached: dict[int, bytes],
) -> Items:
    """Each upload's item: from `cached` (answers by position), else decoded,
    queued with the others and awaited."""
    items: list[dict[str, Any]] = []
    jobs: dict[int, messages.ImageRequest] = {}
    size = (0, 0)
    if len(cached) < len(uploads):
        found_size = model.input_size()
        if found_size is None:
            raise errors.no_live_worker(model.name)
        size = found_size
    for position, upload in enumerate(uploads):
        item: dict[str, Any] = {"filename": upload.filename}
        items.append(item)
        data = upload.data
        if position in cached:
            continue
        if not data:
            item.update(status=400, success=False, error="the uploaded image file is empty")
            continue
        try:
            image = decode(data, size)
        except ImageError as exc:
            item.update(status=exc.status, success=False, error=str(exc))
            continue
        jobs[position] = messages.ImageRequest.create(
            image, urgency.timeout, priority=urgency.priority, version=pinned(route)
        )
    answers = submit(model, list(jobs.values()), settings, route) if jobs else {}
    found: dict[int, bytes] = {}
    for position, job in jobs.items():
        raw = answers.get(job.id)
        if raw is None:
            items[position].update(status=504, success=False, error=timed_out(urgency.timeout))
            continue
        found[position] = raw
    for position, raw in sorted({**found, **cached}.items()):
        result = messages.decode_result(raw)
        items[position].update(status=200 if result["success"] else 500, **result)
    return Items(items, found)
