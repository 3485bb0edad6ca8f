"""Serve a model as a subprocess and drive it with stress_test.py's clients.

`ServerProcess` starts a command that listens on a port, waits until the port
answers HTTP, keeps its output in a log file, and stops it on exit (SIGTERM,
then kill). `drive` runs one concurrency level: warm-up requests first, not
counted, then the measured ones, through `stress_test.run`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import requests

from keras_server.redis_launcher import die_with_parent
from stress_test import percentile, run

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


class ServerFailed(RuntimeError):
    """The server under test exited or never answered; the message has its log."""


class ServerProcess:
    """`command` running in the repo root, answering at `url` once started."""

    def __init__(self, name: str, command: list[str], url: str, log_path: Path) -> None:
        self.name = name
        self.command = command
        self.url = url
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None
        self.start_seconds = float("nan")

    def start(self, timeout: float) -> ServerProcess:
        started = time.monotonic()
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=ENV,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(f"{self.name} exited at start:\n{self.log_tail()}")
            with contextlib.suppress(requests.ConnectionError):
                # Any HTTP answer (a 405 for GET) means it listens.
                requests.get(self.url, timeout=2)
                self.start_seconds = time.monotonic() - started
                log.info("%s answers after %.1f s", self.name, self.start_seconds)
                return self
            time.sleep(0.25)
        self.stop()
        raise ServerFailed(f"{self.name} did not answer within {timeout:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 3000) -> str:
        if self._log is not None:
            self._log.flush()
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-chars:]

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
