"""`keras-server classify` against the server's own 32-client throughput.

    python -m bench.classify [--images 600] [--clients 32]

Starts a `--model sim` server (`--role all`, a private Redis), generates
photos of mixed sizes (VGA to 12 MP JPEGs), then measures, one after the
other: stress_test.py with --clients sending the same images (the server's
own throughput, images per second), and `keras-server classify` on the
folder with its defaults (shrinking, batching, 8 requests in flight). Prints
both, their ratio, and the CPU. The simulated model only sleeps, so this
measures the HTTP, decode and client paths, not a real model.
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from bench import cpu
from keras_server.broker.redis_server import free_port
from keras_server.processes import Child
from run_cluster import http_answers

SIZES = [(640, 480), (1280, 960), (2016, 1512), (4032, 3024)]


def photos(folder: Path, count: int) -> list[Path]:
    rng = random.Random(0)
    made = []
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        colour = tuple(rng.randrange(256) for _ in range(3))
        image = Image.new("RGB", size, colour)
        # Noise in a corner so each JPEG costs something to decode.
        image.paste(Image.effect_noise((128, 128), 64).convert("RGB"), (0, 0))
        path = folder / f"{i:05}.jpg"
        image.save(path, quality=90)
        made.append(path)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--classify", default="", help="extra flags for classify, one string")
    args = parser.parse_args()
    print(cpu.describe(cpu.model(), cpu.vector_flags()))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        made = photos(folder, args.images)
        command = [
            sys.executable, "run_keras_server.py", "--model", "sim", "--port", str(port),
            "--sim-batch-ms", "5", "--sim-image-ms", "0.5", "--max-images", "64",
        ]  # fmt: skip
        server = Child("server", command, Path(tmp) / "server.log").start()
        try:
            server.wait_until(http_answers(base + "/readyz", success=True), 120, "ready")
            stress = subprocess.run(
                [sys.executable, "stress_test.py", "--url", base + "/predict",
                 "--clients", str(args.clients), "--requests", str(args.images),
                 *map(str, made[: 4 * 8])],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            found = re.search(r"throughput ([0-9.]+)", stress.stdout)
            server_rate = float(found.group(1)) if found else float("nan")
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "keras_server", "classify", str(folder), "--url", base,
                 "--out", str(Path(tmp) / "out.jsonl"), "--quiet", *args.classify.split()],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            elapsed = time.perf_counter() - started
        finally:
            server.stop()
    client_rate = args.images / elapsed
    print(f"server, stress_test.py --clients {args.clients}: {server_rate:.1f} img/s")
    print(f"keras-server classify {args.classify} ({args.images} photos, exit {done.returncode}): "
          f"{client_rate:.1f} img/s in {elapsed:.1f} s")  # fmt: skip
    print(f"ratio: {client_rate / server_rate:.2f}")


if __name__ == "__main__":
    main()
