"""The response cache's cost and gain: throughput with unique inputs (every
lookup a miss) with the cache off and on, and the server's CPU per request
for a miss and for a hit.

Starts a private redis-server and two `run_keras_server.py --role all
--model sim` servers on it (their own queues), one with the cache off and
one with `--response-cache-ttl 600`; the simulated model only sleeps
(`--sim-batch-ms 1 --sim-image-ms 0`), so the web tier is what limits
throughput and the cache's work is not hidden behind a model's: the worst
case. `--sim-image-ms 20` makes the model the bottleneck, as a real one is. Each upload
is a sample image with a PNG text chunk holding a counter: every byte string
is new, the decode costs what the sample's does.

Rounds alternate off / on (`--rounds`), each sending `--requests` unique
uploads from `--clients` threads; the medians are reported. Then the cache-on
server gets the last round's uploads again: all hits. CPU is the server's
(every process of it, user + system) divided by the requests.

    flock /tmp/bench.lock nice -n -20 .venv/bin/python -m bench.response_cache
    python -m bench.response_cache --requests 300 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import requests

from bench import cpu
from bench.webcpu import cpu_seconds, wait_ready
from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.broker.response_store import ResponseStore
from keras_server.serving.cache import digest

ROOT = Path(__file__).resolve().parent.parent


def unique_uploads(sample: bytes, count: int, start: int) -> list[bytes]:
    """`sample` (a PNG) with a tEXt chunk "n=<i>" before its IEND, for i in
    start..start+count: new bytes, the same pixels."""
    end = sample.rindex(b"IEND") - 4  # the IEND chunk's length field
    uploads = []
    for i in range(start, start + count):
        data = b"n\0" + str(i).encode()
        chunk = b"tEXt" + data
        uploads.append(
            sample[:end]
            + struct.pack(">I", len(data))
            + chunk
            + struct.pack(">I", zlib.crc32(chunk))
            + sample[end:]
        )
    return uploads


def start(
    port: int, redis_url: str, queue: str, image_ms: float, *extra: str
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "run_keras_server.py", "--role", "all", "--port", str(port),
        "--redis-url", redis_url, "--queue-name", queue, "--log-level", "WARNING",
        "--model", "sim", "--sim-batch-ms", "1", "--sim-image-ms", str(image_ms), *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def tree(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    top = psutil.Process(process.pid)
    return [top, *top.children(recursive=True)]


def send_all(base: str, uploads: list[bytes], clients: int, expect: str | None) -> float:
    """POST every upload; the wall-clock seconds it took."""
    local = threading.local()

    def send(data: bytes) -> None:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        response = session.post(base + "/predict", files={"image": ("x.png", data)}, timeout=60)
        if response.status_code != 200:
            raise SystemExit(f"/predict answered {response.status_code}: {response.text}")
        if expect is not None and response.headers.get("X-Cache") != expect:
            raise SystemExit(f"X-Cache {response.headers.get('X-Cache')}, expected {expect}")

    with ThreadPoolExecutor(clients) as pool:
        started = time.perf_counter()
        list(pool.map(send, uploads))
        return time.perf_counter() - started


def measure(
    base: str, processes: list[psutil.Process], uploads: list[bytes], clients: int,
    expect: str | None,
) -> tuple[float, float]:  # fmt: skip
    """(requests per second, server CPU ms per request)."""
    before = cpu_seconds(processes)
    seconds = send_all(base, uploads, clients, expect)
    spent = cpu_seconds(processes) - before
    return len(uploads) / seconds, spent / len(uploads) * 1000


def metric(base: str, name: str) -> float:
    total = 0.0
    for line in requests.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name):
            total += float(line.split()[-1])
    return total


def cache_work_ms(redis_url: str, upload: bytes, repeat: int = 500) -> dict[str, float]:
    """The cache's own work on a miss, in this process, thread CPU ms each:
    the hash (and BLAKE2b's, for comparison), the lookup (GET of a missing
    key), the write (SET with a TTL)."""
    store = ResponseStore.open(redis_url, timeout=1.0)
    answer = b'{"success": true, "predictions": []}' * 10
    timed = {
        "hash": lambda i: digest(upload),
        "blake2b-128, for comparison": lambda i: hashlib.blake2b(upload, digest_size=16).digest(),
        "lookup": lambda i: store.get_many([f"bench:cache:missing:{i}"]),
        "store": lambda i: store.put_many({f"bench:cache:{i}": answer}, 60),
    }
    found = {}
    for name, work in timed.items():
        work(-1)
        started = time.thread_time()
        for i in range(repeat):
            work(i)
        found[name] = (time.thread_time() - started) / repeat * 1000
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--image", default="chelsea.png", help="the sample, in images/")
    parser.add_argument(
        "--sim-image-ms",
        type=float,
        default=0.0,
        help="the simulated model's sleep per image: 0 leaves the web tier the bottleneck "
        "(the cache's worst case); 20 makes the model it, as a real one is",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    print("CPU:", cpu.describe(cpu.model(), cpu.vector_flags()))
    sample = (ROOT / "images" / args.image).read_bytes()
    counter = 0
    rows: dict[str, list[tuple[float, float]]] = {"off": [], "miss": [], "hit": []}
    with RedisServer() as redis_server:
        ports = {"off": free_port(), "on": free_port()}
        servers = {
            "off": start(ports["off"], redis_server.url, "bench-off", args.sim_image_ms),
            "on": start(
                ports["on"],
                redis_server.url,
                "bench-on",
                args.sim_image_ms,
                "--response-cache-ttl",
                "600",
            ),
        }
        bases = {mode: f"http://127.0.0.1:{port}" for mode, port in ports.items()}
        try:
            for mode, server in servers.items():
                wait_ready(bases[mode], server)
            processes = {mode: tree(server) for mode, server in servers.items()}
            # Warm both: connections, the web processes' first requests.
            for mode in servers:
                send_all(bases[mode], unique_uploads(sample, 50, counter), args.clients, None)
                counter += 50
            last: list[bytes] = []
            for _ in range(args.rounds):
                for mode, row in (("off", "off"), ("on", "miss")):
                    last = unique_uploads(sample, args.requests, counter)
                    counter += args.requests
                    expect = "miss" if mode == "on" else None
                    rows[row].append(
                        measure(bases[mode], processes[mode], last, args.clients, expect)
                    )
            for _ in range(args.rounds):
                rows["hit"].append(measure(bases["on"], processes["on"], last, args.clients, "hit"))
            stored = metric(bases["on"], "keras_server_response_cache_stored_bytes_total")
            entries = metric(bases["on"], "keras_server_response_cache_misses_total")
            work = cache_work_ms(redis_server.url, sample)
        finally:
            for server in servers.values():
                server.terminate()
                server.wait(30)
    load = os.getloadavg()
    report: dict[str, Any] = {
        "cpu": cpu.model(),
        "flags": cpu.vector_flags(),
        "image": args.image,
        "upload_bytes": len(sample),
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "clients": args.clients,
        "sim_image_ms": args.sim_image_ms,
        "load": load,
        "bytes_per_entry": round(stored / entries) if entries else None,
        "cache_work_ms": {k: round(v, 3) for k, v in work.items()},
    }
    print(
        f"{args.rounds} rounds x {args.requests} uploads of {args.image} "
        f"({len(sample) / 1024:.0f} KB, each unique), {args.clients} clients, "
        f"--sim-image-ms {args.sim_image_ms:g}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(f"{'':24s} {'req/s (median)':>14s} {'server CPU ms/request (median)':>31s}  rounds")
    for row, values in rows.items():
        rps = statistics.median(v[0] for v in values)
        ms = statistics.median(v[1] for v in values)
        report[row] = {"rps": round(rps, 1), "cpu_ms": round(ms, 2), "rounds": values}
        label = {"off": "cache off", "miss": "cache on, unique (miss)", "hit": "cache on, hit"}
        rounds = ", ".join(f"{r:.0f}/{c:.2f}" for r, c in values)
        print(f"{label[row]:24s} {rps:14.1f} {ms:31.2f}  {rounds}")
    overhead = 1 - report["miss"]["rps"] / report["off"]["rps"]
    report["overhead_share"] = round(overhead, 4)
    print(
        f"cache overhead with unique inputs: {overhead:+.1%} of throughput; "
        f"{report['miss']['cpu_ms'] - report['off']['cpu_ms']:+.2f} ms CPU per request; "
        f"a hit costs {report['hit']['cpu_ms']:.2f} ms of CPU against a miss's "
        f"{report['miss']['cpu_ms']:.2f}; {report['bytes_per_entry']} bytes per entry"
    )
    print(
        "the cache's own work per miss, in this process (thread CPU): "
        + ", ".join(f"{k} {v:.3f} ms" for k, v in work.items())
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
