"""Delivering jobs' completion callbacks, from the worker processes.

A callback waits in Redis (broker/pending_callbacks.py) until a worker
process delivers it. Each worker process owns one `CallbackSender`; its
claim loops `poll` their shard (the heartbeat does, from the worker's start
on, and the loop that completes a job does at once), claiming due callbacks
atomically, at most as many as the sender has idle threads, and send them
from its pool of `threads` threads. The body is the job's status without
its results, JSON; its `status_url` is absolute when `--public-url` is set.
Each try checks the URL and signs the body afresh (keras_server/callbacks.py)
and follows no redirect. A failure (no answer, or not 2xx) is tried again
after 1, 2, 4, 8 s; after ATTEMPTS tries it is given up. Outcomes are
counted in keras_server_callbacks_total. Client side only: the standard
library's urllib.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

from keras_server import metrics
from keras_server.broker.request_queue import RequestQueue
from keras_server.callbacks import SIGNATURE_HEADER, TIMESTAMP_HEADER, allowed_hosts, refusal, sign

log = logging.getLogger(__name__)

ATTEMPTS = 5
FIRST_BACKOFF_S = 1.0
TIMEOUT_S = 10.0
# Callbacks one worker process sends at once; the rest wait in Redis, for
# its next poll or another worker.
THREADS = 4
# A claimed callback goes back to the others after this long: well past one
# try (TIMEOUT_S), so only a sender that died leaves it to another.
LEASE_S = 3 * TIMEOUT_S


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx is an answer, not an invitation elsewhere


_OPENER = urllib.request.build_opener(_NoRedirects)


class CallbackSender:
    """Delivers the pending callbacks of the queues it polls, from a pool of
    `threads` threads: one per worker process, made once, closed at exit."""

    def __init__(
        self,
        hosts: str,
        secret: str,
        *,
        public_url: str = "",
        threads: int = THREADS,
        first_backoff: float = FIRST_BACKOFF_S,
    ) -> None:
        self.targets = allowed_hosts(hosts)
        self.secret = secret
        self.public_url = public_url.rstrip("/")
        self.threads = threads
        self.first_backoff = first_backoff
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="job-callback")
        self._lock = threading.Lock()
        self._busy = 0
        self._closed = False

    @property
    def on(self) -> bool:
        return bool(self.targets and self.secret)

    def status_url(self, job_id: str) -> str:
        return f"{self.public_url}/jobs/{job_id}"

    def poll(self, queue: RequestQueue) -> int:
        """Claim the callbacks due on `queue`'s Redis, as many as there are
        idle threads, and send them; how many were claimed. A Redis failure
        is logged: what was not claimed waits for the next poll."""
        with self._lock:
            if not self.on or self._closed:
                return 0
            free = self.threads - self._busy
            self._busy += max(free, 0)
        claimed: list[tuple[str, int]] = []
        try:
            with queue.shard.watch():
                claimed = queue.callbacks.claim(time.time(), LEASE_S, free)
        except redis.RedisError as exc:
            log.warning("could not claim job callbacks on %s (%s)", queue.shard.name, exc)
        finally:
            with self._lock:
                self._busy -= max(free, 0) - len(claimed)
        for job_id, tries in claimed:
            try:
                self._pool.submit(self._deliver, queue, job_id, tries)
            except RuntimeError:  # closed meanwhile: its lease runs out, another sends it
                with self._lock:
                    self._busy -= 1
        return len(claimed)

    def close(self) -> None:
        """Wait for the tries under way (each at most TIMEOUT_S); what is
        still pending stays in Redis for the next worker. Later polls claim
        nothing (a heartbeat may still beat meanwhile)."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)

    def _deliver(self, queue: RequestQueue, job_id: str, tries: int) -> None:
        try:
            self._try(queue, job_id, tries)
        except redis.RedisError as exc:
            # Its lease runs out and it is tried again, by us or another.
            log.warning("job %s: callback bookkeeping failed (%s)", job_id, exc)
        except Exception:
            log.exception("job %s: callback failed", job_id)
        finally:
            with self._lock:
                self._busy -= 1

    def _try(self, queue: RequestQueue, job_id: str, tries: int) -> None:
        store = queue.callbacks
        with queue.shard.watch():
            job = queue.jobs.get(job_id)
        why = (
            "its job is gone"
            if job is None
            else refusal(job.callback_url, self.targets, self.secret)
        )
        if job is None or why is not None:
            log.warning("job %s: callback dropped: %s", job_id, why)
            metrics.CALLBACKS.labels("dropped").inc()
            store.done(job_id)
            return
        url = job.callback_url
        problem = self._post(url, json.dumps(status_of(job, self.status_url(job_id))).encode())
        if problem is None:
            log.info("job %s: callback delivered to %s", job_id, url)
            metrics.CALLBACKS.labels("delivered").inc()
            store.done(job_id)
        elif tries >= ATTEMPTS:
            log.error("callback to %s failed (%s) %d times: given up", url, problem, tries)
            metrics.CALLBACKS.labels("given_up").inc()
            store.done(job_id)
        else:
            wait = self.first_backoff * 2 ** (tries - 1)
            log.warning("callback to %s failed (%s); retrying in %.0f s", url, problem, wait)
            metrics.CALLBACKS.labels("retried").inc()
            store.retry(job_id, time.time() + wait)

    def _post(self, url: str, body: bytes) -> str | None:
        """POST `body`, signed now; None when answered 2xx, else what went wrong."""
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(body, self.secret, timestamp),
        }
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=TIMEOUT_S) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            return str(exc)


def status_of(job: Any, status_url: str) -> dict[str, Any]:
    """The callback's body: a job's status without its results."""
    return {**job.summary(), "status_url": status_url}
