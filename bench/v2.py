"""The v2 inference protocol beside /predict, both driven by asyncio clients.

    python -m bench.v2                      # 1 and 8 concurrent requests
    python -m bench.v2 --concurrency 1,8,32 --requests 400

Run from the repository root. It starts its own redis-server and
`run_keras_server.py --role all --model sim` (the simulated model: what is
compared is the protocols' overhead, not a network's forward pass), then, at
each concurrency, drives one image per request through:

- `/predict`: aiohttp, a multipart upload (what curl and requests send);
- `v2 BYTES`: tritonclient.http.aio, `/v2/models/sim/infer` with the encoded
  file as a BYTES input in binary form (tritonclient's default), answered
  with the full probabilities, binary;
- `v2 UINT8`: the same with the pixels decoded and resized by the client,
  so the web tier decodes nothing;
- `gRPC BYTES` and `gRPC UINT8`: the same two requests over gRPC
  (tritonclient.grpc.aio, the server's `--grpc-port`), answered in
  `raw_output_contents`.

`concurrency` coroutines each send requests one after another; each system
gets warm-up requests first, not counted, and at each level the systems take
turns in rounds, so a shared machine's drifting load falls on all alike.
Results go to bench/results/v2.md and v2.json, with the load average of the
machine before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as aioclient
from tritonclient.http import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.images import load_image
from stress_test import percentile

from . import cpu
from .serve import ROOT, Level, ServerProcess

log = logging.getLogger("bench.v2")

IMAGE = ROOT / "images" / "chelsea.png"
RESULTS = ROOT / "bench" / "results"
SYSTEMS = ("/predict", "v2 BYTES", "v2 UINT8", "gRPC BYTES", "gRPC UINT8")
OUTPUT = "probabilities"

Send = Callable[[], Awaitable[str]]  # one request; returns its status


@dataclass
class Tally:
    """One system's requests at one concurrency, over all its rounds."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def level(self, system: str, concurrency: int) -> Level:
        latencies = sorted(self.latencies)
        return Level(
            system=system,
            concurrency=concurrency,
            requests=sum(self.statuses.values()),
            ok=len(latencies),
            seconds=self.seconds,
            throughput=len(latencies) / self.seconds,
            p50=statistics.median(latencies) if latencies else float("nan"),
            p95=percentile(latencies, 95),
            p99=percentile(latencies, 99),
            statuses=dict(self.statuses),
        )


async def measure(send: Send, concurrency: int, requests: int, tally: Tally) -> None:
    """`requests` split over `concurrency` coroutines that each send one
    after another, added to `tally`."""

    async def client(count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            status = await send()
            tally.statuses[status] += 1
            if status == "200":
                tally.latencies.append(time.perf_counter() - started)

    share = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in share))
    tally.seconds += time.perf_counter() - started


def senders(
    base: str,
    session: aiohttp.ClientSession,
    triton: aioclient.InferenceServerClient,
    rpc: grpcaio.InferenceServerClient,
) -> dict[str, Send]:
    data = IMAGE.read_bytes()
    pixels = load_image(data, (224, 224), 50_000_000)[None]

    async def predict() -> str:
        form = aiohttp.FormData()
        form.add_field("image", data, filename=IMAGE.name, content_type="image/png")
        async with session.post(base + "/predict", data=form) as response:
            await response.read()
            return str(response.status)

    async def v2(tensor: InferInput) -> str:
        try:
            result = await triton.infer("sim", [tensor], outputs=[InferRequestedOutput(OUTPUT)])
        except InferenceServerException as exc:
            return str(exc.status())
        if result.as_numpy(OUTPUT).shape != (1, 1000):
            return "wrong shape"
        return "200"

    def v2_bytes() -> Awaitable[str]:
        tensor = InferInput("image", [1], "BYTES")
        return v2(tensor.set_data_from_numpy(np.array([data], dtype=np.object_)))

    def v2_pixels() -> Awaitable[str]:
        tensor = InferInput("pixels", list(pixels.shape), "UINT8")
        return v2(tensor.set_data_from_numpy(pixels))

    async def grpc(tensor: grpcclient.InferInput) -> str:
        try:
            result = await rpc.infer(
                "sim", [tensor], outputs=[grpcclient.InferRequestedOutput(OUTPUT)]
            )
        except InferenceServerException as exc:
            return str(exc.status())
        if result.as_numpy(OUTPUT).shape != (1, 1000):
            return "wrong shape"
        return "200"

    def grpc_bytes() -> Awaitable[str]:
        tensor = grpcclient.InferInput("image", [1], "BYTES")
        return grpc(tensor.set_data_from_numpy(np.array([data], dtype=np.object_)))

    def grpc_pixels() -> Awaitable[str]:
        tensor = grpcclient.InferInput("pixels", list(pixels.shape), "UINT8")
        return grpc(tensor.set_data_from_numpy(pixels))

    return {
        "/predict": predict,
        "v2 BYTES": v2_bytes,
        "v2 UINT8": v2_pixels,
        "gRPC BYTES": grpc_bytes,
        "gRPC UINT8": grpc_pixels,
    }


