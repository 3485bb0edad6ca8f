"""The model worker loop: claim a batch, run one forward pass, answer each request.

It knows the model only as a `predictor.Predictor` (the one engine
interface), so this module never imports Keras or any engine. One bad
message, one failed batch or a Redis outage never ends the loop: every
request in a failed batch is answered with an error, and Redis errors are
told apart by broker/failures.py: an unreachable host is marked down for
the whole process (by the queue) and the loop waits for the probe to hear
from it again; a refusal is retried with backoff. Claims are crash-safe (see
broker/request_queue.py): a worker killed mid-batch loses nothing, because
live workers requeue its claims once its heartbeat expires. The heartbeat
thread survives any failure (logged at WARNING or above, counted in
keras_server_heartbeat_failures, restarted after a bug), and while it cannot
beat the claim loop claims nothing, so no request is reaped from a live
worker and run twice.

Asynchronous jobs (broker/jobs.py) are driven from here: before each claim
the loop moves a few of their items onto the queue (at most `job_feed` waiting),
drops items of cancelled jobs before they reach the model, answers items into
their job's record, and sends job callbacks (keras_server/callbacks.py): at
once for a job it finishes, and at each heartbeat those pending in Redis.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence

import numpy as np
import redis

from keras_server import metrics, tracing
from keras_server.broker import messages
from keras_server.broker.failures import Kind, kind_of, reason
from keras_server.broker.request_queue import RequestQueue
from keras_server.broker.shards import PROBE_INTERVAL_S
from keras_server.engines.predictor import Predictor, top_indices, top_k
from keras_server.worker.callbacks import CallbackSender

log = logging.getLogger(__name__)

# How long one claim blocks in Redis: also how fast the loop notices `stop`.
CLAIM_WAIT_S = 0.5
# A level is protected from the levels below it (their share of a batch held
# to `max_lower`, the hold) while its traffic comes: for this long after the
# last batch that held a request at it. Without traffic above the lowest
# level, batches run full (batch work alone loses nothing).
RECENT_S = 1.0
MAX_BACKOFF_S = 5.0


def answer(
    request: messages.ImageRequest,
    probabilities: np.ndarray,
    labels: Sequence[str],
    k: int,
    *,
    name: str = "",
    version: str = "",
) -> bytes:
    """One request's answer: its top k, or the whole vector when it asked."""
    if not request.probabilities:
        return messages.success_result(top_k(probabilities, labels, k), name, version)
    return messages.probabilities_result(
        probabilities, named_classes(request, probabilities, labels), name, version
    )


def named_classes(
    request: messages.ImageRequest, probabilities: np.ndarray, labels: Sequence[str]
) -> list[dict[str, object]]:
    """The indices and labels of the `classes` most likely the request asked for."""
    if not request.classes:
        return []
    return [
        {"index": int(i), "label": labels[i]} for i in top_indices(probabilities, request.classes)
    ]


def explained(
    request: messages.ImageRequest,
    probabilities: np.ndarray,
    predictor: Predictor,
    *,
    name: str = "",
    version: str = "",
) -> bytes:
    """The answer to a request that asked the worker to explain it: the
    probabilities answer with the heat map of its class (the most likely
    unless it named one), or a 400 when this engine cannot compute it."""
    labels = predictor.labels
    gradcam = getattr(predictor, "gradcam", None)
    if gradcam is None:
        return messages.error_result(
            f"the {predictor.engine} engine cannot compute {request.explain}; "
            "only the keras engine can",
            status=400,
        )
    index = request.explain_class if request.explain_class >= 0 else int(np.argmax(probabilities))
    if index >= len(probabilities):
        return messages.error_result(messages.out_of_range(index, len(probabilities)), status=400)
    try:
        with tracing.span("explain"):
            heatmap = gradcam(request.image, index)
    except Exception:
        log.exception("[%s] %s failed", request.id, request.explain)
        return messages.error_result(
            f"the model failed to compute {request.explain}; the worker log has the details"
        )
    return messages.probabilities_result(
        probabilities,
        named_classes(request, probabilities, labels),
        name,
        version,
        heatmap=heatmap,
        explained={"index": index, "label": labels[index]},
    )


