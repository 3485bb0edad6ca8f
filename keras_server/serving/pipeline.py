"""The one way a request's images become answers, whichever transport they
came by (`/predict`, several images, v2 REST, gRPC, jobs):

    charge the caller's quota per image  (serving/quotas.py)
    look each image up in the response cache  (serving/cache.py)
    decode the misses within the process's decode memory budget  (Decoder)
    queue them on one shard, all or none, at the request's level  (submit)
    await their answers until the request's deadline
    store the workers' successful answers in the cache

`Pipeline.run` gives one answer per image, in order: the worker's (or the
cache's) bytes, or the `Failure` of that image alone (a bad file, a timeout,
an error the worker reported); what fails the whole request (the queue full,
Redis down, no live worker, over quota) is raised. Each transport decides
what a failed image means: an item of its own on `/predict`, the whole
request's failure on v2. Which model and version answer is
`Pipeline.target`'s (serving/models.py, serving/traffic.py); who did is
`Answered.version`, and `who_answered` for the request metrics.

Each image is its own queue entry, so it batches with everyone else's; all
of one request's entries go to one Redis shard in one transaction, and
their answers are awaited together on that shard.

`Decoder` decodes within the process's decode memory budget
(images.DecodeBudget), refusing with a 503 (DecoderBusy) when it is spent,
and counts its CPU time (in steps of FLUSH_CPU_S, not per image). A job's
images are decoded off the request thread, one at a time per process
(`decode_for_job`), waiting for the budget rather than refusing, so a large
job can neither starve `/predict` of CPU nor of decode memory.
TensorFlow-free.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from keras_server import logs, metrics, tracing
from keras_server.broker import messages
from keras_server.broker.failures import Kind, kind_of
from keras_server.broker.request_queue import QueueFull
from keras_server.images import DecodeBudget, DecoderBusy, ImageError, load_image
from keras_server.serving.admission import Urgency
from keras_server.serving.cache import ResponseCache
from keras_server.serving.failures import (
    BadInput,
    Bug,
    Failure,
    NotFound,
    TimedOut,
    bug,
    from_image,
    from_worker,
    no_live_worker,
    queue_full,
    timed_out,
)
from keras_server.serving.models import Deployment, ServedModel
from keras_server.serving.quotas import Caller, Limiter
from keras_server.serving.traffic import Route
from keras_server.settings import Settings

log = logging.getLogger(__name__)

# Decode CPU is added up here and written to the Prometheus counter in steps of
# at least this much: a write per image (a lock, and under multiprocess mode an
# mmap write) was a measurable share of each request (issue 23). The counter
# lags the truth by less than this, per web process.
FLUSH_CPU_S = 0.05
# How long a job's image waits for the decode budget, in steps, before it
# counts as a failed item.
BUSY_WAIT_S = 0.05
BUSY_TRIES = 100
EMPTY = "the uploaded image file is empty"


class Decoder:
    """Uploads to model inputs, for all the threads of one process."""

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


@dataclass(frozen=True)
class Form:
    """The answer a request wants of the worker: `/predict`'s top-k JSON, or
    v2's whole probability vector with its top `classes` named; with it, a
    heat map the worker computes (`explain`: gradcam, serving/explain.py)."""

    probabilities: bool = False
    classes: int = 0
    pixels_dtype: str = ""  # v2's pixels input: its dtype (the cache keys on it)
    explain: str = ""  # a method the worker computes (messages.EXPLAIN_METHODS)
    explain_class: int = -1  # the class it explains; -1: the most likely

    def cache_form(self, model: ServedModel) -> str:
        """How the response cache tells answers of different forms apart."""
        if not self.probabilities:
            return f"top{model.spec.top_k}"
        return f"p{self.classes}-{self.pixels_dtype}" if self.pixels_dtype else f"p{self.classes}"


@dataclass(frozen=True)
class Image:
    """One image of a request: an encoded file (`data`), or `pixels` already
    at the model's input size (v2's pixels input)."""

    data: bytes = b""
    pixels: np.ndarray | None = None

    def payload(self) -> bytes | memoryview:
        """What the response cache hashes: the file as sent, or the pixels' bytes."""
        if self.pixels is not None:
            return memoryview(np.ascontiguousarray(self.pixels))
        return self.data


@dataclass
class Answered:
    """A request's images answered, in order: the raw answer, or the Failure
    of that image; what the cache did (X-Cache: hit, miss or partial; None
    while the cache is off for the model); the version that answered, named
    by the answers, or for failed answers (which name none) the version the
    request was routed to when only it could answer (its own queue); "":
    unknown."""

    answers: list[bytes | Failure]
    cache: str | None = None
    version: str = ""


@dataclass(frozen=True)
class Served:
    """The model and version that answered a request ("" while unknown)."""

    model: str = ""
    version: str = ""


