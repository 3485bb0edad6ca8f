"""The batch client's HTTP: one requests.Session per thread, the bearer
token, and the retries the server asks for (Retry-After on a 429 or 503,
else an exponential backoff with jitter)."""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

# HTTP statuses of a whole request worth another try, after Retry-After.
RETRYABLE = frozenset({429, 502, 503, 504})
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


class ClientError(Exception):
    """The run cannot start or go on (the message says why); exit status 2."""


@dataclass
class Server:
    """The API at `base`, spoken to from several threads (a requests.Session
    each), retrying what the server asks to be retried."""

    base: str
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = 10
    sleep: Callable[[float], None] = time.sleep
    _local: threading.local = field(default_factory=threading.local)

    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
            self._local.session = session
        return session

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """`method path`, retried on connection errors and RETRYABLE statuses
        (after Retry-After, or an exponential backoff with jitter when that
        is longer); the last answer, or ClientError when none came."""
        url = path if path.startswith("http") else self.base + path
        for attempt in range(self.retries + 1):
            wait_s = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**attempt) * random.uniform(0.5, 1)
            try:
                response = self.session().request(method, url, timeout=self.timeout, **kwargs)
            except requests.RequestException as exc:
                if attempt == self.retries:
                    raise ClientError(f"{method} {url}: {exc}") from exc
            else:
                if response.status_code not in RETRYABLE or attempt == self.retries:
                    return response
                wait_s = max(wait_s, retry_after(response.headers.get("Retry-After")) or 0)
            self.sleep(wait_s)
        raise AssertionError("unreachable")

    def model_input_size(self, model: str | None) -> tuple[int, int] | None:
        response = self.call("GET", "/models")
        if response.status_code != 200:
            raise ClientError(f"GET /models: {response.status_code} {error_of(response)}")
        listing = response.json()
        wanted = model or listing.get("default")
        for described in listing.get("models", []):
            if described.get("name") == wanted:
                size = described.get("input_size")
                return (int(size[0]), int(size[1])) if size else None
        names = ", ".join(m.get("name", "?") for m in listing.get("models", []))
        raise ClientError(f"the server has no model named {wanted!r} (it serves: {names})")


def retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_of(response: requests.Response) -> str:
    try:
        body = response.json()
        return str(body.get("error") or body)
    except ValueError:
        return response.text[:200] or response.reason
