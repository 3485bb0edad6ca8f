"""What one /predict costs in Redis: commands, round trips and Redis CPU.

Starts a private redis-server and `run_keras_server.py --role all --model sim`
(the simulated model only sleeps), resets Redis's command statistics, sends
`--requests` uploads of one sample photo from `--clients` threads, and reads
INFO commandstats: per request, how many times each command ran and the
microseconds Redis spent in it. The worker's heartbeat and reaping (a few
commands a second whatever the load) are counted too: a run of a few seconds
shows them as a small share.

Then, on the same Redis, the cost of moving one payload (a 224x224 RGB image,
150 KB) through a Lua script against plain commands: the push script
`push_all` ran before (`LUA_PUSH`) against RPUSH, the claim script (`scripts.CLAIM`, one item)
against MULTI + LMOVE + EXEC; Redis microseconds per call, the median of
`--rounds` rounds of 32 calls.

    python -m bench.redis_calls --clients 1 --requests 300
    python -m bench.redis_calls --clients 16 --requests 1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import requests

from bench import cpu
from bench.webcpu import wait_ready
from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.broker.scripts import CLAIM

ROOT = Path(__file__).resolve().parent.parent


def commandstats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """command -> (calls, microseconds), EVALSHA's Lua calls listed apart."""
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for name, v in stats.items()
        if name.startswith("cmdstat_")
    }


# The push script `RequestQueue.push_all` ran until 2026-11-29 (KEYS: queue.
# ARGV: max depth, then the payloads; all of them or none).
LUA_PUSH = """
if redis.call('LLEN', KEYS[1]) + #ARGV - 1 > tonumber(ARGV[1]) then return -1 end
return redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
"""


def script_costs(client: redis.Redis, payload: bytes, rounds: int) -> dict[str, float]:
    """Redis microseconds per call: the payload through each script, and
    through the plain commands that would move it without Lua."""
    push = client.register_script(LUA_PUSH)
    claim = client.register_script(CLAIM)

    def lmove() -> None:
        pipe = client.pipeline(transaction=True)
        pipe.lmove("bench:q", "bench:p", "LEFT", "RIGHT")
        pipe.execute()

    ways = {
        "push: the Lua push script (before)": lambda: push(
            keys=["bench:in"], args=[10**9, payload]
        ),
        "push: RPUSH": lambda: client.rpush("bench:in", payload),
        # The claim script's KEYS: processing list, one wake-up list, one level.
        "claim one: the claim script": lambda: claim(
            keys=["bench:p", "bench:w", "bench:q"], args=[1, 0, 1, 1]
        ),
        "claim one: MULTI, LMOVE, EXEC": lmove,
    }
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, call in ways.items():
            client.delete("bench:in", "bench:q", "bench:p")
            client.rpush("bench:q", *[payload] * 32)
            client.config_resetstat()
            for _ in range(32):
                call()
            spent = sum(usec for _, usec in commandstats(client).values())
            samples[name].append(spent / 32)
    client.delete("bench:in", "bench:q", "bench:p")
    return {name: sorted(values)[len(values) // 2] for name, values in samples.items()}


def show(
    args: argparse.Namespace,
    stats: dict[str, tuple[int, int]],
    costs: dict[str, float],
    seconds: float,
    refused: int,
) -> None:
    """Print the tables (and write --json)."""
    total_calls = sum(calls for calls, _ in stats.values())
    total_usec = sum(usec for _, usec in stats.values())
    print(cpu.describe(cpu.model(), cpu.vector_flags()))
    print(
        f"{args.requests} requests from {args.clients} clients in {seconds:.1f} s "
        f"(batch size {args.batch_size}); {refused} not answered 200; per request:"
    )
    print(f"{'command':24s} {'calls':>8s} {'Redis us':>9s}")
    for name, (calls, usec) in sorted(stats.items(), key=lambda kv: -kv[1][0]):
        print(f"{name:24s} {calls / args.requests:8.2f} {usec / args.requests:9.1f}")
    print(f"{'all':24s} {total_calls / args.requests:8.2f} {total_usec / args.requests:9.1f}")
    print(f"one 150 KB payload, Redis us per call (median of {args.rounds} rounds of 32):")
    for name, usec in costs.items():
        print(f"  {name:36s} {usec:8.1f}")
    if args.json:
        report = {
            "clients": args.clients,
            "requests": args.requests,
            "seconds": seconds,
            "per_request": {
                name: {"calls": calls / args.requests, "usec": usec / args.requests}
                for name, (calls, usec) in stats.items()
            },
            "payload_us": costs,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="of the script comparison")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    data = (ROOT / "images" / "rocket.jpg").read_bytes()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"redis-calls-{os.getpid()}.log"
    with RedisServer() as redis_server, log_path.open("w") as log:
        port = free_port()
        command = [
            sys.executable, "run_keras_server.py", "--role", "all", "--port", str(port),
            "--redis-url", redis_server.url, "--model", "sim", "--sim-batch-ms", "1",
            "--sim-image-ms", "0", "--batch-size", str(args.batch_size), "--log-level", "WARNING",
        ]  # fmt: skip
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        client = redis.Redis.from_url(redis_server.url)
        local = threading.local()
        refused: list[int] = []

        def send(_: int) -> None:
            session = getattr(local, "session", None)
            if session is None:
                session = local.session = requests.Session()
            answer = session.post(base + "/predict", files={"image": ("x", data)}, timeout=60)
            if answer.status_code != 200:
                refused.append(answer.status_code)  # a 503 on a busy machine: counted

        try:
            wait_ready(base, server)
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(send, range(args.clients * 4)))  # warm: connections, scripts
                client.config_resetstat()
                started = time.monotonic()
                list(pool.map(send, range(args.requests)))
                seconds = time.monotonic() - started
                stats = commandstats(client)
            costs = script_costs(client, os.urandom(224 * 224 * 3), args.rounds)
        finally:
            server.terminate()
            server.wait(30)
            client.close()
    log_path.unlink(missing_ok=True)
    stats.pop("config|resetstat", None)
    stats.pop("info", None)
    show(args, stats, costs, seconds, len(refused))
    return 0


if __name__ == "__main__":
    sys.exit(main())
