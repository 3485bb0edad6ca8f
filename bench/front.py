"""The HTTP front: throughput, 1-client latency and slow-client resistance of
the same Flask app behind different servers, measured side by side.

Starts a private redis-server and, for each system, a server on its own port
and queue, with the simulated model (`--model sim`: it only sleeps, so what is
measured is the serving tier). Systems:

- web-only fronts, all fed by one shared `--role worker --model sim`:
  `cheroot` (--role all's server until issue 23), `gunicorn` (gthread, one
  process) and `granian` (Rust connection handling, one process);
- `all`: `run_keras_server.py --role all` as `make serve` starts it, from this
  tree; `all-base`: the same from another checkout (`--base DIR`, e.g. a
  `git archive main` unpacked), to compare layouts.

Rounds are interleaved (every system once per round, `--repeat` rounds), since
the machine is shared: then a neighbour's load hits every system alike. Each
round per system: wrk at `--clients` connections for `--duration` s, wrk at 1
connection, and the slowloris check: `--slow` connections that each send a
header line every 2 s, then one normal /predict, timed (30 s client timeout).

    python -m bench.front --systems cheroot,gunicorn,granian
    python -m bench.front --systems all,all-base --base /tmp/base --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.processes import Child, http_answers

log = logging.getLogger("bench.front")

ROOT = Path(__file__).resolve().parent.parent
IMAGES = [ROOT / "images" / n for n in ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png")]
LUA = ROOT / "bench" / "multipart.lua"
WEB_ONLY = ("cheroot", "gunicorn", "granian")


def serve_cheroot() -> None:
    """`python -m bench.front --serve-cheroot`: the app on cheroot, web only,
    configured like --role all's server was (KERAS_SERVER_* variables)."""
    from cheroot.wsgi import Server

    from keras_server.settings import load_settings
    from keras_server.web.app import wsgi_app

    settings = load_settings([])
    server = Server(
        (settings.host, settings.port),
        wsgi_app(),
        numthreads=settings.web_threads,
        max=settings.web_threads,
        request_queue_size=128,
        server_name="keras-server",
    )
    try:
        server.safe_start()
    finally:
        server.stop()


def command(system: str, port: int, threads: int, base: Path | None) -> tuple[list[str], Path]:
    py = sys.executable
    if system == "cheroot":
        return [py, "-m", "bench.front", "--serve-cheroot"], ROOT
    if system == "gunicorn":
        return [
            py, "-m", "gunicorn", "-k", "gthread", "-w", "1", "--threads", str(threads),
            "-b", f"127.0.0.1:{port}", "keras_server.web.app:wsgi_app()",
        ], ROOT  # fmt: skip
    if system == "granian":
        return [
            py, "-m", "granian", "--interface", "wsgi", "--factory", "--workers", "1",
            "--blocking-threads", str(threads), "--no-ws", "--host", "127.0.0.1",
            "--port", str(port), "keras_server.web.app:wsgi_app",
        ], ROOT  # fmt: skip
    if system in ("all", "all-base"):
        where = ROOT if system == "all" else base
        if where is None:
            raise SystemExit("all-base needs --base DIR")
        return [py, "run_keras_server.py", "--role", "all"], where
    raise SystemExit(f"unknown system {system!r}")


