"""CORS (`--cors-origins`): web pages of other origins may call the API from a
browser. Off by default; flask-cors does the protocol.

On every path, for an allowed origin: a preflight (`OPTIONS` with
`Access-Control-Request-Method`) is answered 200 with the methods and
request headers the API takes, without a key (auth.py lets it through; a
browser never sends one with it), and every answer, errors included (401,
413, 429, 503 ... from errors.py's handlers, which Flask's after-request
hooks see), carries `Access-Control-Allow-Origin` and exposes the response
headers a client reads (Retry-After, RateLimit-*, X-Cache, ...). An origin
not allowed gets no CORS header at all, so the browser keeps the answer from
its page. Credentials are never allowed: keys travel in headers, not cookies,
so `Access-Control-Allow-Credentials` is never sent, with `*` or without.

Origins are matched exactly (compiled as escaped patterns: flask-cors would
read a plain string holding `[` — an IPv6 host — as a regular expression),
and every answer but those for `*` says `Vary: Origin`, so a cache never
hands one origin's answer to another.

What granian answers itself (a request it cannot parse, headers past
--header-timeout) never reaches Flask and carries no CORS header; a browser's
fetch() does not produce such requests.
"""

from __future__ import annotations

import logging
import re

from flask import Flask
from flask_cors import CORS

from keras_server.settings import Settings

log = logging.getLogger(__name__)

METHODS = ("GET", "HEAD", "POST", "OPTIONS")
# What a browser may send: the key, the body's type, the v2 binary extension's
# header, and the priority headers of /predict.
ALLOW_HEADERS = (
    "Authorization", "X-API-Key", "Content-Type", "Inference-Header-Content-Length",
    "X-Priority", "X-Request-Timeout",
)  # fmt: skip
# What a page's script may read of an answer, beyond the CORS-safelisted ones.
EXPOSE_HEADERS = (
    "Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "X-Cache",
    "WWW-Authenticate", "Inference-Header-Content-Length",
)  # fmt: skip
# Seconds a browser may reuse a preflight's answer (Chromium caps it at 7200).
MAX_AGE_S = 600


def install(app: Flask, settings: Settings) -> None:
    """Answer CORS on `app` for `settings.cors_origins`; nothing when empty."""
    origins = settings.cors_origin_list
    if not origins:
        return
    allowed: str | list[re.Pattern[str]] = (
        "*" if origins == ("*",) else [re.compile(re.escape(o) + r"\Z", re.I) for o in origins]
    )
    CORS(
        app,
        resources={r"/*": {}},
        origins=allowed,
        methods=list(METHODS),
        allow_headers=list(ALLOW_HEADERS),
        expose_headers=list(EXPOSE_HEADERS),
        supports_credentials=False,
        send_wildcard=True,  # "*" itself, not the caller's origin echoed
        max_age=MAX_AGE_S,
        vary_header=True,
    )
    log.info("CORS: answering %s", ", ".join(origins))
