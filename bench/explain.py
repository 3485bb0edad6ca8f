"""What an explanation costs: one explanation's engine time, and the level-2
`/predict` latency with and without a flood of explanations at the lowest
level.

    python -m bench.explain                                  # the simulated model
    python -m bench.explain --server-args "--model resnet50 --engine openvino \\
        --precision int8 --calibration-dir DIR --batch-size 16"

Run from the repository root, on a quiet machine (it measures latency).

1. Engine time: the model the server args name, loaded here as a worker
   loads it (cli.loader), warmed up, then shown what one occlusion
   explanation shows it (serving/explain.py: the image, then one copy per
   cell of the --grid, masked) in batches of --batch-size, `--repeats` times;
   the median. Where the engine is keras, one Grad-CAM too.
2. Latency: its own redis-server and `run_keras_server.py --role all
   --priority-levels 3` with the server args; `--clients` clients send
   level-2 `/predict` requests (X-Priority: 2) one after another for
   `--seconds`, first alone, then while `--explainers` clients send
   `/explain` (its images wait at level 3, the lowest) one after another.
   The level-2 p50 and p90 of both phases, their ratio (the issue's
   target: at most 1.10), the level-2 throughput, and the explanations
   finished per second.

Prints the CPU and a Markdown table of each. The images are the sample
photos (images/), decoded to the model's input size by the server.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.engines.predictor import warm_up
from keras_server.images import load_image
from keras_server.serving.explain import masked
from keras_server.settings import load_settings
from stress_test import percentile

from . import cpu
from .serve import ServerProcess

log = logging.getLogger("bench.explain")

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "images" / "chelsea.png"
SIM = ["--model", "sim", "--sim-batch-ms", "50", "--sim-image-ms", "5", "--batch-size", "16"]


def engine_time(server_args: list[str], grid: int, repeats: int) -> dict[str, float]:
    """Seconds of forward passes for one occlusion explanation (the median of
    `repeats`), and of one Grad-CAM where the engine computes it."""
    from keras_server.catalog import model_specs
    from keras_server.worker.main import loader

    settings = load_settings(server_args, environ={})
    models = model_specs(settings)
    spec = next(s for s in models.specs if s.name == models.default)
    predictor = loader(settings, spec)()
    warm_up(predictor, settings.batch_size)
    height, width, _ = predictor.input_shape
    pixels = load_image(PHOTO.read_bytes(), (width, height), settings.max_image_pixels)
    images = np.stack([pixels, *masked(pixels, grid)])
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for at in range(0, len(images), settings.batch_size):
            predictor.predict(images[at : at + settings.batch_size])
        times.append(time.perf_counter() - started)
    found = {
        "engine": f"{predictor.engine} {predictor.precision}",
        "images": len(images),
        "occlusion_s": statistics.median(times),
        "batch_size": settings.batch_size,
    }
    gradcam = getattr(predictor, "gradcam", None)
    if gradcam is not None:
        top = int(np.argmax(predictor.predict(pixels[np.newaxis])[0]))
        gradcam(pixels, top)  # builds the gradient model once
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            gradcam(pixels, top)
            runs.append(time.perf_counter() - started)
        found["gradcam_s"] = statistics.median(runs)
    return found


@dataclass
class Clients:
    """`count` threads POSTing `path` one request after another until stopped;
    each answer's latency (level-2 `/predict`) or count (`/explain`)."""

    url: str
    data: bytes
    count: int
    headers: dict[str, str] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _loop(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    response = session.post(
                        self.url,
                        files={"image": ("x.png", self.data)},
                        headers=self.headers,
                        timeout=120,
                    )
                    ok = response.status_code == 200
                except requests.RequestException:
                    ok = False
                with self._lock:
                    if ok:
                        self.latencies.append(time.perf_counter() - started)
                    else:
                        self.errors += 1

    def __enter__(self) -> Clients:
        self._threads = [
            threading.Thread(target=self._loop, daemon=True) for _ in range(self.count)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(120)

    def taken(self) -> list[float]:
        """The latencies so far, and forget them (the next phase starts clean)."""
        with self._lock:
            taken, self.latencies = self.latencies, []
            return taken


def latency(args: argparse.Namespace, server_args: list[str]) -> dict[str, float]:
    data = PHOTO.read_bytes()
    with RedisServer() as redis_server, tempfile.TemporaryDirectory() as scratch:
        port = free_port()
        command = [
            sys.executable, "run_keras_server.py", "--role", "all", "--port", str(port),
            "--redis-url", redis_server.url, "--web-workers", "1", "--web-threads", "64",
            "--log-level", "WARNING", "--priority-levels", "3",
            "--explain-grid", str(args.grid), *server_args,
        ]  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        with ServerProcess("server", command, base + "/healthz", Path(scratch) / "log") as server:
            server.start(timeout=600)
            level2 = {"X-Priority": "2"}
            # Warm-up: a first request of each kind, which compiles or allocates.
            requests.post(base + "/predict", files={"image": data}, timeout=300)
            requests.post(base + "/explain", files={"image": data}, timeout=300)
            with Clients(base + "/predict", data, args.clients, level2) as clients:
                time.sleep(args.settle)
                clients.taken()
                started = time.perf_counter()
                time.sleep(args.seconds)
                alone = clients.taken()
                alone_s = time.perf_counter() - started
                with Clients(base + "/explain", data, args.explainers) as explainers:
                    time.sleep(args.settle)
                    clients.taken()
                    explained_before = len(explainers.latencies)
                    started = time.perf_counter()
                    time.sleep(args.seconds)
                    flooded = clients.taken()
                    flooded_s = time.perf_counter() - started
                    explained = len(explainers.latencies) - explained_before
                    errors = clients.errors + explainers.errors
    if not alone or not flooded:
        raise RuntimeError("no level-2 request was answered: see the server log")
    return {
        "alone_p50": statistics.median(alone) * 1000,
        "alone_p90": percentile(sorted(alone), 90) * 1000,
        "flood_p50": statistics.median(flooded) * 1000,
        "flood_p90": percentile(sorted(flooded), 90) * 1000,
        "ratio": statistics.median(flooded) / statistics.median(alone),
        "alone_rps": len(alone) / alone_s,
        "flood_rps": len(flooded) / flooded_s,
        "explained_ps": explained / flooded_s,
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-args", default="", help="instead of the simulated model's")
    parser.add_argument("--grid", type=int, default=8, help="the occlusion grid (N x N)")
    parser.add_argument("--repeats", type=int, default=5, help="engine-time runs (the median)")
    parser.add_argument("--clients", type=int, default=4, help="level-2 /predict clients")
    parser.add_argument("--explainers", type=int, default=2, help="/explain clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="of each latency phase")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before each phase")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server_args = args.server_args.split() if args.server_args else SIM
    print(f"CPU: {cpu.describe(cpu.model(), cpu.vector_flags())}")
    print(f"server: {' '.join(server_args)}; grid {args.grid}x{args.grid}")
    engine = engine_time(server_args, args.grid, args.repeats)
    print()
    print("| engine | images per explanation | batch size | occlusion engine time (s) "
          "| Grad-CAM (s) |")  # fmt: skip
    print("|---|---|---|---|---|")
    gradcam = f"{engine['gradcam_s']:.3f}" if "gradcam_s" in engine else "n/a"
    print(
        f"| {engine['engine']} | {engine['images']} | {engine['batch_size']} "
        f"| {engine['occlusion_s']:.3f} | {gradcam} |"
    )
    found = latency(args, server_args)
    print()
    print(f"{args.clients} level-2 /predict clients; {args.explainers} /explain clients at level 3")
    print()
    print(
        "| level-2 p50 alone (ms) | p90 | level-2 p50 with explanations (ms) | p90 "
        "| p50 ratio | level-2 req/s alone | with explanations | explanations/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {found['alone_p50']:.0f} | {found['alone_p90']:.0f} | {found['flood_p50']:.0f} "
        f"| {found['flood_p90']:.0f} | {found['ratio']:.2f}x | {found['alone_rps']:.1f} "
        f"| {found['flood_rps']:.1f} | {found['explained_ps']:.2f} |"
        + (f" ({found['errors']} errors)" if found["errors"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
