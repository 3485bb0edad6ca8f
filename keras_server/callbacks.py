"""A job's completion callback: an HTTP POST, signed and timestamped, only to
allowed targets, kept in Redis until it is delivered.

Allowed targets. `POST /jobs` may name a `callback_url`. It is accepted only
when `--callback-hosts` and `--callback-secret` are both set (without them
there are no callbacks, so a client can never make the server call a host of
its choosing: SSRF), its scheme is http or https, it carries no credentials
and no `.` or `..` path segment, and it matches an entry of
`--callback-hosts`: `host`, `host:port` or `host:port/path/prefix`
(`host/path/prefix` too). It matches when the host is the entry's (case
aside), the port is the entry's (an entry without one: the URL's scheme's
default, 443 or 80, only), and the path is the entry's prefix or below it on
a segment boundary (`/hooks` allows `/hooks` and `/hooks/done`, not
`/hooksdone`). The URL is checked again when the callback is sent, and
redirects are never followed.

Delivery. The transaction that completes a job makes its callback pending in
Redis (broker/pending_callbacks.py), so it survives any process. Each worker
process owns one `CallbackSender`; its claim loops `poll` their shard (the
heartbeat does, from the worker's start on, and the loop that completes a
job does at once), claiming due callbacks atomically, at most as many as
the sender has idle threads, and send them from its pool of `threads`
threads. The body is the job's status without its results, JSON; its
`status_url` is absolute when `--public-url` is set. A failure (no answer,
or not 2xx) is tried again after 1, 2, 4, 8 s; after ATTEMPTS tries it is
given up. Outcomes are counted in keras_server_callbacks_total.

Signature, as Stripe's and GitHub's: `X-Keras-Server-Timestamp: <Unix
seconds>` and `X-Signature-256: sha256=<hex>`, HMAC-SHA256 with the secret
of `<timestamp>.` followed by the exact body bytes. The receiver recomputes
it, compares in constant time, and refuses a timestamp more than 5 minutes
from its own clock, so a recorded delivery cannot be replayed later
(docs/api.md shows the check). Each try is signed afresh. Client side only:
the standard library's urllib.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis

from keras_server import metrics
from keras_server.broker.pending_callbacks import PendingCallbacks
from keras_server.broker.request_queue import RequestQueue

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Signature-256"
TIMESTAMP_HEADER = "X-Keras-Server-Timestamp"
ATTEMPTS = 5
FIRST_BACKOFF_S = 1.0
TIMEOUT_S = 10.0
# Callbacks one worker process sends at once; the rest wait in Redis, for
# its next poll or another worker.
THREADS = 4
# A claimed callback goes back to the others after this long: well past one
# try (TIMEOUT_S), so only a sender that died leaves it to another.
LEASE_S = 3 * TIMEOUT_S
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Target:
    """One --callback-hosts entry."""

    host: str
    port: int | None  # None: the URL's scheme's default port only
    path: str  # a prefix without its trailing slash; "": any path

    @classmethod
    def parse(cls, entry: str) -> Target:
        """`host`, `host:port`, `host/path/prefix` or `host:port/path/prefix`;
        ValueError names a bad one."""
        try:
            parts = urlsplit("//" + entry)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if (
            parts is None
            or "://" in entry  # a URL's scheme would parse as a host
            or not parts.hostname
            or parts.username is not None
            or parts.password is not None
            or parts.query
            or parts.fragment
            or "." in _segments(parts.path)
            or ".." in _segments(parts.path)
        ):
            raise ValueError(f"{entry!r}: expected HOST, HOST:PORT or HOST:PORT/PATH")
        return cls(parts.hostname.lower(), port, parts.path.rstrip("/"))

    def allows(self, scheme: str, host: str, port: int, path: str) -> bool:
        if host != self.host or port != (self.port or DEFAULT_PORTS[scheme]):
            return False
        return not self.path or path == self.path or path.startswith(self.path + "/")


def _segments(path: str) -> list[str]:
    return unquote(path).split("/")


def allowed_hosts(text: str) -> tuple[Target, ...]:
    """--callback-hosts: comma-separated entries (ValueError names a bad one)."""
    return tuple(Target.parse(h.strip()) for h in text.split(",") if h.strip())


def refusal(url: str, targets: tuple[Target, ...], secret: str) -> str | None:
    """Why `url` may not be called back (None: it may)."""
    if not targets or not secret:
        return "callbacks are off on this server (--callback-hosts and --callback-secret)"
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return "callback_url is not a URL"
    if parts.scheme not in DEFAULT_PORTS or not host:
        return "callback_url must be an http or https URL"
    if parts.username or parts.password:
        return "callback_url may not carry credentials"
    segments = _segments(parts.path)
    if "." in segments or ".." in segments:
        return "callback_url's path may not hold '.' or '..' segments"
    port = port or DEFAULT_PORTS[parts.scheme]
    if not any(t.allows(parts.scheme, host, port, parts.path or "/") for t in targets):
        return (
            f"callback_url {parts.scheme}://{parts.netloc}{parts.path} matches no "
            "--callback-hosts entry (host, port and path prefix)"
        )
    return None


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """X-Signature-256 for `body` sent at `timestamp` (Unix seconds)."""
    signed = str(timestamp).encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


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
            self._try(queue, queue.callbacks, job_id, tries)
        except redis.RedisError as exc:
            # Its lease runs out and it is tried again, by us or another.
            log.warning("job %s: callback bookkeeping failed (%s)", job_id, exc)
        except Exception:
            log.exception("job %s: callback failed", job_id)
        finally:
            with self._lock:
                self._busy -= 1

    def _try(self, queue: RequestQueue, store: PendingCallbacks, job_id: str, tries: int) -> None:
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
    return {
        "id": job.id,
        "state": job.state,
        "model": job.model,
        "total": job.total,
        "done": job.succeeded + job.failed,
        "succeeded": job.succeeded,
        "failed": job.failed,
        "status_url": status_url,
    }