class Worker:
    """Serves one queue: claim a batch, one forward pass, answer every request.

    While it runs, a heartbeat thread keeps its heartbeat key alive and puts
    the claims of dead workers back on the queue.
    """

    def __init__(
        self,
        queue: RequestQueue,
        predictor: Predictor,
        batch_size: int,
        *,
        result_ttl: float,
        heartbeat_ttl: float = 10.0,
        batch_delay: float = 0.0,
        max_lower: int | None = None,
        hold: float = 0.0,
        description: str = "",
        name: str = "",
        version: str = "",
        turn: contextlib.AbstractContextManager[object] | None = None,
        job_ttl: float = 86400.0,
        job_feed: int | None = None,
        callbacks: CallbackSender | None = None,
    ) -> None:
        """`turn`, shared by workers that share one model (`--parallel-batches`
        per shard), is held from filling a batch to answering it, so only the
        workers about to run the model hold more than one claimed request.
        The protected level (`protected`) is the highest level (smallest
        number) above the lowest that a batch held in the last RECENT_S.
        `max_lower`: most requests from below the protected level in one
        batch (default: no limit but `batch_size`). `hold`: after a batch
        that held a request at the protected level, seconds to wait for the
        next one before taking lower levels' work.
        Jobs: their items are fed onto the lowest level's queue while it holds
        fewer than `job_feed` (default: two batches), their results kept
        `job_ttl` s once done, and `callbacks` (the process's one sender)
        sends the callbacks pending on this queue's Redis (None: never)."""
        self.queue = queue
        self.predictor = predictor
        self.batch_size = batch_size
        self.result_ttl = result_ttl
        self.heartbeat_ttl = heartbeat_ttl
        self.batch_delay = batch_delay
        self.max_lower = batch_size if max_lower is None else max_lower
        self.hold = hold
        self._held_until = 0.0  # monotonic; until then, only the protected level is claimed
        self._seen_at: dict[int, float] = {}  # level: monotonic time of the last batch with it
        self.description = description or predictor.description
        self.name = name
        self.version = version
        self.turn = turn or contextlib.nullcontext()
        self.job_ttl = job_ttl
        self.job_feed = job_feed if job_feed is not None else 2 * batch_size
        self.callbacks = callbacks
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._last_beat = time.monotonic()  # of the last heartbeat that succeeded

    def info(self) -> messages.WorkerInfo:
        height, width, _ = self.predictor.input_shape
        return messages.WorkerInfo(
            description=self.description,
            batch_size=self.batch_size,
            host=socket.gethostname(),
            pid=os.getpid(),
            at=time.time(),
            name=self.name,
            input_size=(width, height),
            labels=len(self.predictor.labels),
            version=self.version,
            engine=self.predictor.engine,
            precision=self.predictor.precision,
            fidelity=fidelity.as_dict() if (fidelity := self.predictor.fidelity) else None,
            versioned=bool(self.queue.version),
        )

    def run(self, stop: threading.Event) -> None:
        """Serve batches until `stop` is set, then leave cleanly.

        A batch in progress when `stop` is set is finished and answered first.
        While the heartbeat cannot beat (`beats_stale`), nothing is claimed.
        """
        self._last_beat = time.monotonic()
        heartbeat = threading.Thread(
            target=self._heartbeat_thread, args=(stop,), name="heartbeat", daemon=True
        )
        heartbeat.start()
        registered = False
        paused = False
        backoff = 0.0
        while not stop.is_set():
            if self.beats_stale():
                # Other workers reap our claims once our heartbeat key expires:
                # a request claimed now could run twice. Wait for a beat.
                if not paused:
                    log.warning(
                        "worker %s: no heartbeat for %.1f s; not claiming until one succeeds",
                        self.id,
                        time.monotonic() - self._last_beat,
                    )
                    metrics.CLAIMS_PAUSED.inc()
                paused, registered = True, False
                stop.wait(min(CLAIM_WAIT_S, self.heartbeat_ttl / 3))
                continue
            if paused:
                paused = False
                log.info("worker %s: heartbeats succeed again; claiming", self.id)
            try:
                if not registered:
                    # Be in the workers set before claiming anything, so that
                    # if we die, others find our claims. After an outage, what
                    # we had claimed before it goes back first.
                    self.queue.requeue(self.id)
                    self.queue.beat(self.id, self.info(), self.heartbeat_ttl)
                    self._last_beat = time.monotonic()
                    registered = True
                self.run_once(CLAIM_WAIT_S)
                backoff = 0.0
            except Exception as exc:
                registered = False
                backoff = min(max(backoff * 2, 0.1), MAX_BACKOFF_S)
                kind = kind_of(exc)
                if kind is Kind.UNREACHABLE:
                    # The queue marked the host down; the shard's probe tells
                    # when it answers again.
                    log.warning("Redis at %s unreachable (%s)", self.queue.shard.name, exc)
                    while self.queue.shard.is_down() and not stop.wait(PROBE_INTERVAL_S):
                        pass
                    continue
                if kind is Kind.REFUSED:
                    log.warning("Redis refused (%s); retrying in %.1f s", reason(exc), backoff)
                else:
                    # Not reached for model errors (run_once answers those);
                    # this is the last guard that keeps the loop alive.
                    log.exception("unexpected error in the worker loop")
                stop.wait(backoff)
        heartbeat.join(timeout=2 * CLAIM_WAIT_S)
        self._leave()

    @property
    def sweep_budget(self) -> float:
        """Seconds a beat may spend moving a workerless version's queue: a
        tenth of the TTL, well inside the third between beats (a long queue
        moves over several beats)."""
        return self.heartbeat_ttl / 10

    def beats_stale(self) -> bool:
        """Whether the last heartbeat that succeeded is too old to claim on.

        Two beats missed (2/3 of the TTL): the heartbeat key then outlives
        the last beat by a third of its TTL, room for the claim under way to
        end before other workers may reap it, so no request runs twice.
        """
        return time.monotonic() - self._last_beat > self.heartbeat_ttl * 2 / 3

    def heartbeat(self) -> None:
        """One beat: say we are alive, then requeue the claims of dead workers."""
        self.queue.beat(self.id, self.info(), self.heartbeat_ttl)
        self._last_beat = time.monotonic()
        for dead, moved in self.queue.reap_dead(self.sweep_budget).items():
            log.warning("worker %s stopped beating: %d claimed requests requeued", dead, moved)
        if self.callbacks is not None:
            # Callbacks left pending by any process (a retry come due, one a
            # worker that died had claimed): from the first beat on.
            self.callbacks.poll(self.queue)

    def _heartbeat_thread(self, stop: threading.Event) -> None:
        """Beat every third of the TTL until `stop`. A failure of any kind is
        logged and counted, and the beating goes on (restarted after a bug):
        a heartbeat that ended quietly would leave the claim loop claiming
        requests that other workers then reap and run again."""
        interval = self.heartbeat_ttl / 3
        while not stop.is_set():
            try:
                self._beat_until(stop, interval)
            except Exception:
                metrics.HEARTBEAT_FAILURES.labels("error").inc()
                log.exception("heartbeat failed; restarting it in %.1f s", interval)
                stop.wait(interval)

    def _beat_until(self, stop: threading.Event, interval: float) -> None:
        while not stop.is_set():
            try:
                self.heartbeat()
            except redis.RedisError as exc:
                metrics.HEARTBEAT_FAILURES.labels("redis").inc()
                log.warning("heartbeat failed: %s", exc)
            stop.wait(interval)

    def _leave(self) -> None:
        try:
            returned = self.queue.requeue(self.id)
            self.queue.leave(self.id)
            # The last of its version: what waits on its version's queue
            # goes to the model's, for the other versions' workers (what
            # the budget leaves, the others' heartbeats move).
            self.queue.reap_dead(self.sweep_budget)
        except redis.RedisError as exc:
            log.warning("could not deregister from Redis (%s); the heartbeat will expire", exc)
            return
        if returned:
            log.info("returned %d unstarted requests to the queue", returned)
        log.info("worker %s stopped", self.id)

    def run_once(self, wait: float) -> int:
        """Claim and answer one batch, highest priority first; returns how
        many requests it took."""
        # Job items wait at the lowest level, so interactive requests go first.
        self.queue.jobs.feed(self.job_feed, self.queue.keys.queue_at(self.queue.levels))
        held = self._held_until - time.monotonic()
        protected = self.protected()
        if held > 0 and protected is not None:
            # A client that just had its answer at the protected level may
            # send the next one at once: a batch of lower levels started now
            # would make it wait that batch out (--priority-hold-ms).
            self._held_until = 0.0
            first = self.queue.claim_first(self.id, min(wait, held), protected=protected)
        else:
            first = self.queue.claim_first(self.id, wait)
        if first is None:
            return 0
        # The batch's delay counts from its first request (mosec-style).
        until = time.monotonic() + self.batch_delay
        # A protected request that comes while this batch runs waits for all
        # of it: past max_lower, lower levels wait for the next batch instead.
        protected = self.protected()
        lower = None
        if protected is not None:
            lower = self.max_lower - (messages.priority_of(first) > protected)
        with self.turn:
            more = self.queue.claim_more(
                self.id, self.batch_size - 1, until, max_lower=lower, protected=protected or 1
            )
            raws = [first, *more]
            answered = self._answer(raws)
        now = time.monotonic()
        levels = {messages.priority_of(raw) for raw in raws}
        for level in levels:
            self._seen_at[level] = now
        if self.hold and min(levels) == self.protected():
            self._held_until = now + self.hold
        return answered

    def protected(self) -> int | None:
        """The level protected from the levels below it: the highest (the
        smallest number) that a batch held in the last RECENT_S, unless that
        is the lowest level (nothing is below it); None when there is none."""
        now = time.monotonic()
        recent = [
            level
            for level, at in self._seen_at.items()
            if now - at < RECENT_S and level < self.queue.levels
        ]
        return min(recent, default=None)

    def _answer(self, raws: list[bytes]) -> int:
        """Decode, infer and answer one claimed batch. Whatever fails, every
        request of it is answered (with an error if need be) and the claim
        cleared; only a Redis error in `finish` leaves it, for requeueing."""
        with tracing.batch_span(self._traces(raws), self._traced(len(raws))):
            results: dict[str, bytes] = {}
            try:
                self._decode_and_infer(raws, results)
            except Exception:
                # Not a model error (_infer answers those): a bug outside predict.
                metrics.FAILED_BATCHES.inc()
                log.exception("batch of %d failed outside the model", len(raws))
                error = messages.error_result(
                    "the worker failed on this request's batch; the worker log has the details"
                )
                for raw in raws:
                    request_id = messages.request_id_of(raw)
                    if request_id:
                        results.setdefault(request_id, error)
            with tracing.span("answer"):
                finished = self.queue.finish(
                    self.id, results, self.result_ttl, job_ttl=self.job_ttl
                )
            if finished.items_succeeded:
                metrics.JOB_ITEMS.labels(self.name, "succeeded").inc(finished.items_succeeded)
            if finished.items_failed:
                metrics.JOB_ITEMS.labels(self.name, "failed").inc(finished.items_failed)
            for job_id in finished.jobs_done:
                self._job_done(job_id)
            return len(raws)

    def _traces(self, raws: list[bytes]) -> list[str]:
        """Each request's traceparent, read before the batch span starts (its
        links are set then); nothing while tracing is off."""
        return [messages.trace_of(raw) for raw in raws] if tracing.enabled() else []

    def _traced(self, batch_size: int) -> dict[str, object] | None:
        if not tracing.enabled():
            return None
        return {
            tracing.MODEL: self.name,
            tracing.VERSION: self.version,
            tracing.ENGINE: self.predictor.engine,
            tracing.PRECISION: self.predictor.precision,
            tracing.BATCH_SIZE: batch_size,
            tracing.SHARD: self.queue.shard.name,
        }

    def _job_done(self, job_id: str) -> None:
        log.info("job %s done", job_id)
        if self.callbacks is not None:
            # Its callback is pending in Redis since the transaction that
            # completed it: send it now rather than at the next beat.
            self.callbacks.poll(self.queue)

    def _decode_and_infer(self, raws: list[bytes], results: dict[str, bytes]) -> None:
        """Fill `results` with the answers to `raws`: a bad entry is answered
        (or dropped) alone, the others go through the model together."""
        now = time.time()
        batch: list[messages.ImageRequest] = []
        for raw in raws:
            try:
                request = messages.decode_request(raw)
            except messages.BadMessage as exc:
                log.error("dropping a bad queue entry: %s", exc)
                request_id = messages.request_id_of(raw)
                if request_id:
                    unknown = isinstance(exc, messages.UnknownFormat)
                    error = str(exc) if unknown else "the request was malformed"
                    results[request_id] = messages.error_result(error)
                continue
            if request.expired(now):
                log.warning("[%s] skipped: its deadline passed while queued", request.id)
                continue
            if request.version and request.version != self.version:
                # Pinned to a version whose last worker left (swept onto
                # the model's queue): never answered by another version.
                results[request.id] = messages.error_result(
                    messages.no_live_version(request.version, self.name), status=503
                )
                continue
            if request.image.shape != self.predictor.input_shape:
                results[request.id] = messages.error_result(
                    f"image shape {request.image.shape} does not fit the model's "
                    f"{self.predictor.input_shape}"
                )
                continue
            batch.append(request)
        batch = self._drop_cancelled(batch)
        if batch:
            results.update(self._infer(batch))

    def _drop_cancelled(self, batch: list[messages.ImageRequest]) -> list[messages.ImageRequest]:
        """The batch without the items of jobs cancelled (or expired) since
        they were fed: they are claimed, so dropping them is enough."""
        jobs = {item[0] for r in batch if (item := messages.job_item(r.id))}
        if not jobs:
            return batch
        try:
            gone = self.queue.jobs.cancelled(jobs)
        except redis.RedisError as exc:
            # Run them: a cancelled job's record ignores their results.
            log.warning("could not check for cancelled jobs (%s)", exc)
            return batch
        if not gone:
            return batch
        kept = [r for r in batch if (messages.job_item(r.id) or ("",))[0] not in gone]
        log.info("dropped %d items of cancelled jobs", len(batch) - len(kept))
        return kept

    def _infer(self, batch: list[messages.ImageRequest]) -> dict[str, bytes]:
        ids = [r.id for r in batch]
        metrics.BATCH_SIZE.observe(len(batch))
        started = time.perf_counter()
        try:
            with (
                metrics.INFERENCE_SECONDS.time(),
                tracing.span("forward", {tracing.BATCH_SIZE: len(batch)}),
            ):
                probabilities = self.predictor.predict(np.stack([r.image for r in batch]))
            if probabilities.shape[0] != len(batch):
                raise ValueError(f"model returned {probabilities.shape[0]} rows for {len(batch)}")
        except Exception:
            metrics.FAILED_BATCHES.inc()
            log.exception("batch of %d failed: %s", len(batch), ", ".join(ids))
            error = messages.error_result(
                "the model failed on this request's batch; the worker log has the details"
            )
            return dict.fromkeys(ids, error)
        log.info(
            "batch of %d in %.0f ms: %s",
            len(batch),
            (time.perf_counter() - started) * 1000,
            ", ".join(ids),
        )
        labels, k = self.predictor.labels, self.predictor.top_k
        # An explanation (Grad-CAM) runs after the batch's forward pass, for
        # its one image: a backward pass that the batch cannot share.
        return {
            r.id: (
                explained(r, p, self.predictor, name=self.name, version=self.version)
                if r.explain
                else answer(r, p, labels, k, name=self.name, version=self.version)
            )
            for r, p in zip(batch, probabilities, strict=True)
        }


