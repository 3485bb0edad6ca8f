"""Web tier CPU per request, per kind of image, with the simulated model.

Starts a private redis-server and `run_keras_server.py --model sim` (the
simulated model only sleeps, so what is left is the web tier's own work):

- `--role all`: one process, HTTP server and model thread; its CPU counts
  the worker's share (claiming, answering) too;
- `--role web`: granian alone (its supervisor and web processes), with a separate
  `--role worker` process whose CPU is not counted.

For each image (the four samples, a generated 12 MP phone photo, and that
photo as the upload page / simple_request.py send it, downscaled) it sends
`--requests` uploads from `--clients` threads and divides the server's CPU
time (user + system, every process of it) by the requests. Decode + resize is
timed apart, in this process, on the same bytes (`images.load_image`, one
thread); "around" is the difference: HTTP, multipart, queueing, waiting,
answering, logging, metrics.

    python -m bench.webcpu --role all
    python -m bench.webcpu --role web --requests 300 --json bench/results/webcpu-web.json
    python -m bench.webcpu --role all -- --log-level WARNING     # flags after -- go to the server
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests
from PIL import Image

from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.catalog import SIM_SIZE
from keras_server.client.downscale import downscale_for_upload
from keras_server.images import load_image

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
SIZE = (SIM_SIZE, SIM_SIZE)


def phone_photo(seed: int = 12) -> bytes:
    """A 4000x3000 (12 MP) JPEG of about 4 MB, as a phone takes it: smooth
    shapes, fine texture, sensor noise, quality 92, EXIF-free."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    image = np.asarray(
        Image.fromarray(coarse).resize((4000, 3000), Image.Resampling.BICUBIC), dtype=np.int16
    )
    texture = np.asarray(
        Image.fromarray(rng.integers(0, 256, (750, 1000, 3), dtype=np.uint8)).resize(
            (4000, 3000), Image.Resampling.BILINEAR
        ),
        dtype=np.int16,
    )
    noisy = image + (texture - 128) // 3 + rng.integers(-6, 7, image.shape, dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def uploads() -> dict[str, bytes]:
    files = {name: (ROOT / "images" / name).read_bytes() for name in SAMPLES}
    phone = phone_photo()
    files["phone-12mp.jpg"] = phone
    files["phone-12mp.jpg, downscaled by the client"] = downscale_for_upload(phone, SIZE)
    return files


def decode_ms(data: bytes, repeat: int) -> float:
    load_image(data, SIZE, 50_000_000)
    started = time.thread_time()
    for _ in range(repeat):
        load_image(data, SIZE, 50_000_000)
    return (time.thread_time() - started) / repeat * 1000


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def wait_ready(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server exited during start-up")
        try:
            if requests.get(base + "/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass  # not listening yet, or granian still booting its web processes
        time.sleep(0.3)
    raise SystemExit("the server did not become ready")


def decode_cpu_seconds(base: str) -> float:
    """What the server counted; NaN from a version that did not count it
    (then "around" falls back to the decode timed here)."""
    for line in requests.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("keras_server_decode_cpu_seconds_total "):
            return float(line.split()[1])
    return float("nan")


def measure(
    base: str, server: list[psutil.Process], data: bytes, count: int, clients: int
) -> tuple[float, float, float]:
    """Server, decode and client CPU ms per request for `count` uploads of `data`."""
    local = threading.local()

    def send(_: int) -> int:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        response = session.post(base + "/predict", files={"image": ("x", data)}, timeout=60)
        if response.status_code != 200:
            raise SystemExit(f"/predict answered {response.status_code}: {response.text}")
        return response.status_code

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, range(clients * 2)))  # warm: connections, caches
        decode_before = decode_cpu_seconds(base)
        client_before = time.process_time()
        before = cpu_seconds(server)
        list(pool.map(send, range(count)))
        after = cpu_seconds(server)
        client_after = time.process_time()
        decode_after = decode_cpu_seconds(base)
    per_request = 1000 / count
    return (
        (after - before) * per_request,
        (decode_after - decode_before) * per_request,
        (client_after - client_before) * per_request,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("all", "web"), default="all")
    parser.add_argument("--requests", type=int, default=200, help="per image")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--decode-repeat", type=int, default=20)
    parser.add_argument("--only", help="only the images whose name contains this")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("server_args", nargs="*", help="after --: flags for the server")
    args = parser.parse_args(argv)

    files = {k: v for k, v in uploads().items() if not args.only or args.only in k}
    decode = {name: decode_ms(data, args.decode_repeat) for name, data in files.items()}
    sim = ["--model", "sim", "--sim-batch-ms", "1", "--sim-image-ms", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"webcpu-{os.getpid()}.log"
    rows: list[dict[str, Any]] = []
    with RedisServer() as redis_server, log_path.open("w") as log:
        port = free_port()
        common = ["--redis-url", redis_server.url, *sim]
        started = []
        if args.role == "web":
            worker = [sys.executable, "run_keras_server.py", "--role", "worker", *common]
            started.append(
                subprocess.Popen(worker, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
        server = subprocess.Popen(
            [
                sys.executable, "run_keras_server.py", "--role", args.role,
                "--port", str(port), *common, *args.server_args,
            ],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        started.append(server)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, server)
            top = psutil.Process(server.pid)
            processes = [top, *(c for c in top.children(recursive=True) if "redis" not in c.name())]
            for name, data in files.items():
                server_ms, decode_ms_, client_ms = measure(
                    base, processes, data, args.requests, args.clients
                )
                if math.isnan(decode_ms_):
                    decode_ms_ = decode[name]
                rows.append(
                    {
                        "image": name,
                        "bytes": len(data),
                        "server_cpu_ms": round(server_ms, 2),
                        "decode_resize_ms": round(decode_ms_, 2),
                        "around_ms": round(server_ms - decode_ms_, 2),
                        "decode_here_ms": round(decode[name], 2),
                        "client_cpu_ms": round(client_ms, 2),
                    }
                )
        finally:
            for process in reversed(started):
                process.terminate()
                process.wait(30)
    load = os.getloadavg()
    print(
        f"--role {args.role} {' '.join(args.server_args)}: {args.requests} requests per image, "
        f"{args.clients} clients; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"{'image':42s} {'KB':>6s} {'server CPU':>10s} {'decode+resize':>13s} "
        f"{'around':>7s} {'decode here':>11s} {'client CPU':>10s}  (ms per request)"
    )
    for row in rows:
        print(
            f"{row['image']:42s} {row['bytes'] / 1024:6.0f} {row['server_cpu_ms']:10.2f} "
            f"{row['decode_resize_ms']:13.2f} {row['around_ms']:7.2f} "
            f"{row['decode_here_ms']:11.2f} {row['client_cpu_ms']:10.2f}"
        )
    if args.json:
        report = {"role": args.role, "server_args": args.server_args, "load": load, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    log_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
