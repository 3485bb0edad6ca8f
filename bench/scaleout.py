"""Scale-out benchmark: throughput through nginx with 1, 2 and 4 workers.

    python bench/scaleout.py [--workers 1,2,4] [--clients 64] [--requests 600]

Each level is a fresh local cluster (2 Redis shards, 2 web servers,
N workers, nginx) serving the simulated model (`--model sim`): on 2 CPU cores
the real ResNet50 saturates the machine by itself, so what is measured here
is the serving layer's ability to spread work, not the model. Prints a
Markdown table with each level's throughput and speed-up over one worker.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from run_cluster import Cluster  # noqa: E402
from stress_test import run  # noqa: E402

# 200 ms per batch + 10 ms per image, batches of up to 8: one worker manages
# about 8 / 0.28 = 28.6 images/s, so the web tier (not the model) would be
# the limit only far beyond 4 workers.
SIM = ["--model", "sim", "--sim-batch-ms", "200", "--sim-image-ms", "10", "--batch-size", "8"]


def measure(workers: int, clients: int, requests: int, image: str) -> dict[str, float]:
    with Cluster(2, 2, workers, server_args=SIM, say=lambda _: None) as cluster:
        url = cluster.url + "/predict"
        run(url, [image], clients, clients * 2, None)  # warm-up, not counted
        load, elapsed = run(url, [image], clients, requests, None)
    ok = len(load.latencies)
    if ok != requests:
        raise SystemExit(f"{workers} workers: errors {dict(load.statuses)}")
    return {
        "workers": workers,
        "throughput": ok / elapsed,
        "p50_ms": statistics.median(load.latencies) * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--image", default=str(ROOT / "images" / "chelsea.png"))
    args = parser.parse_args()
    rows = [
        measure(int(n), args.clients, args.requests, args.image) for n in args.workers.split(",")
    ]
    base = rows[0]["throughput"]
    print("| workers | throughput (req/s) | speed-up | p50 latency (ms) |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['workers']:.0f} | {row['throughput']:.1f} | "
            f"{row['throughput'] / base:.2f}x | {row['p50_ms']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
