"""A job's completion callback: an HTTP POST, signed, only to allowed hosts.

`POST /jobs` may name a `callback_url`. It is accepted only when its host is
on `--callback-hosts` (exactly, case aside) and the scheme is http or https,
and only when `--callback-secret` is set: without an allow-list there are no
callbacks at all, so a client can never make the server call a host of its
choosing (SSRF). The host is checked again when the callback is sent, and
redirects are never followed.

Whoever completes the job sends it (the worker that answers its last item,
or the web server when no item could be decoded), once, from a background
thread: the body is the job's status without its results, JSON, and
`X-Signature-256: sha256=<hex>` is HMAC-SHA256 of the exact body bytes with
the secret (the receiver recomputes it and compares in constant time). A
failure (no answer, or not 2xx) is retried with exponential backoff,
`ATTEMPTS` tries in all. Client side only: the standard library's urllib.
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
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from keras_server import metrics

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Signature-256"
ATTEMPTS = 5
FIRST_BACKOFF_S = 1.0
TIMEOUT_S = 10.0


def allowed_hosts(text: str) -> frozenset[str]:
    """--callback-hosts: comma-separated host names."""
    return frozenset(h.strip().lower() for h in text.split(",") if h.strip())


def refusal(url: str, hosts: frozenset[str], secret: str) -> str | None:
    """Why `url` may not be called back (None: it may)."""
    if not hosts or not secret:
        return "callbacks are off on this server (--callback-hosts and --callback-secret)"
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        return "callback_url is not a URL"
    if parts.scheme not in ("http", "https") or not host:
        return "callback_url must be an http or https URL"
    if parts.username or parts.password:
        return "callback_url may not carry credentials"
    if host not in hosts:
        return f"callback_url's host {host!r} is not on --callback-hosts"
    return None


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx is an answer, not an invitation elsewhere


_OPENER = urllib.request.build_opener(_NoRedirects)


class CallbackSender:
    """Sends completion callbacks for one process, each from its own thread."""

    def __init__(
        self, hosts: str, secret: str, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.hosts = allowed_hosts(hosts)
        self.secret = secret
        self.sleep = sleep

    def send(self, url: str, status: Mapping[str, Any]) -> threading.Thread | None:
        """POST `status` to `url` in the background; None when `url` is refused."""
        why = refusal(url, self.hosts, self.secret)
        if why is not None:
            log.warning("job %s: no callback: %s", status.get("id"), why)
            return None
        body = json.dumps(status).encode()
        thread = threading.Thread(
            target=self._deliver, args=(url, body), name="job-callback", daemon=True
        )
        thread.start()
        return thread

    def _deliver(self, url: str, body: bytes) -> bool:
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, self.secret)}
        for attempt in range(ATTEMPTS):
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with _OPENER.open(request, timeout=TIMEOUT_S) as response:
                    if 200 <= response.status < 300:
                        metrics.JOB_CALLBACKS.labels("delivered").inc()
                        return True
                    problem = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                problem = f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:
                problem = str(exc)
            if attempt + 1 < ATTEMPTS:
                wait = FIRST_BACKOFF_S * 2**attempt
                log.warning("callback to %s failed (%s); retrying in %.0f s", url, problem, wait)
                self.sleep(wait)
            else:
                log.error("callback to %s failed (%s) %d times: given up", url, problem, ATTEMPTS)
                metrics.JOB_CALLBACKS.labels("failed").inc()
        return False


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
