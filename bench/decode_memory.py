"""Peak memory of a web server under concurrent decode bombs.

Starts `run_keras_server.py --model sim` (any --role; flags after `--` go to
it) on a private redis-server, then sends rounds of concurrent uploads that
are small on the wire and huge once decoded, all 8000x6000 (48 MP, inside the
default 50 MP limit): a 16-bit greyscale PNG, an RGBA PNG, a progressive
4:4:4 JPEG and a lossless WebP. Prints the answers by status and the peak
resident memory (VmHWM) of every server process against its resident memory
before the bombs.

    python -m bench.decode_memory --clients 48 --rounds 3
    python -m bench.decode_memory -- --role web --web-workers 2
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

from keras_server.broker.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
BIG = (8000, 6000)


def encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def bombs() -> dict[str, bytes]:
    grey = np.zeros(BIG[::-1], dtype=np.uint16)
    grey[:] = np.arange(BIG[0], dtype=np.uint16) * 8
    return {
        "png-16bit": encoded(Image.fromarray(grey), "PNG"),
        "png-rgba": encoded(Image.new("RGBA", BIG, (10, 20, 30, 128)), "PNG"),
        "jpeg-progressive-444": encoded(
            Image.new("RGB", BIG, (100, 150, 200)), "JPEG", progressive=True, subsampling=0
        ),
        "webp-lossless": encoded(Image.new("RGB", BIG, (1, 2, 3)), "WEBP", lossless=True),
    }


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def server_pids(process: subprocess.Popen[bytes]) -> list[int]:
    """The processes that decode: the HTTP front's workers, forks of the
    front's supervisor (which decodes nothing), itself `process` (--role web)
    or its child (--role all, beside the model worker and Redis)."""
    root = psutil.Process(process.pid)
    front = "keras_server.web.front"
    return [
        p.pid
        for p in root.children(recursive=True)
        if front in p.cmdline() and (parent := p.parent()) is not None and front in parent.cmdline()
    ]


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0912 (one linear script)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=48, help="uploads at once")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("server_args", nargs="*", help="after --: flags for the server")
    args = parser.parse_args(argv)
    files = bombs()
    for name, data in files.items():
        print(f"{name:22s} {len(data) / 1024:7.0f} KB on the wire, {BIG[0]}x{BIG[1]}")
    with RedisServer() as redis_server:
        port = free_port()
        worker = None
        if "web" in args.server_args:
            # --role web: the model runs elsewhere; a simulated worker beside it.
            worker = subprocess.Popen(
                [
                    sys.executable, "run_keras_server.py", "--role", "worker", "--model", "sim",
                    "--redis-url", redis_server.url, "--log-level", "ERROR",
                    "--sim-batch-ms", "1", "--sim-image-ms", "0",
                ],
                cwd=ROOT,
            )  # fmt: skip
        process = subprocess.Popen(
            [
                sys.executable, "run_keras_server.py", "--model", "sim", "--port", str(port),
                "--redis-url", redis_server.url, "--log-level", "ERROR",
                "--sim-batch-ms", "1", "--sim-image-ms", "0", *args.server_args,
            ],
            cwd=ROOT,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if requests.get(base + "/readyz", timeout=1).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    print("the server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.3)
            pids = server_pids(process)
            before = {pid: status_kb(pid, "VmRSS") for pid in pids}
            kinds = [list(files)[i % len(files)] for i in range(args.clients)]
            answers: Counter[tuple[str, int]] = Counter()
            missing_retry_after = 0
            for _ in range(args.rounds):
                barrier = threading.Barrier(len(kinds))

                def send(kind: str, barrier: threading.Barrier = barrier) -> tuple[str, int, bool]:
                    barrier.wait()
                    response = requests.post(
                        base + "/predict", files={"image": files[kind]}, timeout=120
                    )
                    return kind, response.status_code, "Retry-After" in response.headers

                with ThreadPoolExecutor(len(kinds)) as pool:
                    for kind, status, retry_after in pool.map(send, kinds):
                        answers[kind, status] += 1
                        missing_retry_after += status == 503 and not retry_after
            alive = process.poll() is None and requests.get(base + "/healthz").status_code == 200
            print(f"\n{args.clients} uploads at once, {args.rounds} rounds:")
            for (kind, status), count in sorted(answers.items()):
                print(f"  {kind:22s} {status}: {count}")
            print(f"503 without Retry-After: {missing_retry_after}; server up after: {alive}")
            for pid in pids:
                peak = status_kb(pid, "VmHWM")
                print(
                    f"pid {pid}: resident {before[pid] / 1024:.0f} MB before, "
                    f"peak {peak / 1024:.0f} MB (+{(peak - before[pid]) / 1024:.0f} MB)"
                )
        finally:
            for started in (process, worker):
                if started is not None:
                    started.terminate()
                    started.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
