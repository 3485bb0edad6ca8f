"""The Redis failure boundary: what each redis-py error means, decided once.

Every caller of Redis (the web tier, the worker's claim loop, the surveys
behind /readyz and /metrics) asks `kind_of`, and the shard a command went
to is marked down in one place (`shards.Shard.watch`), so the three kinds of
failure are told apart the same way everywhere:

- UNREACHABLE: the host did not answer — refused or reset connections, or
  silence past the read timeout (a stopped process, a partition; in redis-py
  that is `redis.TimeoutError`, not a `ConnectionError`). The host is marked
  down for every model of the process and probed until it answers.
- REFUSED: the host answered with an error (OOM, READONLY, MISCONF, NOPERM,
  LOADING, BUSY, WRONGTYPE, ...). It is up, so it is not marked down; the
  request is refused with the server's reason (a 503 in the web tier).
- BUG: anything else (a reply we cannot parse, a wrong argument): logged
  with its traceback by whoever catches it, never shown to a client.
"""

from __future__ import annotations

import enum
import re

import redis
from redis import exceptions


class Kind(enum.Enum):
    UNREACHABLE = "unreachable"
    REFUSED = "refused"
    BUG = "bug"


# Errors the server sent, though redis-py files some of them under
# ConnectionError: the host is up and said no.
_ANSWERED = (
    redis.ResponseError,
    exceptions.AuthenticationError,
    exceptions.AuthorizationError,
    exceptions.BusyLoadingError,
)
_SILENT = (redis.ConnectionError, redis.TimeoutError)

# redis-py drops the error code from the message of the errors it maps to a
# class of their own; put it back, so a client reads what the server said.
_CODES: dict[type[redis.RedisError], str] = {
    exceptions.OutOfMemoryError: "OOM",
    exceptions.ReadOnlyError: "READONLY",
    exceptions.NoPermissionError: "NOPERM",
    exceptions.BusyLoadingError: "LOADING",
    exceptions.AuthenticationError: "AUTH",
    exceptions.AuthorizationError: "AUTH",
    exceptions.NoScriptError: "NOSCRIPT",
}

# A refusal's reason goes to clients: keep it to a line.
MAX_REASON = 200


def kind_of(exc: BaseException) -> Kind:
    """Which kind of failure `exc` is (see the module's docstring)."""
    if isinstance(exc, _ANSWERED):
        return Kind.REFUSED
    if isinstance(exc, _SILENT):
        return Kind.UNREACHABLE
    return Kind.BUG


classify = kind_of  # TODO(lead): remove once web/ uses kind_of


def out_of_memory(exc: BaseException) -> bool:
    """A refusal for want of memory. Redis 7 answers OOM to a write script
    itself; 6.2 as an error inside it."""
    return isinstance(exc, exceptions.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and "OOM" in str(exc)
    )


_PIPELINE_PREFIX = re.compile(r"^Command # \d+ \(.*?\) of pipeline caused error: ")


def reason(exc: BaseException) -> str:
    """What the server said, with its error code, on one short line."""
    text = " ".join(str(exc).split())
    # redis-py names the failing command of a pipeline with its arguments (a
    # request's header, say): the server's words are what matter.
    text = _PIPELINE_PREFIX.sub("", text)
    code = next((c for t, c in _CODES.items() if isinstance(exc, t)), "")
    if code and not text.startswith(code):
        text = f"{code} {text}"
    return text[:MAX_REASON]
