"""A job's completion callback, what every process agrees on: the allowed
targets, the check of a URL against them, and the signature. Delivery is the
worker's (worker/callbacks.py).

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

Signature, as Stripe's and GitHub's: `X-Keras-Server-Timestamp: <Unix
seconds>` and `X-Signature-256: sha256=<hex>`, HMAC-SHA256 with the secret
of `<timestamp>.` followed by the exact body bytes. The receiver recomputes
it, compares in constant time, and refuses a timestamp more than 5 minutes
from its own clock, so a recorded delivery cannot be replayed later
(docs/api.md shows the check). Each try is signed afresh.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SIGNATURE_HEADER = "X-Signature-256"
TIMESTAMP_HEADER = "X-Keras-Server-Timestamp"
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