def _chunks(total: int, rounds: int) -> list[int]:
    return [n for n in (total // rounds + (i < total % rounds) for i in range(rounds)) if n]


async def drive(
    base: str,
    grpc_port: int,
    concurrency: Sequence[int],
    *,
    requests: int,
    warmup: int,
    rounds: int,
) -> list[Level]:
    levels = []
    limit = aiohttp.TCPConnector(limit=max(concurrency))
    async with aiohttp.ClientSession(connector=limit) as session:
        triton = aioclient.InferenceServerClient(
            base.removeprefix("http://"), conn_limit=max(concurrency)
        )
        # One channel: HTTP/2 carries every concurrent call on it.
        rpc = grpcaio.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        try:
            send = senders(base, session, triton, rpc)
            for system in SYSTEMS:
                for _ in range(warmup):
                    await send[system]()
            for n in concurrency:
                # The systems take turns, round after round, so that the load
                # of a shared machine drifting weighs on each alike.
                tallies = {system: Tally() for system in SYSTEMS}
                for chunk in _chunks(requests, rounds):
                    for system in SYSTEMS:
                        await measure(send[system], n, chunk, tallies[system])
                for system, tally in tallies.items():
                    level = tally.level(system, n)
                    log.info(
                        "%s at %d: %.1f req/s, p50 %.1f ms, p99 %.1f ms, %d errors",
                        system, n, level.throughput, level.p50 * 1000, level.p99 * 1000,
                        level.errors,
                    )  # fmt: skip
                    levels.append(level)
        finally:
            await triton.close()
            await rpc.close()
    return levels


def server_command(
    port: int, grpc_port: int, redis_url: str, args: argparse.Namespace
) -> list[str]:
    return [
        sys.executable, "run_keras_server.py", "--role", "all", "--port", str(port),
        "--grpc-port", str(grpc_port),
        "--redis-url", redis_url, "--model", "sim",
        "--sim-batch-ms", str(args.sim_batch_ms), "--sim-image-ms", str(args.sim_image_ms),
        "--batch-size", str(args.batch_size), "--log-level", "WARNING",
    ]  # fmt: skip


def write(results: dict[str, Any], folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "v2.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        "| system | concurrency | requests | errors | throughput (req/s) | p50 (ms) | p95 (ms) "
        "| p99 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in results["levels"]:
        rows.append(
            f"| {lv['system']} | {lv['concurrency']} | {lv['requests']} | "
            f"{lv['requests'] - lv['ok']} | {lv['throughput']:.1f} | {lv['p50'] * 1000:.1f} | "
            f"{lv['p95'] * 1000:.1f} | {lv['p99'] * 1000:.1f} |"
        )
    table = "\n".join(rows)
    text = f"""# The v2 protocol beside /predict

```bash
{results["command"]}
```

{results["when"]}, {results["machine"]}; load average (1, 5, 15 min) before
{results["load_before"]}, after {results["load_after"]}. The server:
`{results["server"]}` (the simulated model: {results["model"]}), one image per
request, {results["rounds"]} rounds in which the systems take turns.
`/predict` is driven by aiohttp (multipart upload), `v2 BYTES` and `v2 UINT8`
by tritonclient.http.aio (binary tensors, full probabilities back), `gRPC
BYTES` and `gRPC UINT8` by tritonclient.grpc.aio (one channel, raw tensors),
the client on the same machine as the server.

{table}
"""
    (folder / "v2.md").write_text(text)
    return table


async def _grpc_ready(port: int, timeout: float) -> None:
    """Until the gRPC front (started beside the HTTP front) answers."""
    client = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if await client.is_server_ready():
                    return
            except InferenceServerException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gRPC front on port {port} did not answer")
            await asyncio.sleep(0.1)
    finally:
        await client.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.v2", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,8", help="comma-separated levels (1,8)")
    parser.add_argument("--requests", type=int, default=200, help="per system and level (200)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="turns the systems take at each level (5)"
    )
    parser.add_argument("--warmup", type=int, default=10, help="uncounted requests first (10)")
    parser.add_argument("--sim-batch-ms", type=float, default=5.0, help="server --sim-batch-ms (5)")
    parser.add_argument("--sim-image-ms", type=float, default=1.0, help="server --sim-image-ms (1)")
    parser.add_argument("--batch-size", type=int, default=32, help="server --batch-size (32)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    concurrency = [int(n) for n in args.concurrency.split(",")]
    log.info("CPU: %s", cpu.describe(cpu.model(), cpu.vector_flags()))
    load_before = [round(x, 2) for x in os.getloadavg()]
    with RedisServer() as redis_server, tempfile.TemporaryDirectory() as scratch:
        port, grpc_port = free_port(), free_port()
        command = server_command(port, grpc_port, redis_server.url, args)
        base = f"http://127.0.0.1:{port}"
        with ServerProcess(
            "sim", command, base + "/healthz", Path(scratch) / "server.log"
        ) as server:
            server.start(timeout=120)
            asyncio.run(_grpc_ready(grpc_port, timeout=60))
            levels = asyncio.run(
                drive(
                    base,
                    grpc_port,
                    concurrency,
                    requests=args.requests,
                    warmup=args.warmup,
                    rounds=args.rounds,
                )
            )
    shown = " ".join(["python -m bench.v2", *(argv if argv is not None else sys.argv[1:])])
    results = {
        "command": shown.strip(),
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu.describe(cpu.model(), cpu.vector_flags())}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "server": " ".join(command[1:])
        .replace(str(grpc_port), "GRPC_PORT")
        .replace(str(port), "PORT")
        .replace(redis_server.url, "URL"),
        "model": f"{args.sim_batch_ms:g} ms per batch + {args.sim_image_ms:g} ms per image",
        "rounds": args.rounds,
        "levels": [lv.as_dict() for lv in levels],
    }
    print(write(results, args.out))
    return 0 if all(lv.errors == 0 for lv in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
