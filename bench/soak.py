"""A soak (issue 18, item 4): hours of wear squeezed into minutes.

    python -m bench.soak                       # 20 min, the run behind BENCHMARKS.md
    python -m bench.soak --duration 20 --kill-every 7 --redis-restart-at 10   # tests/test_soak.py

Starts its own redis-server (loopback, free port), a web server (`--role web`,
granian) and `--workers` workers (`--role worker --model sim`), measures
their capacity with a short closed loop, then drives them open-loop at
`--load` of it with a mix of good uploads (distinct images), bad ones (not an
image: 400) and hostile ones (empty, truncated, a header declaring 10^10
pixels, more images than --max-images: 400 or 413). Meanwhile it kills one
worker with SIGKILL and starts a new one every `--kill-every` s, and restarts
Redis once at `--redis-restart-at` s (in place: same port, nothing kept).

Every `--sample-every` s it records the RSS and open file descriptors of each
process (granian's supervisor with its web processes counts as one), and Redis's key
count and `used_memory`. Growth is measured per process lifetime, from the
first samples after `--warmup` s of it to the last ones.

Targets: after warm-up, growth < 5 % in each series; 0 requests lost (every
request answered or refused with a status, the one its kind allows); no key
left behind once the load stops (only the live workers' heartbeats and the
workers set remain). Writes OUT.json (every sample and the summary) and
OUT.png (the plot); exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import io
import json
import logging
import os
import signal
import statistics
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import redis
import requests
from PIL import Image

from keras_server.broker.messages import Keys
from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.processes import Child
from run_cluster import http_answers

log = logging.getLogger("bench.soak")

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "soak"
RESULT_TIMEOUT_S = 5.0
MAX_IMAGES = 4
GROWTH_TARGET = 0.05
# What each kind of request may end with. Anything else, or no status at
# all (a dropped connection, a client timeout), counts against the run.
ALLOWED = {
    "good": {200, 503, 504},
    "bad": {400},
    "empty": {400},
    "truncated": {400},
    "bomb": {413},
    "too_many": {413},
}
# The mix: most traffic good, the rest cycles through the bad kinds.
MIX = ["good"] * 14 + ["bad", "empty", "truncated", "bomb", "too_many", "good"]


def noise_png(index: int, size: int = 96) -> bytes:
    pixels = np.random.default_rng(index).integers(0, 256, (size, size, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A valid PNG header declaring 100000 x 100000 pixels: refused before decoding."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + ihdr + noise_png(0)[33:]


class Cluster:
    """Redis, one web server and the workers, each a child process."""

    def __init__(self, workers: int, sim_batch_ms: float, sim_image_ms: float) -> None:
        self.redis = RedisServer().start()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        common = [
            "--model", "sim", "--redis-url", self.redis.url, "--queue-name", QUEUE,
            "--result-timeout", str(RESULT_TIMEOUT_S), "--redis-timeout", "1",
        ]  # fmt: skip
        self.web = self._child(
            "web", "--role", "web", "--port", str(self.port),
            "--web-workers", "1", "--max-images", str(MAX_IMAGES), *common,
        )  # fmt: skip
        self.worker_args = [
            "--role", "worker", "--batch-size", "8", "--heartbeat-ttl", "3",
            "--sim-batch-ms", str(sim_batch_ms), "--sim-image-ms", str(sim_image_ms), *common,
        ]  # fmt: skip
        self.workers = [self._child(f"worker-{i}", *self.worker_args) for i in range(workers)]
        self.web.wait_until(http_answers(self.base + "/readyz", success=True), 90, "ready")

    def _child(self, name: str, *args: str) -> Child:
        command = [sys.executable, "run_keras_server.py", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return Child(name, command, cwd=ROOT, env=env, new_session=True, tied=True).start()

    def kill_worker(self, slot: int) -> None:
        """SIGKILL, as a crash would, then a new worker in its place."""
        old = self.workers[slot]
        old.kill()
        self.workers[slot] = self._child(old.name, *self.worker_args)

    def restart_redis(self) -> None:
        self.redis.stop()
        self.redis.start()

    def processes(self) -> dict[str, Child]:
        found = {"redis": self.redis.child, "web": self.web}
        found.update({w.name: w for w in self.workers})
        return found

    def stop(self) -> None:
        for child in [self.web, *self.workers]:
            child.stop(10)
        self.redis.close()


def tree_usage(pid: int) -> tuple[int, int]:
    """(RSS bytes, open file descriptors) of `pid` and its children."""
    rss = fds = 0
    try:
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            try:
                rss += process.memory_info().rss
                fds += process.num_fds()
            except psutil.NoSuchProcess:
                continue
    except psutil.NoSuchProcess:
        pass
    return rss, fds


def sample(cluster: Cluster, t: float) -> dict[str, object]:
    row: dict[str, object] = {"t": round(t, 2), "processes": {}}
    for name, child in cluster.processes().items():
        if child.pid is not None and child.alive():
            rss, fds = tree_usage(child.pid)
            row["processes"][name] = {"pid": child.pid, "rss": rss, "fds": fds}  # type: ignore[index]
    try:
        client = redis.Redis.from_url(cluster.redis.url, socket_timeout=2)
        row["redis_keys"] = int(client.dbsize())
        row["used_memory"] = int(client.info("memory")["used_memory"])
        client.close()
    except redis.RedisError:
        row["redis_keys"] = row["used_memory"] = None
    return row


@dataclasses.dataclass
class Tally:
    statuses: Counter[tuple[str, int | str]] = dataclasses.field(default_factory=Counter)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def add(self, kind: str, status: int | str) -> None:
        with self.lock:
            self.statuses[(kind, status)] += 1


def send(base: str, kind: str, index: int, images: list[bytes], tally: Tally) -> None:
    if kind == "good":
        files = [("image", ("x.png", images[index % len(images)]))]
    elif kind == "bad":
        files = [("image", ("x.png", b"this is not an image"))]
    elif kind == "empty":
        files = [("image", ("x.png", b""))]
    elif kind == "truncated":
        files = [("image", ("x.png", images[index % len(images)][:200]))]
    elif kind == "bomb":
        files = [("image", ("x.png", BOMB))]
    else:
        files = [("image", ("x.png", images[0]))] * (MAX_IMAGES + 1)
    try:
        status: int | str = requests.post(
            base + "/predict", files=files, timeout=RESULT_TIMEOUT_S + 10
        ).status_code
    except requests.RequestException as exc:
        status = type(exc).__name__
    tally.add(kind, status)


BOMB = bomb_png()


def capacity(base: str, images: list[bytes], seconds: float = 8.0, clients: int = 8) -> float:
    """Good requests per second the cluster answers under a closed loop."""
    done = Counter[int]()
    stop = time.monotonic() + seconds

    def client(n: int) -> None:
        with requests.Session() as session:
            i = n
            while time.monotonic() < stop:
                files = {"image": ("x.png", images[i % len(images)])}
                if session.post(base + "/predict", files=files, timeout=30).status_code == 200:
                    done[n] += 1
                i += clients

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return sum(done.values()) / seconds


def growth(samples: list[dict[str, object]], warmup: float) -> dict[str, float]:
    """Relative growth of each series over each process lifetime past `warmup` s:
    median of its last 3 samples against the median of its first 3."""
    series: dict[str, list[tuple[float, float]]] = {}
    first_seen: dict[str, float] = {}
    start = samples[0]["t"] if samples else 0.0
    for row in samples:
        t = float(row["t"])  # type: ignore[arg-type]
        for name, usage in row["processes"].items():  # type: ignore[attr-defined]
            for metric in ("rss", "fds"):
                key = f"{name}[{usage['pid']}].{metric}"
                first_seen.setdefault(key, t)
                series.setdefault(key, []).append((t, usage[metric]))
        for metric in ("redis_keys", "used_memory"):
            if row.get(metric) is not None:
                key = f"redis.{metric}"
                first_seen.setdefault(key, float(start))  # type: ignore[arg-type]
                series.setdefault(key, []).append((t, float(row[metric])))  # type: ignore[arg-type]
    result = {}
    for key, points in series.items():
        kept = [v for t, v in points if t - first_seen[key] >= warmup]
        if len(kept) >= 6:
            head, tail = statistics.median(kept[:3]), statistics.median(kept[-3:])
            result[key] = (tail - head) / head if head else 0.0
    return result


def leftover_keys(cluster: Cluster) -> list[str]:
    """Keys that outlive the requests: anything but the registry (live
    workers' heartbeats, the workers set, the versions and models workers
    published)."""
    keys = Keys(QUEUE)
    client = redis.Redis.from_url(cluster.redis.url, socket_timeout=5)
    try:
        live = {k.decode() for k in client.smembers(keys.workers)}
        allowed = {keys.workers, keys.worker_versions, keys.known_versions, keys.models}
        allowed |= {keys.heartbeat(w) for w in live}
        return sorted(k.decode() for k in client.scan_iter() if k.decode() not in allowed)
    finally:
        client.close()


def run(args: argparse.Namespace) -> dict[str, object]:
    images = [noise_png(i) for i in range(256)]
    cluster = Cluster(args.workers, args.sim_batch_ms, args.sim_image_ms)
    events: list[tuple[float, str]] = []
    samples: list[dict[str, object]] = []
    tally = Tally()
    try:
        measured = capacity(cluster.base, images)
        rate = max(measured * args.load, 1.0)
        log.info("capacity %.1f good req/s: soaking at %.1f req/s", measured, rate)
        t0 = time.monotonic()
        next_kill, slot, redis_restarted = args.kill_every, 0, False
        next_sample = 0.0
        pool = concurrent.futures.ThreadPoolExecutor(64)
        index = 0
        while (now := time.monotonic() - t0) < args.duration:
            if now >= next_sample:
                samples.append(sample(cluster, now))
                next_sample += args.sample_every
            if now >= next_kill:
                cluster.kill_worker(slot)
                events.append((now, f"kill worker-{slot}"))
                slot, next_kill = (slot + 1) % args.workers, next_kill + args.kill_every
            if not redis_restarted and now >= args.redis_restart_at:
                cluster.restart_redis()
                events.append((now, "restart redis"))
                redis_restarted = True
            pool.submit(send, cluster.base, MIX[index % len(MIX)], index, images, tally)
            index += 1
            time.sleep(max(0.0, t0 + index / rate - time.monotonic()))
        pool.shutdown(wait=True)
        # Answers nobody collected expire after --result-timeout.
        time.sleep(RESULT_TIMEOUT_S + 1)
        samples.append(sample(cluster, time.monotonic() - t0))
        left = leftover_keys(cluster)
        alive = {name: child.alive() for name, child in cluster.processes().items()}
    finally:
        cluster.stop()
    lost = {f"{k}:{s}": n for (k, s), n in tally.statuses.items() if s not in ALLOWED[k]}
    grown = growth(samples, args.warmup)
    summary = {
        "capacity_rps": round(measured, 1),
        "rate_rps": round(rate, 1),
        "requests": sum(tally.statuses.values()),
        "statuses": {f"{k}:{s}": n for (k, s), n in sorted(tally.statuses.items(), key=str)},
        "lost": lost,
        "keys_left": left,
        "alive": alive,
        "growth": {k: round(v, 4) for k, v in sorted(grown.items())},
        "over_target": sorted(k for k, v in grown.items() if v >= GROWTH_TARGET),
        "events": events,
    }
    return {"args": vars(args), "summary": summary, "samples": samples}


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    names = sorted({n for row in samples for n in row["processes"]})  # type: ignore[attr-defined]
    for name in names:
        rows = [(r["t"], r["processes"][name]) for r in samples if name in r["processes"]]
        axes[0].plot([t for t, _ in rows], [u["rss"] / 2**20 for _, u in rows], label=name)
        axes[1].plot([t for t, _ in rows], [u["fds"] for _, u in rows], label=name)
    timed = [r for r in samples if r.get("redis_keys") is not None]
    axes[2].plot([r["t"] for r in timed], [r["redis_keys"] for r in timed])
    axes[3].plot([r["t"] for r in timed], [r["used_memory"] / 2**20 for r in timed])
    for ax, title in zip(
        axes, ["RSS (MiB)", "open fds", "Redis keys", "Redis used_memory (MiB)"], strict=True
    ):
        ax.set_ylabel(title)
        for t, _ in result["summary"]["events"]:  # type: ignore[index]
            ax.axvline(t, color="grey", linewidth=0.5, linestyle=":")
    axes[0].legend(fontsize="small", ncol=2)
    axes[-1].set_xlabel("seconds (dotted: a worker killed, or Redis restarted)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=1200.0, help="seconds of load")
    parser.add_argument("--load", type=float, default=0.7, help="share of the measured capacity")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=120.0, help="seconds between kills")
    parser.add_argument("--redis-restart-at", type=float, default=600.0, help="seconds in")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds of each process")
    parser.add_argument("--sim-batch-ms", type=float, default=20.0)
    parser.add_argument("--sim-image-ms", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, args.out.with_suffix(".png"))
    summary = result["summary"]
    print(json.dumps(summary, indent=1, default=str))
    missed = summary["lost"] or summary["keys_left"] or summary["over_target"]  # type: ignore[index]
    return 1 if missed or not all(summary["alive"].values()) else 0  # type: ignore[index]


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
