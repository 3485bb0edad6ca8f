"""Load-test a running server: N concurrent clients, a request count or a duration.

    python stress_test.py --clients 16 --requests 400 [--url URL] [IMAGE ...]
    python stress_test.py --clients 16 --duration 30

Prints throughput, latency percentiles and errors by status; exits 1 if any
request failed in a way not listed in --expect (default: none may fail).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

DEFAULT_IMAGES = ["images/chelsea.png", "images/coffee.png", "images/rocket.jpg"]


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


class Load:
    """Shared counters for the client threads."""

    def __init__(self, total: int | None, deadline: float | None) -> None:
        self.total = total
        self.deadline = deadline
        self.tickets = itertools.count()
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.finished_at: list[float] = []  # monotonic time of each success
        self.statuses: collections.Counter[str] = collections.Counter()
        self.started = time.monotonic()
        self.issue_end: float | None = None  # when the first client ran out of work

    def next(self) -> bool:
        more = (self.deadline is None or time.monotonic() < self.deadline) and (
            self.total is None or next(self.tickets) < self.total
        )
        if not more:
            with self.lock:
                self.issue_end = self.issue_end or time.monotonic()
        return more

    def record(self, status: str, seconds: float) -> None:
        with self.lock:
            self.statuses[status] += 1
            if status == "200":
                self.latencies.append(seconds)
                self.finished_at.append(time.monotonic())

    def throughput(self) -> float:
        """Successes per second while every client had work: the tail, where
        fewer and fewer requests are in flight, would understate saturation."""
        end = self.issue_end or time.monotonic()
        done = sum(1 for t in self.finished_at if t <= end)
        return done / max(end - self.started, 1e-9)

    @property
    def done(self) -> int:
        with self.lock:
            return sum(self.statuses.values())


def client(url: str, payloads: list[tuple[str, bytes]], load: Load, timeout: float) -> None:
    session = requests.Session()
    for i in itertools.count():
        if not load.next():
            return
        name, data = payloads[i % len(payloads)]
        started = time.perf_counter()
        try:
            response = session.post(url, files={"image": (name, data)}, timeout=timeout)
            status = str(response.status_code)
        except requests.RequestException as exc:
            status = type(exc).__name__
        load.record(status, time.perf_counter() - started)


def progress(load: Load, stop: threading.Event, started: float) -> None:
    while not stop.wait(0.5):
        done, elapsed = load.done, time.monotonic() - started
        if load.total:
            filled = int(30 * done / load.total)
            bar = "#" * filled + "." * (30 - filled)
            sys.stderr.write(f"\r[{bar}] {done}/{load.total} {done / elapsed:6.1f} req/s")
        else:
            sys.stderr.write(f"\r{done} requests in {elapsed:5.1f} s {done / elapsed:6.1f} req/s")
        sys.stderr.flush()
    sys.stderr.write("\n")


def run(
    url: str, images: list[str], clients: int, total: int | None, duration: float | None
) -> tuple[Load, float]:
    payloads = [(Path(p).name, Path(p).read_bytes()) for p in images]
    started = time.monotonic()
    load = Load(total, started + duration if duration else None)
    load.started = started
    threads = [
        threading.Thread(target=client, args=(url, payloads, load, 120.0)) for _ in range(clients)
    ]
    stop = threading.Event()
    bar = threading.Thread(target=progress, args=(load, stop, started), daemon=True)
    bar.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    stop.set()
    bar.join()
    return load, elapsed


def report(load: Load, elapsed: float, clients: int) -> str:
    latencies = sorted(load.latencies)
    ok = len(latencies)
    lines = [
        f"clients {clients}, {sum(load.statuses.values())} requests in {elapsed:.1f} s",
        f"throughput {load.throughput():.2f} successful req/s while all clients were busy "
        f"({ok / elapsed:.2f} over the whole run)",
    ]
    if latencies:
        lines.append(
            "latency ms: "
            + ", ".join(
                f"{name} {value * 1000:.0f}"
                for name, value in (
                    ("p50", statistics.median(latencies)),
                    ("p95", percentile(latencies, 95)),
                    ("p99", percentile(latencies, 99)),
                    ("max", latencies[-1]),
                )
            )
        )
    lines.append("by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(load.statuses.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", default=DEFAULT_IMAGES)
    parser.add_argument("--url", default="http://localhost:5000/predict")
    parser.add_argument("--clients", type=int, default=16)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--requests", type=int, help="total requests (default 200)")
    group.add_argument("--duration", type=float, help="seconds to run instead of a count")
    parser.add_argument("--warmup", type=int, default=0, help="requests sent first, not counted")
    parser.add_argument(
        "--expect", default="", help="comma-separated statuses that do not count as failures"
    )
    args = parser.parse_args(argv)
    total = args.requests if args.requests or args.duration else 200
    if args.warmup:
        run(args.url, args.images, min(args.clients, args.warmup), args.warmup, None)
    load, elapsed = run(args.url, args.images, args.clients, total, args.duration)
    print(report(load, elapsed, args.clients))
    allowed = {"200", *filter(None, args.expect.split(","))}
    unexpected = sum(n for status, n in load.statuses.items() if status not in allowed)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