def wrk(url: str, clients: int, duration: float) -> dict[str, Any]:
    env = {**os.environ, "BENCH_IMAGES": ":".join(str(p) for p in IMAGES)}
    done = subprocess.run(
        ["wrk", f"-t{min(clients, 2)}", f"-c{clients}", f"-d{max(1, round(duration))}s",
         "--timeout", "30s", "-s", str(LUA), url],
        env=env, capture_output=True, text=True, timeout=duration + 60, check=False,
    )  # fmt: skip
    found = re.search(r"WRK_JSON (\{.*\})", done.stdout)
    if not found:
        raise RuntimeError(f"wrk failed: {done.stdout}{done.stderr}")
    result = json.loads(found.group(1))
    result["rate"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def slowloris(url: str, count: int, settle: float = 4.0) -> float:
    """Seconds a normal /predict takes while `count` connections dribble
    header lines (one every 2 s); inf when it got no answer within 30 s."""
    host, port = url.split("//")[1].split("/", maxsplit=1)[0].split(":")
    stop = threading.Event()
    sockets: list[socket.socket] = []

    def dribble() -> None:
        for _ in range(count):
            try:
                s = socket.create_connection((host, int(port)), timeout=2)
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
                sockets.append(s)
            except OSError:
                pass
        while not stop.wait(2):
            for s in list(sockets):
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    sockets.remove(s)

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    time.sleep(settle)
    started = time.perf_counter()
    try:
        answer = requests.post(url, files={"image": ("x.png", IMAGES[0].read_bytes())}, timeout=30)
        seconds = time.perf_counter() - started if answer.status_code == 200 else float("inf")
    except requests.RequestException:
        seconds = float("inf")
    stop.set()
    thread.join()
    for s in sockets:
        s.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default="cheroot,gunicorn,granian")
    parser.add_argument("--base", type=Path, help="another checkout, for all-base")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=32, help="--web-threads of each server")
    parser.add_argument("--slow", type=int, default=100, help="slowloris connections (0: off)")
    parser.add_argument("--sim-batch-ms", default="5")
    parser.add_argument("--sim-image-ms", default="1")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve-cheroot", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_cheroot:
        serve_cheroot()
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    systems = args.systems.split(",")
    sim = {
        "KERAS_SERVER_MODEL": "sim",
        "KERAS_SERVER_SIM_BATCH_MS": args.sim_batch_ms,
        "KERAS_SERVER_SIM_IMAGE_MS": args.sim_image_ms,
        "KERAS_SERVER_WEB_THREADS": str(args.threads),
        "KERAS_SERVER_LOG_LEVEL": "WARNING",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    results: list[dict[str, Any]] = []
    with RedisServer() as redis_server:
        env = {**os.environ, **sim, "KERAS_SERVER_REDIS_URL": redis_server.url}
        children: dict[str, Child] = {}
        urls: dict[str, str] = {}
        try:
            if any(s in WEB_ONLY for s in systems):
                shared = {**env, "KERAS_SERVER_QUEUE_NAME": "front"}
                children["worker"] = Child(
                    "worker", [sys.executable, "run_keras_server.py", "--role", "worker"],
                    cwd=ROOT, env=shared, tied=True,
                ).start()  # fmt: skip
            for system in systems:
                port = free_port()
                argv, cwd = command(system, port, args.threads, args.base)
                queue = "front" if system in WEB_ONLY else system
                own = {**env, "KERAS_SERVER_QUEUE_NAME": queue, "KERAS_SERVER_PORT": str(port)}
                child = Child(system, argv, cwd=cwd, env=own, tied=True, new_session=True)
                children[system] = child.start()
                urls[system] = f"http://127.0.0.1:{port}/predict"
                child.wait_until(http_answers(f"http://127.0.0.1:{port}/readyz", success=True), 120)
            for system in systems:  # warm-up, not counted
                wrk(urls[system], args.clients, 2)
            for round_ in range(1, args.repeat + 1):
                for system in systems:
                    many = wrk(urls[system], args.clients, args.duration)
                    one = wrk(urls[system], 1, args.duration / 2)
                    slow = slowloris(urls[system], args.slow) if args.slow else float("nan")
                    row = {
                        "system": system,
                        "round": round_,
                        "rate": many["rate"],
                        "p50_ms": many["p50_us"] / 1000,
                        "errors": sum(many[k] for k in many if k.endswith("errors"))
                        + many["timeouts"],
                        "one_rate": one["rate"],
                        "one_p50_ms": one["p50_us"] / 1000,
                        "slow_s": slow,
                    }
                    log.info("%s", row)
                    results.append(row)
        finally:
            for child in children.values():
                child.stop(30)
    print(f"| system | round | req/s at {args.clients} | p50 ms | errors | 1 client p50 ms "
          f"| req/s at 1 | /predict under {args.slow} slow connections, s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['system']} | {r['round']} | {r['rate']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['errors']} | {r['one_p50_ms']:.2f} | {r['one_rate']:.1f} | {r['slow_s']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
