"""The HTTP error boundary: every failure of a request becomes one `HttpError`
(status, message, headers), and each API renders it in its own shape.

Statuses and headers are decided here: `unavailable` (503 with Retry-After),
`over_quota` (429, with the quota's Retry-After and RateLimit-* headers),
`no_live_worker`, `from_redis` (broker/failures.py's classes: an unreachable
or refusing Redis is a 503, anything else a bug), `from_http` (werkzeug's
404/405/413 ...) and `from_image` (a bad upload, or the decode budget spent).
`install` gives an app or a blueprint its handlers: its own `render`, for
HttpError, werkzeug's errors, redis-py's and — the catch-all — any other
exception, a bug, which is logged once with its traceback and answered 500
without one. TensorFlow-free.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis
from flask import Blueprint, Flask, Response, request
from werkzeug.exceptions import HTTPException

from keras_server.broker.failures import Kind, classify, out_of_memory, reason
from keras_server.images import ImageError

log = logging.getLogger(__name__)

# A second is about one batch on a CPU; clients back off from there.
RETRY_AFTER_S = 1
INTERNAL = "internal server error; the server log has the details"


class HttpError(Exception):
    """A request answered with `status`, `message` and `headers`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def unavailable(message: str) -> HttpError:
    """A 503 the client should retry shortly."""
    return HttpError(503, message, {"Retry-After": str(RETRY_AFTER_S)})


def no_live_worker(model: str) -> HttpError:
    return unavailable(f"model {model!r} has no live worker yet; retry shortly")


def over_quota(message: str, headers: dict[str, str]) -> HttpError:
    """A 429: the API key is over its quota (web/quotas.py); `headers` carry
    Retry-After and RateLimit-*."""
    return HttpError(429, message, headers)


def queue_full() -> HttpError:
    return unavailable("the server is at capacity (the queue is full); retry shortly")


def bug(exc: BaseException) -> HttpError:
    """An exception nobody expected: logged here, once, with its traceback."""
    log.error("unhandled error", exc_info=exc)
    return HttpError(500, INTERNAL)


def from_redis(exc: redis.RedisError) -> HttpError:
    kind = classify(exc)
    if kind is Kind.UNREACHABLE:
        log.warning("Redis unavailable: %s", exc)
        return unavailable("the queue (Redis) is unavailable; retry shortly")
    if kind is Kind.REFUSED:
        log.error("Redis refused: %s", reason(exc))
        if out_of_memory(exc):
            return unavailable("the queue (Redis) is out of memory; retry shortly")
        return unavailable(f"the queue (Redis) refused the request ({reason(exc)}); retry shortly")
    return bug(exc)


def from_image(exc: ImageError) -> HttpError:
    if exc.status == 503:
        return unavailable(str(exc))
    return HttpError(exc.status, str(exc))


def from_http(exc: HTTPException, body: str = "upload") -> HttpError:
    """werkzeug's error in our words; `body`: what a 413 calls the request."""
    response = exc.get_response()
    status = exc.code or 500
    if status == 405:
        allowed = response.headers.get("Allow", "POST")
        message = f"{request.method} is not allowed here; use {allowed}"
    elif status == 413:
        from keras_server.web.api import state  # api.py imports this module

        limit_mb = state().settings.max_upload_mb
        message = f"the {body} is larger than the {limit_mb:g} MB limit"
    else:
        message = exc.description or exc.name
    headers = {name: response.headers[name] for name in ("Allow",) if name in response.headers}
    if status == 503:
        return unavailable(message)
    return HttpError(status, message, headers)


def install(
    target: Flask | Blueprint, render: Callable[[HttpError], Response], body: str = "upload"
) -> None:
    """Answer every error raised under `target` with `render`."""

    def answer(error: HttpError) -> Response:
        response = render(error)
        response.status_code = error.status
        response.headers.update(error.headers)
        return response

    target.register_error_handler(HttpError, answer)
    target.register_error_handler(HTTPException, lambda exc: answer(from_http(exc, body)))
    target.register_error_handler(redis.RedisError, lambda exc: answer(from_redis(exc)))
    target.register_error_handler(ImageError, lambda exc: answer(from_image(exc)))
    target.register_error_handler(Exception, lambda exc: answer(bug(exc)))
