"""Level-1 latency while a flood of level-2 requests saturates the worker.

    python -m bench.priorities                         # the simulated model
    python -m bench.priorities --configs 0:0,4:30 --think-ms 0,100

Run from the repository root. For each pair of --low-priority-batch-size
(0: --batch-size, no limit) and --priority-hold-ms in `--configs`, it
starts its own redis-server and `run_keras_server.py --role all --model
sim` (50 ms per batch + 5 ms per image, batches of 16, unless
--server-args says otherwise), then measures one client sending level-1
requests one after another (X-Priority: 1, waiting `--think-ms` between
them, drawn uniformly from 0 to twice that, so they arrive at random points
of the batches running):

- idle: nothing else queued;
- flooded: `--flood` clients sending level-2 requests (X-Priority: 2) as fast
  as they are answered, more than a batch holds, so the worker never idles.
  Fewer than the server's --web-threads: each request holds a web thread
  while it waits, and a level-1 request that finds every thread held waits
  for one in the HTTP server's backlog, whatever its level (priorities order
  the Redis queue, not the HTTP front).

Prints a Markdown table: each setting's idle and flooded p50 (and p90) of the
level-1 client, their ratio (the issue's target: <= 1.5), and the level-2
throughput during the flood, with the level-1 client and (measured just
before it starts) alone. The images are generated at the model's input
size, so the web tier's decoding is small next to the model.
"""

from __future__ import annotations

import argparse
import io
import logging
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
from PIL import Image

from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.catalog import SIM_SIZE
from stress_test import percentile

from . import cpu
from .serve import ServerProcess

log = logging.getLogger("bench.priorities")

ROOT = Path(__file__).resolve().parent.parent
SIM = ["--model", "sim", "--sim-batch-ms", "50", "--sim-image-ms", "5", "--batch-size", "16"]


def image_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (SIM_SIZE, SIM_SIZE), (120, 30, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def post(session: requests.Session, url: str, data: bytes, level: int) -> float:
    """Seconds for one request; raises on anything but 200."""
    started = time.perf_counter()
    response = session.post(
        url, files={"image": ("x.png", data)}, headers={"X-Priority": str(level)}, timeout=60
    )
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
    return time.perf_counter() - started


def probe(url: str, data: bytes, count: int, think_s: float, rng: random.Random) -> list[float]:
    """`count` level-1 latencies from one client."""
    latencies = []
    with requests.Session() as session:
        for _ in range(count):
            if think_s:
                time.sleep(rng.uniform(0, 2 * think_s))
            latencies.append(post(session, url, data, 1))
    return latencies


class Flood:
    """`clients` threads sending level-2 requests until stopped; counts answers."""

    def __init__(self, url: str, data: bytes, clients: int) -> None:
        self.url, self.data = url, data
        self.stop = threading.Event()
        self.done = 0
        self.errors = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]

    def _loop(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                try:
                    post(session, self.url, self.data, 2)
                except (RuntimeError, requests.RequestException):
                    with self._lock:
                        self.errors += 1
                    continue
                with self._lock:
                    self.done += 1

    def __enter__(self) -> Flood:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def measure(
    lower: int, hold: float, args: argparse.Namespace, think_ms: list[float]
) -> list[dict[str, float]]:
    data = image_bytes()
    rows = []
    with RedisServer() as redis_server, tempfile.TemporaryDirectory() as scratch:
        port = free_port()
        command = [
            sys.executable, "run_keras_server.py", "--role", "all", "--port", str(port),
            "--redis-url", redis_server.url, "--web-workers", "1",
            "--web-threads", str(args.web_threads), "--log-level", "WARNING",
            "--priority-levels", "2", "--low-priority-batch-size", str(lower),
            "--priority-hold-ms", str(hold),
            *(args.server_args.split() if args.server_args else SIM),
        ]  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        with ServerProcess("server", command, base + "/healthz", Path(scratch) / "log") as server:
            server.start(timeout=300)
            url = base + "/predict"
            rng = random.Random(0)
            probe(url, data, 5, 0, rng)  # warm-up
            for think in think_ms:
                log.info("think %g ms: idle", think)
                idle = probe(url, data, args.requests, think / 1000, rng)
                log.info("flooded")
                with Flood(url, data, args.flood) as flood:
                    time.sleep(args.settle)
                    # The flood alone first: what batch work gets with no level-1 traffic.
                    before, started = flood.done, time.perf_counter()
                    time.sleep(args.settle)
                    alone = (flood.done - before) / (time.perf_counter() - started)
                    before, started = flood.done, time.perf_counter()
                    flooded = probe(url, data, args.requests, think / 1000, rng)
                    throughput = (flood.done - before) / (time.perf_counter() - started)
                    errors = flood.errors
                rows.append(
                    {
                        "lower": lower,
                        "hold": hold,
                        "think_ms": think,
                        "idle_p50": statistics.median(idle) * 1000,
                        "flood_p50": statistics.median(flooded) * 1000,
                        "flood_p90": percentile(sorted(flooded), 90) * 1000,
                        "ratio": statistics.median(flooded) / statistics.median(idle),
                        "throughput": throughput,
                        "alone": alone,
                        "errors": errors,
                    }
                )
                log.info("%s", rows[-1])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        default="0:0,4:0,1:0,0:30,4:30",
        help="LOWER:HOLD pairs: --low-priority-batch-size and --priority-hold-ms",
    )
    parser.add_argument("--think-ms", default="0,100", help="level-1 client's mean pause")
    parser.add_argument("--flood", type=int, default=24, help="level-2 clients")
    parser.add_argument(
        "--web-threads",
        type=int,
        default=64,
        help="the server's; more than --flood, or the flood holds every thread",
    )
    parser.add_argument("--requests", type=int, default=30, help="level-1 requests per phase")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of flood first")
    parser.add_argument("--server-args", default="", help="instead of the simulated model's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(f"CPU: {cpu.describe(cpu.model(), cpu.vector_flags())}")
    print(f"server: {args.server_args or ' '.join(SIM)}; flood: {args.flood} level-2 clients")
    think = [float(t) for t in args.think_ms.split(",")]
    configs = [c.split(":") for c in args.configs.split(",")]
    rows = [row for lower, hold in configs for row in measure(int(lower), float(hold), args, think)]
    print()
    print(
        "| --low-priority-batch-size | --priority-hold-ms | level-1 think (ms) | idle p50 (ms) "
        "| flooded p50 (ms) | flooded p90 (ms) | p50 ratio | level-2 req/s, with level 1 "
        "| level-2 req/s, alone |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['lower'] or 'off'} | {r['hold']:g} | {r['think_ms']:g} | {r['idle_p50']:.0f} | "
            f"{r['flood_p50']:.0f} | {r['flood_p90']:.0f} | {r['ratio']:.2f}x | "
            f"{r['throughput']:.1f} | {r['alone']:.1f} |"
            + (f" ({r['errors']} errors)" if r["errors"] else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
