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
unknown is logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from pathlib import Path

from flask import Flask, request

from keras_server.settings import Settings
from keras_server.web import errors

log = logging.getLogger(__name__)

ALWAYS_OPEN = frozenset({"/healthz", "/", "/openapi.json"})
OPEN_PREFIXES = ("/assets/",)
PROBES = frozenset({"/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
# RFC 6750's b64token: what a bearer token may contain.
KEY = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")
MIN_KEY_LENGTH = 16
REALM = 'Bearer realm="keras-server"'


class KeysFileError(ValueError):
    """The keys file is missing, unreadable, empty or holds a bad line; the
    message says which line, never a key."""


class ApiKeys:
    """The accepted keys, kept only as SHA-256 digests."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise KeysFileError("no API keys given")
        self._digests = tuple(_digest(key) for key in keys)

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, candidate: str) -> bool:
        given = _digest(candidate)
        found = False
        for digest in self._digests:  # every one, so the time does not depend on which
            found |= hmac.compare_digest(given, digest)
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def load_keys(path: str) -> ApiKeys:
    """The keys of `path`: one per line; blank lines and `#` comments skipped.

    Raises KeysFileError when the file cannot be read or holds no usable key.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise KeysFileError(f"--api-keys {path}: cannot read it ({reason})") from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if not KEY.match(key):
            raise KeysFileError(
                f"--api-keys {path}, line {number}: a key may hold only letters, digits "
                "and . _ ~ + / - (then = padding)"
            )
        if len(key) < MIN_KEY_LENGTH:
            raise KeysFileError(
                f"--api-keys {path}, line {number}: a key must be at least "
                f"{MIN_KEY_LENGTH} characters long"
            )
        keys.append(key)
    if not keys:
        raise KeysFileError(f"--api-keys {path}: no keys in it (one per line)")
    return ApiKeys(keys)


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


def install(app: Flask, settings: Settings) -> None:
    """Require a key on `app` when `settings.api_keys` names a keys file.

    Raises KeysFileError when that file is unusable (the entry point has
    checked it before opening the port, so this only repeats the check).
    """
    if not settings.api_keys:
        return
    keys = load_keys(settings.api_keys)
    log.info("API keys required (%d accepted)", len(keys))

    @app.before_request
    def require_key() -> None:
        if is_open(request.path, settings):
            return
        try:
            key = presented_key()
        except Rejected as rejected:
            what = "malformed Authorization header" if rejected.error else "no key"
            log.warning("refused %s %s: %s", request.method, request.path, what)
            raise unauthorized(str(rejected), rejected.error) from None
        if not keys.accepts(key):
            log.warning("refused %s %s: unknown key", request.method, request.path)
            raise unauthorized("the API key is not valid", "invalid_token")