class FairLock:
    """A lock granted in arrival order, to `holders` threads at once (the
    batches a worker runs in parallel), so claim loops serving several shards
    take turns with the one model instead of one shard starving the rest
    (Worker's `turn`)."""

    def __init__(self, holders: int = 1) -> None:
        self.holders = holders
        # The threads holding or waiting for a turn, by thread id: the first
        # `holders` hold one (a thread asks for one turn at a time).
        self._turns: collections.deque[int] = collections.deque()
        self._changed = threading.Condition()

    def __enter__(self) -> None:
        ticket = threading.get_ident()
        with self._changed:
            self._turns.append(ticket)
            self._changed.wait_for(lambda: ticket in itertools.islice(self._turns, self.holders))

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            self._turns.remove(threading.get_ident())
            self._changed.notify_all()

    @property
    def asked(self) -> int:
        """How many hold or wait for a turn."""
        with self._changed:
            return len(self._turns)


def serve(workers: Sequence[Worker], stop: threading.Event) -> None:
    """Run each worker's loop (one per shard) until `stop`, then wait for all."""
    if len(workers) == 1:
        workers[0].run(stop)
        return
    threads = [
        threading.Thread(target=w.run, args=(stop,), name=f"worker-{i}", daemon=True)
        for i, w in enumerate(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
