"""Serve a model as a subprocess and drive it with stress_test.py's clients.

`ServerProcess` starts a command that listens on a port and waits until the
port answers HTTP (keras_server.processes.Child: its output in a log file,
stopped on exit with SIGTERM, then kill). `drive` runs one concurrency level:
warm-up requests first, not counted, then the measured ones, through
`stress_test.run`.
"""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from keras_server.processes import Child, ChildFailed
from run_cluster import http_answers
from stress_test import percentile, run

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


class ServerFailed(RuntimeError):
    """The server under test exited or never answered; the message has its log."""


class ServerProcess:
    """`command` running in a checkout's root, answering at `url` once started."""

    def __init__(
        self,
        name: str,
        command: list[str],
        url: str,
        log_path: Path,
        *,
        group: bool = False,
        cwd: Path = ROOT,
    ) -> None:
        """`group`: the server starts processes of its own that may outlive it
        (LitServe's workers do on SIGTERM); it gets its own process group, and
        whatever of it is left once it stopped is killed. `cwd`: the checkout
        it runs in (this one)."""
        self.name = name
        self.url = url
        self.group = group
        self.child = Child(name, command, log_path, cwd=cwd, env=ENV, tied=True, new_session=group)
        self.start_seconds = float("nan")

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.child.process

    def start(self, timeout: float) -> ServerProcess:
        self.child.start()
        try:
            # Any HTTP answer (a 405 for GET) means it listens.
            self.start_seconds = self.child.wait_until(http_answers(self.url), timeout, "answering")
        except ChildFailed as exc:
            self.stop()
            raise ServerFailed(str(exc)) from None
        log.info("%s answers after %.1f s", self.name, self.start_seconds)
        return self

    def stop(self) -> None:
        self.child.stop(20)
        if self.group:
            self.child.kill()  # SIGKILL to the group: what the leader left behind

    def log_tail(self, chars: int = 3000) -> str:
        return self.child.log_tail(chars)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Level:
    """One system at one concurrency: what stress_test measured."""

    system: str
    concurrency: int
    requests: int
    ok: int
    seconds: float
    throughput: float
    p50: float
    p95: float
    p99: float
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.requests - self.ok

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def drive(
    system: str,
    url: str,
    images: list[str],
    *,
    concurrency: int,
    requests_count: int,
    max_seconds: float,
    warmup: int,
) -> Level:
    """`warmup` requests (not counted), then up to `requests_count` requests at
    `concurrency`, stopping early after `max_seconds` (requests under way finish)."""
    if warmup:
        run(url, images, min(concurrency, warmup), warmup, None)
    load, elapsed = run(url, images, concurrency, requests_count, max_seconds)
    latencies = sorted(load.latencies)
    total = sum(load.statuses.values())
    level = Level(
        system=system,
        concurrency=concurrency,
        requests=total,
        ok=len(latencies),
        seconds=elapsed,
        throughput=load.throughput(),
        p50=statistics.median(latencies) if latencies else float("nan"),
        p95=percentile(latencies, 95),
        p99=percentile(latencies, 99),
        statuses=dict(load.statuses),
    )
    log.info(
        "%s at %d: %.2f req/s, p50 %.0f ms, p99 %.0f ms, %d errors of %d",
        system,
        concurrency,
        level.throughput,
        level.p50 * 1000,
        level.p99 * 1000,
        level.errors,
        total,
    )
    return level
