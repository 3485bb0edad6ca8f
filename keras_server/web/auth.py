"""API keys: `--api-keys FILE` makes every request but a few open paths show a key.

A key comes as `Authorization: Bearer <key>` or `X-API-Key: <key>`. It is
checked against every key of the file in constant time (SHA-256 digests
compared with `hmac.compare_digest`, all of them, whatever matched), so
neither the answer time nor an early exit tells a caller how close it came.
A missing, wrong or malformed key is a 401 JSON error with
`WWW-Authenticate`, answered before the body is read: nothing is queued.

Open without a key, always: `/healthz` (a liveness probe carries no key),
the upload page `/` with its `/assets/`, and `/openapi.json` (public
documentation; the page asks for a key when the API answers 401). The
probes, `/readyz`, `/metrics`, `/v2/health/live` and `/v2/health/ready`, are
open unless `--auth-probes` is on. The admin API (/admin/, admin.py) takes
admin keys alone, never API keys. A 401 under `/v2` takes that protocol's
error shape, `{"error": "..."}`. Every other path,
including routes added later and unknown ones, needs a key: the check is a
`before_request` hook on the whole app, not a decorator on chosen routes.

The gRPC front (keras_server/rpc/server.py) reads the same two keys from a
call's metadata through `key_from`, and checks them against the same file.

Keys never reach a log line: only whether a key was missing, malformed or
unknown is logged. The file gives each key a name (what logs, metrics and
Redis know it by) and, optionally, a quota (`parse_keys` has the format; the
quota is web/quotas.py's). A CORS preflight (`OPTIONS` with
`Access-Control-Request-Method`, with `--cors-origins`) needs no key: a
browser never sends one with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, request

from keras_server.broker.quotas import Quota
from keras_server.settings import Settings
from keras_server.web import errors, quotas

log = logging.getLogger(__name__)

ALWAYS_OPEN = frozenset({"/healthz", "/", "/openapi.json"})
OPEN_PREFIXES = ("/assets/",)
PROBES = frozenset({"/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
# RFC 6750's b64token: what a bearer token may contain.
KEY = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")
MIN_KEY_LENGTH = 16
# The keys file's fields after a key, and what they take.
FIELDS = ("name", "rate", "burst")
MAX_NAME_LENGTH = 64
# A key's name is a metric label and part of a Redis key: no spaces, no colons.
NAME = re.compile(rf"^[A-Za-z0-9_.-]{{1,{MAX_NAME_LENGTH}}}$")
RATE = re.compile(r"^([0-9]{1,7})/(s|min|h|d)$", re.ASCII)
PERIODS = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
MAX_COUNT = 1_000_000
REALM = 'Bearer realm="keras-server"'


class KeysFileError(ValueError):
    """The keys file is missing, unreadable, empty or holds a bad line; the
    message says which line, never a key."""


@dataclass(frozen=True)
class KeyEntry:
    """What the keys file says of one key (never the key itself)."""

    name: str  # counted and limited under this name
    quota: Quota | None  # None: unlimited
    line: int


class ApiKeys:
    """The accepted keys, kept only as SHA-256 digests, each with its entry."""

    def __init__(self, keys: Sequence[tuple[str, KeyEntry]]) -> None:
        if not keys:
            raise KeysFileError("no API keys given")
        self._entries = tuple((_digest(key), entry) for key, entry in keys)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> tuple[KeyEntry, ...]:
        return tuple(entry for _, entry in self._entries)

    def identify(self, candidate: str) -> KeyEntry | None:
        """The entry of `candidate`, None for an unknown key."""
        given = _digest(candidate)
        found = None
        for digest, entry in self._entries:  # every one, so the time does not depend on which
            if hmac.compare_digest(given, digest):
                found = entry
        return found

    def accepts(self, candidate: str) -> bool:
        return self.identify(candidate) is not None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def load_keys(path: str) -> ApiKeys:
    """The keys of `path` (`parse_keys`). Raises KeysFileError when the file
    cannot be read or holds no usable key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise KeysFileError(f"--api-keys {path}: cannot read it ({reason})") from None
    return parse_keys(text, f"--api-keys {path}")


def parse_keys(text: str, source: str = "the keys file") -> ApiKeys:
    """One key per line, then optional fields, in any order:

        KEY [name=NAME] [rate=N/UNIT [burst=N]]   # a comment

    UNIT is s, min, h or d; burst defaults to N. A key without a name is
    counted as `line-<its line number>`; without a rate it has no quota.
    Keys that share a name (one being rotated) share its counts and quota,
    so they must give the same rate and burst. Blank lines, and everything
    from a `#` that starts a word, are skipped.

    Raises KeysFileError naming `source` and the line, never a key.
    """
    keys: list[tuple[str, KeyEntry]] = []
    seen_keys: dict[bytes, int] = {}
    seen_names: dict[str, KeyEntry] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        comment = next((i for i, w in enumerate(words) if w.startswith("#")), len(words))
        words = words[:comment]
        if not words:
            continue
        where = f"{source}, line {number}"
        key = words[0]
        if not KEY.match(key):
            raise KeysFileError(
                f"{where}: a key may hold only letters, digits and . _ ~ + / - (then = padding)"
            )
        if len(key) < MIN_KEY_LENGTH:
            raise KeysFileError(f"{where}: a key must be at least {MIN_KEY_LENGTH} characters long")
        earlier = seen_keys.setdefault(_digest(key), number)
        if earlier != number:
            raise KeysFileError(f"{where}: the same key as line {earlier}")
        entry = KeyEntry(*_fields(words[1:], where), line=number)
        if not entry.name:
            entry = dataclasses.replace(entry, name=f"line-{number}")
        named = seen_names.setdefault(entry.name, entry)
        if named.quota != entry.quota:
            raise KeysFileError(
                f"{where}: the name {entry.name!r} is on line {named.line} with another "
                "rate or burst (keys that share a name share its quota)"
            )
        keys.append((key, entry))
    if not keys:
        raise KeysFileError(f"{source}: no keys in it (one per line)")
    return ApiKeys(keys)


