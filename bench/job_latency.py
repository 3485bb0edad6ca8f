"""An interactive client's latency while a job runs (issue 20's second target).

    python -m bench.job_latency                       # the simulated model
    python -m bench.job_latency --think-ms 0,100 --job-images 1000

Run from the repository root. Starts its own redis-server and
`run_keras_server.py --role all --model sim` (50 ms per batch + 5 ms per
image, batches of 16, unless --server-args says otherwise) with the
priority settings' defaults spelled out (`--priority-levels 2
--low-priority-batch-size 1 --priority-hold-ms 30`), then, for each
`--think-ms`:

- idle: one client sends `/predict` requests one after another (no
  X-Priority: level 1, as any interactive client), waiting a pause drawn
  uniformly from 0 to twice `--think-ms` between them;
- during a job: `POST /jobs` with `--job-images` images (queued at the
  lowest level), and, once the 202 is in and the job runs, the same client
  again; the job must still be running when the client's last answer comes
  (checked: the row says so if not).

Prints a Markdown table: idle and during-job p50 (and p90) of the client,
their ratio (the issue's target: <= 1.5), and the job's images per second
beside the client and (measured first, a job run alone to its end) alone.
The images are PNGs at the model's input size, so the web tier's decoding is
small next to the model, as in bench/priorities.py.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

from keras_server.broker.redis_server import RedisServer, free_port
from stress_test import percentile

from . import cpu
from .priorities import SIM, image_bytes, probe
from .serve import ServerProcess

log = logging.getLogger("bench.job_latency")

PRIORITY = ["--priority-levels", "2", "--low-priority-batch-size", "1", "--priority-hold-ms", "30"]


def submit(base: str, data: bytes, count: int) -> str:
    """A job of `count` copies of `data`; its status URL."""
    files = [("image", (f"{i:05}.png", data)) for i in range(count)]
    response = requests.post(base + "/jobs", files=files, timeout=300)
    if response.status_code != 202:
        raise RuntimeError(f"POST /jobs: {response.status_code} {response.text[:200]}")
    return base + response.json()["status_url"]


def status(url: str) -> dict:
    response = requests.get(url, params={"limit": 1}, timeout=30)
    response.raise_for_status()
    return response.json()


def wait_running(url: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = status(url)
        if body["state"] != "queued" or body["done"]:
            return body
        time.sleep(0.05)
    raise RuntimeError("the job never started")


def run_alone(base: str, data: bytes, count: int) -> float:
    """Images per second of a job with nothing else on the server."""
    url = submit(base, data, count)
    body = wait_running(url)
    started, first_done = time.perf_counter(), body["done"]
    while body["state"] not in ("done", "cancelled"):
        time.sleep(0.1)
        body = status(url)
    return (body["done"] - first_done) / (time.perf_counter() - started)


def measure(args: argparse.Namespace, think_ms: list[float]) -> list[dict[str, float]]:
    data = image_bytes()
    rows = []
    with RedisServer() as redis_server, tempfile.TemporaryDirectory() as scratch:
        port = free_port()
        command = [
            sys.executable, "run_keras_server.py", "--role", "all", "--port", str(port),
            "--redis-url", redis_server.url, "--web-workers", "1", "--log-level", "WARNING",
            "--max-job-images", str(args.job_images), *PRIORITY,
            *(args.server_args.split() if args.server_args else SIM),
        ]  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        with ServerProcess("server", command, base + "/healthz", Path(scratch) / "log") as server:
            server.start(timeout=300)
            url = base + "/predict"
            rng = random.Random(0)
            probe(url, data, 5, 0, rng)  # warm-up
            alone = run_alone(base, data, args.alone_images)
            log.info("a job alone: %.1f img/s", alone)
            for think in think_ms:
                log.info("think %g ms: idle", think)
                idle = probe(url, data, args.requests, think / 1000, rng)
                log.info("during a job")
                job = submit(base, data, args.job_images)
                before = wait_running(job)
                started = time.perf_counter()
                during = probe(url, data, args.requests, think / 1000, rng)
                elapsed = time.perf_counter() - started
                after = status(job)
                requests.delete(job, timeout=30)  # the rest of it is not needed
                rows.append(
                    {
                        "think_ms": think,
                        "idle_p50": statistics.median(idle) * 1000,
                        "job_p50": statistics.median(during) * 1000,
                        "job_p90": percentile(sorted(during), 90) * 1000,
                        "ratio": statistics.median(during) / statistics.median(idle),
                        "job_rate": (after["done"] - before["done"]) / elapsed,
                        "alone": alone,
                        "ran_throughout": after["state"] == "running",
                        "job_done": after["done"],
                    }
                )
                log.info("%s", rows[-1])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--think-ms", default="0,100", help="the client's mean pause")
    parser.add_argument("--requests", type=int, default=30, help="client requests per phase")
    parser.add_argument("--job-images", type=int, default=1000, help="images in each job")
    parser.add_argument(
        "--alone-images", type=int, default=400, help="images of the job first run alone"
    )
    parser.add_argument("--server-args", default="", help="instead of the simulated model's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(f"CPU: {cpu.describe(cpu.model(), cpu.vector_flags())}")
    print(f"server: {args.server_args or ' '.join(SIM)} {' '.join(PRIORITY)}")
    think = [float(t) for t in args.think_ms.split(",")]
    rows = measure(args, think)
    print()
    print(
        "| client think (ms) | idle p50 (ms) | during-job p50 (ms) | during-job p90 (ms) "
        "| p50 ratio | job img/s, beside the client | job img/s, alone |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['think_ms']:g} | {r['idle_p50']:.0f} | {r['job_p50']:.0f} | "
            f"{r['job_p90']:.0f} | {r['ratio']:.2f}x | {r['job_rate']:.1f} | {r['alone']:.1f} |"
            + ("" if r["ran_throughout"] else f" (the job ended first: {r['job_done']:.0f} done)")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
