"""`keras-server classify` against the server's own 32-client throughput.

    python -m bench.classify [--images 2000] [--clients 32] [--photos DIR]
        [--classify "FLAGS"]... [--server-args "FLAGS"]

Starts a server (`--role all`, a private Redis; `--model sim` unless
--server-args names another), generates photos of mixed sizes (VGA to 12 MP
JPEGs; kept in --photos to be reused), then measures, one after the other:
stress_test.py with --clients sending the first 32 photos as they are (the
server's own throughput, images per second), and `keras-server classify` on
the folder, once per --classify (its defaults when none is given: shrinking,
batching, 8 requests in flight), the whole command timed, start-up
included. Prints each, its ratio to the server's, and the CPU; and first,
timed on --shrink-cost photos in this process, the client's shrink per photo
(CPU), the server's decode of the original and of the shrunk photo, and how
far apart the model's inputs from the two end up. With the
simulated model (it only sleeps) this measures the HTTP, decode and client
paths, not a real model.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import cpu
from keras_server.broker.redis_server import free_port
from keras_server.catalog import SIM_SIZE
from keras_server.client.downscale import downscale_for_upload
from keras_server.images import load_image
from keras_server.processes import Child
from run_cluster import http_answers

SIZES = [(640, 480), (1280, 960), (2016, 1512), (4032, 3024)]


def photos(folder: Path, count: int) -> list[Path]:
    """`count` photos in `folder`, those already there (same names, same
    recipe) kept."""
    rng = random.Random(0)
    made = []
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        colour = tuple(rng.randrange(256) for _ in range(3))
        path = folder / f"{i:05}.jpg"
        made.append(path)
        if path.exists():
            continue
        image = Image.new("RGB", size, colour)
        # Noise in a corner so each JPEG costs something to decode.
        image.paste(Image.effect_noise((128, 128), 64).convert("RGB"), (0, 0))
        image.save(path, quality=90)
    return made


def shrink_cost(made: list[Path], size: tuple[int, int]) -> None:
    """CPU per photo (this process, one thread) of the client's shrink, and of
    the server's decode of the original and of the shrunk photo, and how far
    apart what the model sees ends up (mean absolute difference, 0-255)."""
    datas = [path.read_bytes() for path in made]
    started = time.process_time()
    shrunk = [downscale_for_upload(data, size) for data in datas]
    shrink_ms = (time.process_time() - started) / len(datas) * 1000
    seen = {}
    for name, files in (("original", datas), ("shrunk", shrunk)):
        started = time.process_time()
        seen[name] = [load_image(data, size, 100_000_000).astype(np.float64) for data in files]
        decode_ms = (time.process_time() - started) / len(files) * 1000
        kb = sum(map(len, files)) / len(files) / 1000
        print(f"server decode of the {name}: {decode_ms:.1f} ms/photo, {kb:.0f} KB/photo")
    difference = np.mean([np.abs(a - b).mean() for a, b in zip(*seen.values(), strict=True)])
    print(
        f"client shrink: {shrink_ms:.1f} ms/photo; the model's input from the shrunk photo "
        f"vs the original: mean |difference| {difference:.4f} /255"
    )


SIM = ["--model", "sim", "--sim-batch-ms", "5", "--sim-image-ms", "0.5"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument(
        "--classify",
        action="append",
        help="flags for one classify run, one string (repeat for several; default: none)",
    )
    parser.add_argument("--photos", help="folder to keep the generated photos in (reused)")
    parser.add_argument(
        "--server-args", default="", help="instead of the simulated model's: " + " ".join(SIM)
    )
    parser.add_argument(
        "--shrink-cost", type=int, default=100, help="photos to time the shrink on, first"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds to start the server")
    args = parser.parse_args()
    print(cpu.describe(cpu.model(), cpu.vector_flags()))
    runs = args.classify or [""]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.photos) if args.photos else Path(tmp) / "photos"
        folder.mkdir(parents=True, exist_ok=True)
        made = photos(folder, args.images)
        shrink_cost(made[: args.shrink_cost], (SIM_SIZE, SIM_SIZE))
        # Only this run's photos in the folder classify walks.
        if len(list(folder.iterdir())) != len(made):
            folder = Path(tmp) / "these"
            folder.mkdir()
            for path in made:
                (folder / path.name).symlink_to(path.resolve())
        server_flags = args.server_args.split() if args.server_args else SIM
        command = [
            sys.executable, "run_keras_server.py", "--port", str(port), "--max-images", "64",
            *server_flags,
        ]  # fmt: skip
        print("server:", " ".join(server_flags))
        server = Child("server", command, Path(tmp) / "server.log").start()
        results = []
        try:
            server.wait_until(http_answers(base + "/readyz", success=True), args.timeout, "ready")
            stress = subprocess.run(
                [sys.executable, "stress_test.py", "--url", base + "/predict",
                 "--clients", str(args.clients), "--requests", str(args.images),
                 *map(str, made[: 4 * 8])],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            found = re.search(r"throughput ([0-9.]+)", stress.stdout)
            server_rate = float(found.group(1)) if found else float("nan")
            print(f"server, stress_test.py --clients {args.clients}: {server_rate:.1f} img/s")
            for i, flags in enumerate(runs):
                started, cpu_before = time.perf_counter(), os.times()
                done = subprocess.run(
                    [sys.executable, "-m", "keras_server", "classify", str(folder), "--url", base,
                     "--out", str(Path(tmp) / f"out-{i}.jsonl"), "--quiet", *flags.split()],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                elapsed = time.perf_counter() - started
                cpu_after = os.times()
                client_cpu = (cpu_after.children_user - cpu_before.children_user) + (
                    cpu_after.children_system - cpu_before.children_system
                )
                rate = args.images / elapsed
                results.append((flags, rate))
                print(
                    f"keras-server classify {flags or '(defaults)'} ({args.images} photos, exit "
                    f"{done.returncode}): {rate:.1f} img/s in {elapsed:.1f} s, client CPU "
                    f"{client_cpu:.1f} s; ratio {rate / server_rate:.2f}",
                    flush=True,
                )
                if done.returncode:
                    print(done.stdout[-2000:], done.stderr[-2000:])
        finally:
            server.stop()


if __name__ == "__main__":
    main()
