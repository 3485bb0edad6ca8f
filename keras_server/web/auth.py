"""API keys over HTTP (`--api-keys FILE`): every request but a few open paths
shows a key (serving/keys.py checks it), before its body is read.

A missing, wrong or malformed key is a 401 with `WWW-Authenticate`, in the
shape of the API the path belongs to; a key with nothing left of its quota is
a 429 (serving/quotas.py's gate), counting nothing. The key's `Caller` is
kept on the request (`caller()`): the pipeline charges its quota per image.
Every metered answer, refused or not, carries RateLimit-*.

Open without a key, always: `/healthz` (a liveness probe carries no key),
the upload page `/` with its `/assets/`, and `/openapi.json` (public
documentation; the page asks for a key when the API answers 401). The
probes, `/readyz`, `/metrics`, `/v2/health/live` and `/v2/health/ready`, are
open unless `--auth-probes` is on. The admin API (/admin/, admin.py) takes
admin keys alone, never API keys. Every other path, including routes added
later and unknown ones, needs a key: the check is a `before_request` hook
on the whole app, not a decorator on chosen routes. A CORS preflight
(`OPTIONS` with `Access-Control-Request-Method`, with `--cors-origins`)
needs no key: a browser never sends one with it.
"""

from __future__ import annotations

import hashlib
import logging

from flask import Flask, Response, g, request

from keras_server.serving.failures import Unauthenticated
from keras_server.serving.keys import Rejected, key_from, load_keys
from keras_server.serving.quotas import Caller, Limiter
from keras_server.settings import Settings

log = logging.getLogger(__name__)

ALWAYS_OPEN = frozenset({"/healthz", "/", "/openapi.json"})
OPEN_PREFIXES = ("/assets/",)
PROBES = frozenset({"/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
REALM = 'Bearer realm="keras-server"'


def is_open(path: str, settings: Settings) -> bool:
    """Whether `path` is served without a key."""
    if path in ALWAYS_OPEN or path.startswith(OPEN_PREFIXES):
        return True
    if path == "/admin" or path.startswith("/admin/"):
        return True  # the admin API checks its own keys (admin.py)
    return path in PROBES and not settings.auth_probes


def presented_key() -> str:
    """The key this request shows. Raises Rejected when there is none or the
    Authorization header is not `Bearer <key>`."""
    return key_from(request.headers.get("Authorization"), request.headers.get("X-API-Key"))


def caller() -> Caller | None:
    """The current request's caller, once its key was checked; None without --api-keys."""
    found: Caller | None = g.get("caller")
    return found


def owner() -> str:
    """Whose job this is: the digest of the request's API key ('' without keys)."""
    if g.get("caller") is None:
        return ""
    return hashlib.sha256(presented_key().encode()).hexdigest()


def unauthorized(message: str, error: str) -> Unauthenticated:
    """A 401, answered in the shape of the API the path belongs to (errors.py)."""
    challenge = REALM + (f', error="{error}"' if error else "")
    return Unauthenticated(message, {"WWW-Authenticate": challenge, "Cache-Control": "no-store"})


def is_preflight() -> bool:
    """A browser's CORS preflight: it never carries a key (web/cors.py)."""
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def install(app: Flask, settings: Settings, limiter: Limiter | None) -> None:
    """Require a key on `app` when `settings.api_keys` names a keys file, and
    gate each key on its quota (`limiter`).

    Raises KeysFileError when that file is unusable (the entry point has
    checked it before opening the port, so this only repeats the check).
    """
    if not settings.api_keys:
        return
    keys = load_keys(settings.api_keys)
    limited = sum(1 for entry in keys.entries if entry.quota)
    log.info("API keys required (%d accepted, %d with a quota)", len(keys), limited)

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
        g.caller = Caller(entry.name, entry.quota)
        if limiter is not None:
            limiter.gate(g.caller)

    @app.after_request
    def rate_limit_headers(response: Response) -> Response:
        """RateLimit-* on the answer to a metered request, errors included."""
        found: Caller | None = g.get("caller")
        if found is not None and found.decision is not None:
            response.headers.update(found.decision.headers)
        return response
