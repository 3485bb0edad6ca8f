"""The serving core's failures, and the one table that turns each into every
protocol's answer.

A request fails in one of a few ways, each a `Failure` subclass: the input is
bad, something is not found, too large, the caller is unknown or over its
quota, the server is overloaded or a part of it unavailable (both retried
after `retry_after` seconds), the answer did not come in time, or a bug.
The core raises them (or returns them per image); it never names an HTTP
status or a gRPC code. `ANSWERS` does, once, for every transport: the HTTP
status (the same for `/predict`'s JSON shape and v2's), and the name of the
gRPC status code (the gRPC front looks it up in `grpc.StatusCode`, so this
module imports neither Flask nor grpc).

Redis's failures are classified in one place, broker/failures.py; `from_redis`
turns its kinds into these. A bad upload (images.ImageError) is `from_image`.
TensorFlow-free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from keras_server.broker.failures import Kind, kind_of, out_of_memory, reason
from keras_server.images import ImageError

log = logging.getLogger(__name__)

# A second is about one batch on a CPU; clients back off from there.
RETRY_AFTER_S = 1
INTERNAL = "internal server error; the server log has the details"


class Failure(Exception):
    """A request, or one image of it, that cannot be answered: `message` says
    why in the client's words; `headers` are extra fields every transport
    sends along (HTTP headers, gRPC trailers in lower case)."""

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    @property
    def answer(self) -> Answer:
        return ANSWERS[type(self)]

    @property
    def status(self) -> int:
        """The HTTP status (`ANSWERS`)."""
        return self.answer.http


class BadInput(Failure):
    """The request, or one image of it, is not something the model takes."""


class Unauthenticated(Failure):
    """No API key, a malformed one, or an unknown one."""


class NotFound(Failure):
    """No such model, version or job."""


class NotAllowed(Failure):
    """The method is not one the path takes (HTTP only)."""


class Conflict(Failure):
    """The change asked for does not fit the server's state (the admin API)."""


class TooLarge(Failure):
    """More images, or more bytes, than the server takes in one request."""


class OverQuota(Failure):
    """The API key is over its quota; `headers` carry Retry-After and RateLimit-*."""


class Unavailable(Failure):
    """Retry shortly: no live worker, the queue full, Redis down, the decode
    memory spent. Carries Retry-After."""

    def __init__(self, message: str, retry_after: float = RETRY_AFTER_S) -> None:
        super().__init__(message, {"Retry-After": str(max(1, round(retry_after)))})


class TimedOut(Failure):
    """No answer before the request's deadline."""


class Bug(Failure):
    """Something nobody expected: logged once with its traceback, where it is made."""

    def __init__(self, message: str = INTERNAL) -> None:
        super().__init__(message)


@dataclass(frozen=True)
class Answer:
    """How each protocol answers a failure: the HTTP status (`/predict` and
    v2 REST alike) and the gRPC status code's name."""

    http: int
    grpc: str


# The one table. 413 is INVALID_ARGUMENT over gRPC: too many images is the
# request's fault, while RESOURCE_EXHAUSTED tells a client to back off.
ANSWERS: dict[type[Failure], Answer] = {
    BadInput: Answer(400, "INVALID_ARGUMENT"),
    Unauthenticated: Answer(401, "UNAUTHENTICATED"),
    NotFound: Answer(404, "NOT_FOUND"),
    NotAllowed: Answer(405, "UNIMPLEMENTED"),
    Conflict: Answer(409, "FAILED_PRECONDITION"),
    TooLarge: Answer(413, "INVALID_ARGUMENT"),
    OverQuota: Answer(429, "RESOURCE_EXHAUSTED"),
    Bug: Answer(500, "INTERNAL"),
    Unavailable: Answer(503, "UNAVAILABLE"),
    TimedOut: Answer(504, "DEADLINE_EXCEEDED"),
}
BY_STATUS: dict[int, type[Failure]] = {a.http: kind for kind, a in ANSWERS.items()}


def bug(exc: BaseException) -> Bug:
    """An exception nobody expected: logged here, once, with its traceback."""
    log.error("unhandled error", exc_info=exc)
    return Bug()


def from_redis(exc: redis.RedisError) -> Failure:
    """A Redis failure of the queue, as broker/failures.py classifies it."""
    kind = kind_of(exc)
    if kind is Kind.UNREACHABLE:
        log.warning("Redis unavailable: %s", exc)
        return Unavailable("the queue (Redis) is unavailable; retry shortly")
    if kind is Kind.REFUSED:
        log.error("Redis refused: %s", reason(exc))
        if out_of_memory(exc):
            return Unavailable("the queue (Redis) is out of memory; retry shortly")
        return Unavailable(f"the queue (Redis) refused the request ({reason(exc)}); retry shortly")
    return bug(exc)


def from_image(exc: ImageError) -> Failure:
    """A bad upload (4xx), or the decode memory spent (503)."""
    return _of_status(exc.status, str(exc))


def from_exception(exc: BaseException) -> Failure:
    """Whatever a request raised, as a Failure: itself, Redis's, an image's, or a bug."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, redis.RedisError):
        return from_redis(exc)
    if isinstance(exc, ImageError):
        return from_image(exc)
    return bug(exc)


def from_worker(error: str, status: object = None) -> Failure:
    """A worker's error answer: `status` is the HTTP-like status the worker
    gave it (a version with no live worker is 503); a model failure without
    one is a 500."""
    if isinstance(status, int) and status in BY_STATUS:
        return _of_status(status, error)
    return Bug(error)


def _of_status(status: int, message: str) -> Failure:
    return BY_STATUS.get(status, BadInput if 400 <= status < 500 else Bug)(message)


def no_live_worker(model: str) -> Unavailable:
    return Unavailable(f"model {model!r} has no live worker yet; retry shortly")


def too_many(count: int, limit: int) -> TooLarge:
    return TooLarge(f"{count} images in one request; the limit is {limit} (--max-images)")


def queue_full() -> Unavailable:
    return Unavailable("the server is at capacity (the queue is full); retry shortly")


def timed_out(timeout: float) -> str:
    """A 504's message, for a request that waited `timeout` seconds."""
    return (
        f"no prediction within {timeout:g} s: the model workers are down or overloaded, "
        "and a request past its deadline is never run"
    )
