"""API keys: who a caller is. The keys file (`--api-keys FILE`), parsed and
held as SHA-256 digests; the key a request shows (`key_from`, the same for
HTTP headers and gRPC metadata); its entry: the name logs, metrics and Redis
know it by, and its quota (serving/quotas.py).

A key comes as `Authorization: Bearer <key>` or `X-API-Key: <key>`. It is
checked against every key of the file in constant time (SHA-256 digests
compared with `hmac.compare_digest`, all of them, whatever matched), so
neither the answer time nor an early exit tells a caller how close it came.
Keys never reach a log line. Which paths need a key, and the 401 they
answer, are each transport's (web/auth.py, rpc/server.py).
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

from keras_server.broker.quotas import Quota

log = logging.getLogger(__name__)

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


def read_keys_file(flag: str, path: str) -> str:
    """The text of the keys file `path`, given as `flag`; KeysFileError naming
    both when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise KeysFileError(f"{flag} {path}: cannot read it ({reason})") from None


def load_keys(path: str) -> ApiKeys:
    """The keys of `path` (`parse_keys`). Raises KeysFileError when the file
    cannot be read or holds no usable key."""
    return parse_keys(read_keys_file("--api-keys", path), f"--api-keys {path}")


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


class Rejected(Exception):
    def __init__(self, message: str, error: str) -> None:
        super().__init__(message)
        self.error = error  # RFC 6750's error code for WWW-Authenticate


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
            "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'", ""
        )
    return key