# Who answers the request this thread (or gRPC call) serves: set by `target`
# and `run` as they learn it, cleared by each adapter when a request starts
# and read once answered, for the request metrics' labels (metrics.ANSWERED_BY).
UNKNOWN = Served()
who_answered: ContextVar[Served] = ContextVar("who_answered", default=UNKNOWN)


class Pipeline:
    """The serving core of one process: its models, decoder, cache and quotas."""

    def __init__(
        self,
        settings: Settings,
        deployment: Deployment,
        decoder: Decoder,
        cache: ResponseCache | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.settings = settings
        self.deployment = deployment
        self.decoder = decoder
        self.cache = cache
        self.limiter = limiter
        # Jobs decode here, one image at a time per process (see the docstring).
        self._job_lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-decode")

    # -- where a request goes -------------------------------------------------

    def model(self, name: str | None) -> ServedModel:
        """The model named `name` (None: the default); NotFound naming what is served."""
        model = self.deployment.get(name)
        if model is None:
            known = ", ".join(sorted(self.deployment.models))
            raise NotFound(f"unknown model {name!r}; this server serves {known} (GET /models)")
        return model

    def target(self, name: str | None, version: str | None = None) -> tuple[ServedModel, Route]:
        """The model and the route of a request for `name` (None: the
        default), pinned to `version` when it names one: NotFound for a
        version the model neither declares nor serves; Unavailable while a
        pinned version has no live worker."""
        model = self.model(name)
        who_answered.set(Served(model.name))
        if version:
            check_version(model, version)
        route = model.router.route(version or None)
        who_answered.set(Served(model.name, route.answered_by or ""))
        return model, route

    # -- the pipeline -----------------------------------------------------------

    def run(
        self,
        model: ServedModel,
        route: Route,
        images: Sequence[Image],
        form: Form,
        urgency: Urgency,
        *,
        caller: Caller | None = None,
        cached: bool = True,
    ) -> Answered:
        """Every image of one request answered (see the module's docstring);
        `cached=False` neither looks them up nor stores them (an
        explanation's images, serving/explain.py)."""
        if caller is not None and self.limiter is not None:
            self.limiter.charge(caller, len(images))
        on = cached and self.cache is not None and self.cache.on_for(model)
        cache = self.cache if on else None
        looked = None
        if cache is not None:
            payloads = [i.payload() for i in images]
            looked = cache.lookup(model, form.cache_form(model), payloads, route.answered_by)
        answers: list[bytes | Failure | None] = [None] * len(images)
        for position, raw in (looked.hits if looked else {}).items():
            answers[position] = raw
        missed = [i for i, a in enumerate(answers) if a is None]
        version = ""
        if missed:
            found, version = self._queue(
                model, route, [(i, images[i]) for i in missed], form, urgency
            )
            for position in missed:
                answers[position] = found[position]
            if cache is not None and looked is not None:
                cache.store(looked, {i: a for i, a in found.items() if isinstance(a, bytes)})
        if not version and looked is not None and looked.hits:
            version = read_answer(next(iter(looked.hits.values())))[1]
        version = version or route.answered_by or ""
        who_answered.set(Served(model.name, version))
        done = [a if a is not None else TimedOut(timed_out(urgency.timeout)) for a in answers]
        return Answered(done, looked.header if looked else None, version)

    def _queue(
        self,
        model: ServedModel,
        route: Route,
        images: list[tuple[int, Image]],
        form: Form,
        urgency: Urgency,
    ) -> tuple[dict[int, bytes | Failure], str]:
        """Decode, queue and await `images` (by position): each position's
        answer or Failure, and the version the answers name ("": none)."""
        found: dict[int, bytes | Failure] = {}
        named = ""
        size: tuple[int, int] | None = None
        if any(image.pixels is None for _, image in images):
            size = model.input_size()
            if size is None:
                raise no_live_worker(model.name)
        requests: dict[int, messages.ImageRequest] = {}
        for position, image in images:
            try:
                pixels = self.pixels(image, size)  # type: ignore[arg-type]
            except Failure as failure:
                found[position] = failure
                continue
            requests[position] = messages.ImageRequest.create(
                pixels,
                urgency.timeout,
                probabilities=form.probabilities,
                classes=form.classes,
                priority=urgency.priority,
                version=pinned(route),
                explain=form.explain,
                explain_class=form.explain_class,
            )
        if requests:
            answers = submit(model, list(requests.values()), self.settings, route)
            for position, request in requests.items():
                raw = answers.get(request.id)
                if raw is None:
                    found[position] = TimedOut(timed_out(urgency.timeout))
                    continue
                failure, version = read_answer(raw)
                found[position] = failure or raw
                named = named or version
        return found, named

    def pixels(self, image: Image, size: tuple[int, int]) -> np.ndarray:
        """The image at the model's input `size`, decoded (within the budget)
        unless it came as pixels; the Failure (BadInput, ...) if it cannot be."""
        if image.pixels is not None:
            return image.pixels
        if not image.data:
            raise BadInput(EMPTY)
        try:
            return self.decoder(image.data, size)
        except ImageError as exc:
            raise from_image(exc) from None

    # -- jobs -----------------------------------------------------------------

    def decode_for_job(self, data: bytes, size: tuple[int, int]) -> np.ndarray:
        """A job's image, decoded on the process's job lane (one at a time),
        waiting a while when the decode budget is spent by others;
        ImageError if it cannot be decoded."""
        return self._job_lane.submit(self._decode_waiting, data, size).result()

    def _decode_waiting(self, data: bytes, size: tuple[int, int]) -> np.ndarray:
        if not data:
            raise ImageError(EMPTY)
        for _ in range(BUSY_TRIES - 1):
            try:
                return self.decoder(data, size)
            except DecoderBusy:
                time.sleep(BUSY_WAIT_S)
        return self.decoder(data, size)


def versions(model: ServedModel, workers: list[messages.WorkerInfo]) -> list[str]:
    """The versions of `model` a request may name: its spec's, and its live workers'."""
    return sorted({model.spec.version, *(w.version for w in workers if w.version)})


def check_version(model: ServedModel, version: str) -> list[messages.WorkerInfo]:
    """NotFound unless `model` declares `version` or a live worker serves it
    (a survey read again before refusing: a worker that has just come is
    not turned away); the live workers it was checked against."""
    workers = model.live_workers()
    if version not in versions(model, workers):
        workers = model.live_workers(fresh=True)
    served = versions(model, workers)
    if version not in served:
        raise NotFound(
            f"model {model.name!r} has no version {version!r}; it serves " + ", ".join(served)
        )
    return workers


def read_answer(raw: bytes) -> tuple[Failure | None, str]:
    """The Failure a worker's (or the cache's) answer reports (None for a
    success), and the version it names ("": none; failed answers name none)."""
    try:
        header = json.loads(raw.partition(b"\n")[0])
    except ValueError as exc:
        return bug(messages.BadMessage(f"a worker's answer cannot be read ({exc})")), ""
    if not isinstance(header, dict):
        return None, ""
    if header.get("format") != messages.FORMAT:
        return Bug(messages.format_error("a worker answered", header.get("format"))), ""
    if header.get("success") is False:
        failure = from_worker(str(header.get("error", "the model failed")), header.get("status"))
        return failure, ""
    made_by = header.get("model")
    return None, str(made_by.get("version") or "") if isinstance(made_by, dict) else ""


def read_probabilities(raw: bytes) -> tuple[dict[str, Any], np.ndarray]:
    """A probabilities answer's header and vector; Bug when it is not one."""
    try:
        header, vector = messages.decode_probabilities(raw)
    except messages.BadMessage as exc:
        raise Bug(f"a worker's answer cannot be read ({exc})") from None
    if vector is None:
        raise Bug("a worker answered a probabilities request without the probabilities")
    return header, vector


def submit(
    model: ServedModel,
    requests: Sequence[messages.ImageRequest],
    settings: Settings,
    route: Route | None = None,
) -> dict[str, bytes]:
    """Queue `requests` for `model` on the queue `route` says (None: the
    model's own, which every version's workers claim) and wait for their
    answers until the earliest deadline; returns the answers that came, by
    request id. A full queue is Unavailable, a failing Redis its redis-py
    error (the transport's table answers it): then nothing was queued, or
    nothing more will come."""
    shards = model.shards if route is None else route.shards
    logs.request_id.set(
        requests[0].id if len(requests) == 1 else f"{requests[0].id}+{len(requests) - 1}"
    )
    traced = {tracing.MODEL: model.name, tracing.IMAGES: len(requests)}
    try:
        with tracing.span("enqueue", traced, producer=True) as span:
            # The worker's batch span links to this one.
            if trace := tracing.traceparent():
                requests = [dataclasses.replace(r, trace=trace) for r in requests]
            queue = shards.push_all(
                [messages.encode_request(r) for r in requests],
                max_depth=settings.max_queue,
                level=requests[0].priority,
            )
            span.set_attribute(tracing.SHARD, queue.shard.name)
    except QueueFull:
        log.warning("queue full: %d images refused", len(requests))
        raise queue_full() from None
    metrics.QUEUED.labels(model.name, queue.shard.name).inc(len(requests))
    deadline = min(r.deadline for r in requests)
    # The answers come back on the shard that took the requests.
    try:
        with tracing.span("wait", {**traced, tracing.SHARD: queue.shard.name}) as span:
            answers = queue.wait_results([r.id for r in requests], timeout=deadline - time.time())
            span.set_attribute(tracing.ANSWERED, len(answers))
            return answers
    except redis.RedisError as exc:
        # The queue marked an unreachable host down. Found silent past the
        # deadline (the read outlasts it by --redis-timeout), these are 504s.
        if kind_of(exc) is Kind.UNREACHABLE and time.time() >= deadline:
            return {}
        raise


def pinned(route: Route | None) -> str:
    """The version a request's entries name in their header ("": any)."""
    return route.version or "" if route is not None and route.pinned else ""