def _fields(words: Sequence[str], where: str) -> tuple[str, Quota | None]:
    """(name, quota) from the words after a key; "" when it names none."""
    fields: dict[str, str] = {}
    for word in words:
        field, equals, value = word.partition("=")
        if not equals or field not in FIELDS:
            raise KeysFileError(
                f"{where}: after the key come only the fields " + ", ".join(f"{f}=" for f in FIELDS)
            )
        if field in fields:
            raise KeysFileError(f"{where}: {field}= is given twice")
        fields[field] = value
    name = fields.get("name", "")
    if "name" in fields and not NAME.match(name):
        raise KeysFileError(
            f"{where}: a name is 1 to {MAX_NAME_LENGTH} letters, digits, '.', '_' or '-'"
        )
    if "rate" not in fields:
        if "burst" in fields:
            raise KeysFileError(f"{where}: burst= needs a rate=")
        return name, None
    rate = RATE.match(fields["rate"])
    if not rate or not 1 <= int(rate[1]) <= MAX_COUNT:
        raise KeysFileError(
            f"{where}: rate= is N/s, N/min, N/h or N/d, N a whole number from 1 to {MAX_COUNT}"
        )
    count = int(rate[1])
    burst = fields.get("burst", str(count))
    if not burst.isascii() or not burst.isdigit() or not 1 <= int(burst) <= MAX_COUNT:
        raise KeysFileError(f"{where}: burst= is a whole number from 1 to {MAX_COUNT}")
    return name, Quota(rate=count, period=PERIODS[rate[2]], burst=int(burst))


def is_open(path: str, settings: Settings) -> bool:
    """Whether `path` is served without a key."""
    if path in ALWAYS_OPEN or path.startswith(OPEN_PREFIXES):
        return True
    if path == "/admin" or path.startswith("/admin/"):
        return True  # the admin API checks its own keys (admin.py)
    return path in PROBES and not settings.auth_probes


class Rejected(Exception):
    def __init__(self, message: str, error: str) -> None:
        super().__init__(message)
        self.error = error  # RFC 6750's error code for WWW-Authenticate


def presented_key() -> str:
    """The key this request shows. Raises Rejected when there is none or the
    Authorization header is not `Bearer <key>`."""
    return key_from(request.headers.get("Authorization"), request.headers.get("X-API-Key"))


def key_from(authorization: str | None, api_key: str | None) -> str:
    """The key shown by an `Authorization` value (`Bearer <key>`) or else an
    `X-API-Key` value, HTTP headers or gRPC metadata alike. Raises Rejected
    when there is none or the Authorization value is not `Bearer <key>`."""
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or not KEY.match(token):
            raise Rejected(
                "malformed Authorization header: send 'Authorization: Bearer <key>' "
                "or 'X-API-Key: <key>'",
                "invalid_request",
            )
        return token
    key = (api_key or "").strip()
    if not key:
        raise Rejected(
            "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            "",
        )
    return key


def unauthorized(message: str, error: str) -> errors.HttpError:
    """A 401, answered in the shape of the API the path belongs to (errors.py)."""
    challenge = REALM + (f', error="{error}"' if error else "")
    return errors.HttpError(
        401, message, {"WWW-Authenticate": challenge, "Cache-Control": "no-store"}
    )


def is_preflight() -> bool:
    """A browser's CORS preflight: it never carries a key (web/cors.py)."""
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def install(app: Flask, settings: Settings) -> None:
    """Require a key on `app` when `settings.api_keys` names a keys file, and
    hold each key to its quota (web/quotas.py).

    Raises KeysFileError when that file is unusable (the entry point has
    checked it before opening the port, so this only repeats the check).
    """
    if not settings.api_keys:
        return
    keys = load_keys(settings.api_keys)
    limited = sum(1 for entry in keys.entries if entry.quota)
    log.info("API keys required (%d accepted, %d with a quota)", len(keys), limited)
    limiter = quotas.install(app, settings)

    @app.before_request
    def require_key() -> None:
        if is_open(request.path, settings) or (settings.cors_origins and is_preflight()):
            return
        try:
            key = presented_key()
        except Rejected as rejected:
            what = "malformed Authorization header" if rejected.error else "no key"
            log.warning("refused %s %s: %s", request.method, request.path, what)
            raise unauthorized(str(rejected), rejected.error) from None
        entry = keys.identify(key)
        if entry is None:
            log.warning("refused %s %s: unknown key", request.method, request.path)
            raise unauthorized("the API key is not valid", "invalid_token")
        limiter.admit(entry.name, entry.quota)
