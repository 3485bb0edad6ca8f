"""A fault-injection harness: Redis, a web server and a worker on three
"hosts" (Linux network namespaces) joined by veth links, so a test can cut,
slow or lossy-fy one link while the others carry on.

    root ns (pytest, load) ── web ns (gunicorn) ── redis ns (redis-server) ── worker ns
                        └───────────── observer link ─────┘

The Redis namespace is the hub: the web server and the worker each reach it
over their own link, and the test process reaches it over a third (to read
the queue's keys without crossing a link a scenario breaks). The test process
reaches the web server over a fourth. Every address is link-local
(169.254.N.0/24, N picked at random and free in the root namespace) and every
name carries a per-run tag, so parallel runs never collide.

A partition is a `tbf` qdisc too small for any packet on both ends of a link:
every frame is dropped silently, as on a dead switch port, and both ends keep
their connections open (no RST, no ICMP) until TCP or our read timeouts give
up. `tc netem` adds latency and loss where the kernel has sch_netem.

Needs root, iproute2 and network namespaces; `unavailable()` says why not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import random
import shutil
import signal
import subprocess
import uuid
from collections.abc import Sequence

log = logging.getLogger(__name__)

SUBNET_PREFIX = "169.254"


class NetnsError(RuntimeError):
    """An `ip` or `tc` command failed; the message has its stderr."""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
    if check and done.returncode:
        raise NetnsError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def unavailable() -> str | None:
    """Why namespaces with veth links cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (the fault tests run as root on CI)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    tag = uuid.uuid4().hex[:6]
    name = f"ksprobe-{tag}"
    try:
        sh("ip", "netns", "add", name)
        sh("ip", "link", "add", f"ksp{tag}a", "type", "veth", "peer", "name", f"ksp{tag}b")
        sh("tc", "qdisc", "add", "dev", f"ksp{tag}a", "root", *DROP_ALL)
    except NetnsError as exc:
        return f"cannot make a namespace, a veth pair and a tbf qdisc here: {exc}"
    finally:
        sh("ip", "link", "del", f"ksp{tag}a", check=False)
        sh("ip", "netns", "del", name, check=False)
    return None


def netem_unavailable() -> str | None:
    """Why `tc netem` cannot be used here (kernel without sch_netem), or None."""
    tag = uuid.uuid4().hex[:6]
    try:
        sh("ip", "link", "add", f"ksn{tag}a", "type", "veth", "peer", "name", f"ksn{tag}b")
        done = sh("tc", "qdisc", "add", "dev", f"ksn{tag}a", "root", "netem", "delay", "1ms",
                  check=False)  # fmt: skip
    except NetnsError as exc:
        return f"cannot make a veth pair: {exc}"
    finally:
        sh("ip", "link", "del", f"ksn{tag}a", check=False)
    if done.returncode:
        return (
            f"tc netem is unavailable (kernel {os.uname().release} has no sch_netem: "
            f"{done.stderr.strip()}; modprobe sch_netem where modules exist)"
        )
    return None


# A token bucket smaller than any packet: tbf drops every frame (counted as
# `dropped` in `tc -s qdisc`), which is what a partition looks like to TCP.
DROP_ALL = ("tbf", "rate", "1kbit", "burst", "1", "limit", "1")


@dataclasses.dataclass(frozen=True)
class End:
    netns: str | None  # None: the root namespace
    dev: str
    address: str

    def ip(self, *args: str) -> list[str]:
        return ["ip", *(["-n", self.netns] if self.netns else []), *args]

    def tc(self, *args: str) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*prefix, "tc", *args]


@dataclasses.dataclass(frozen=True)
class Link:
    """A veth pair between two namespaces, a /30 of its own."""

    name: str
    a: End
    b: End

    def partition(self) -> None:
        """Drop every frame both ways until `heal`."""
        self._qdisc(*DROP_ALL)

    def netem(self, delay_ms: float, loss_percent: float) -> None:
        """`delay_ms` more round-trip time (half each way) and `loss_percent`
        of the frames lost each way, until `heal`."""
        self._qdisc("netem", "delay", f"{delay_ms / 2:g}ms", "loss", f"{loss_percent:g}%")

    def heal(self) -> None:
        for end in (self.a, self.b):
            sh(*end.tc("qdisc", "del", "dev", end.dev, "root"), check=False)

    def _qdisc(self, *spec: str) -> None:
        for end in (self.a, self.b):
            sh(*end.tc("qdisc", "replace", "dev", end.dev, "root", *spec))


class Hosts:
    """Namespaces "redis", "web" and "worker" and the links between them.

    Use as a context manager: leaving it kills whatever still runs in the
    namespaces and deletes them (and so every veth and qdisc in them), also
    when the body failed or a step of the set-up did.
    """

    NAMES = ("redis", "web", "worker")

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.netns = {name: f"ks{self.tag}-{name}" for name in self.NAMES}
        self.links: dict[str, Link] = {}
        self._subnet = _free_subnet()
        self._next = 0

    def __enter__(self) -> Hosts:
        try:
            for name in self.netns.values():
                sh("ip", "netns", "add", name)
                sh("ip", "-n", name, "link", "set", "lo", "up")
            redis, web, worker = (self.netns[n] for n in self.NAMES)
            self._link("worker", worker, redis)  # worker <-> Redis
            self._link("web", web, redis)  # web server <-> Redis
            self._link("client", None, web)  # the load <-> web server
            self._link("observer", None, redis)  # the test's own Redis client
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def address(self, host: str, link: str) -> str:
        """The address `host` ("redis", "web", "worker" or "root") has on `link`."""
        found = self.links[link]
        netns = self.netns.get(host)
        for end in (found.a, found.b):
            if end.netns == netns:
                return end.address
        raise KeyError(f"{host} is not on link {link}")

    def command(self, host: str, args: Sequence[str]) -> list[str]:
        """`args` run inside `host`'s namespace."""
        return ["ip", "netns", "exec", self.netns[host], *args]

    def _link(self, name: str, a: str | None, b: str) -> None:
        net = ipaddress.ip_network(f"{self._subnet}.{4 * self._next}/30")
        self._next += 1
        first, second = (str(h) for h in net.hosts())
        dev_a, dev_b = f"ks{self.tag}{name[:3]}a", f"ks{self.tag}{name[:3]}b"
        sh("ip", "link", "add", dev_a, "type", "veth", "peer", "name", dev_b, "netns", b)
        if a is not None:
            sh("ip", "link", "set", dev_a, "netns", a)
        link = Link(name, End(a, dev_a, first), End(b, dev_b, second))
        for end in (link.a, link.b):
            sh(*end.ip("addr", "add", f"{end.address}/30", "dev", end.dev))
            sh(*end.ip("link", "set", end.dev, "up"))
        self.links[name] = link

    def close(self) -> None:
        for name in self.netns.values():
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            # Deleting a namespace deletes its veth ends, and with them their
            # peers in the root namespace and every qdisc on them.
            sh("ip", "netns", "del", name, check=False)
        for link in self.links.values():
            if link.a.netns is None:
                sh("ip", "link", "del", link.a.dev, check=False)


def _free_subnet() -> str:
    """169.254.N, with N unused by any address in the root namespace."""
    used = sh("ip", "-o", "-4", "addr", "show", check=False).stdout
    choices = list(range(16, 255))
    random.shuffle(choices)
    for n in choices:
        if f" {SUBNET_PREFIX}.{n}." not in used:
            return f"{SUBNET_PREFIX}.{n}"
    raise NetnsError("no free 169.254.N.0/24 in the root namespace")
