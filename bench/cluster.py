"""Redis Cluster benchmark: images/s through nginx with the simulated model
against 1 Redis, 3 client-side shards and a 3-master Redis Cluster (3
replicas, `--queue-partitions 3`), then the cluster's failover gap: the
longest time without a successful answer after one master is SIGKILLed
under load.

    python bench/cluster.py [--clients 64] [--requests 1200] [--workers 3]
                            [--failover-seconds 20]

Each topology is a fresh local deployment (run_cluster.Cluster: 2 web
servers, N workers, nginx), one run each, on this machine. The model only
sleeps (1 ms per batch + 0.2 ms per image), so what is measured is the
broker and the serving layer, not a model. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from run_cluster import Cluster  # noqa: E402
from stress_test import run  # noqa: E402

SIM = ["--model", "sim", "--sim-batch-ms", "1", "--sim-image-ms", "0.2", "--batch-size", "16"]
TOPOLOGIES = {
    "1 Redis": {"redis_count": 1},
    "3 client-side shards": {"redis_count": 3},
    "Redis Cluster, 3 masters": {"redis_cluster": 3},
}


def measure(name: str, workers: int, clients: int, requests: int, image: str) -> dict[str, object]:
    options = TOPOLOGIES[name]
    with Cluster(
        web_count=2, worker_count=workers, server_args=SIM, say=lambda _: None, **options
    ) as cluster:
        url = cluster.url + "/predict"
        run(url, [image], clients, clients * 2, None)  # warm-up, not counted
        load, elapsed = run(url, [image], clients, requests, None)
    ok = len(load.latencies)
    if ok != requests:
        raise SystemExit(f"{name}: errors {dict(load.statuses)}")
    return {
        "topology": name,
        "throughput": ok / elapsed,
        "p50_ms": statistics.median(load.latencies) * 1000,
    }


def failover_gap(workers: int, clients: int, seconds: float, image: str) -> dict[str, object]:
    """Seconds from the SIGKILL of a master (under load) to the first
    success after the longest stretch without one, and the answers' statuses."""
    with Cluster(
        web_count=2, worker_count=workers, server_args=SIM, say=lambda _: None, redis_cluster=3
    ) as cluster:
        assert cluster.local_cluster is not None
        url = cluster.url + "/predict"
        found: dict[str, object] = {}

        def load() -> None:
            found["load"] = run(url, [image], clients, None, seconds)[0]

        thread = threading.Thread(target=load)
        thread.start()
        time.sleep(seconds / 4)
        victim = cluster.local_cluster.live_masters()[1]
        assert victim.process is not None
        killed = time.monotonic()
        victim.process.send_signal(signal.SIGKILL)
        thread.join()
    done = sorted(t for t in found["load"].finished_at if t >= killed)  # type: ignore[attr-defined]
    marks = [killed, *done]
    gap = max((b - a for a, b in itertools.pairwise(marks)), default=float("inf"))
    return {"gap_s": gap, "statuses": dict(found["load"].statuses)}  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--failover-seconds", type=float, default=20.0)
    parser.add_argument("--image", default=str(ROOT / "images" / "chelsea.png"))
    args = parser.parse_args()
    rows = [measure(n, args.workers, args.clients, args.requests, args.image) for n in TOPOLOGIES]
    print("| broker | throughput (images/s) | p50 latency (ms) |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['topology']} | {row['throughput']:.0f} | {row['p50_ms']:.0f} |")
    failover = failover_gap(args.workers, args.clients, args.failover_seconds, args.image)
    print(
        f"\nfailover: {failover['gap_s']:.1f} s without a success after SIGKILL of a master; "
        f"answers {failover['statuses']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
