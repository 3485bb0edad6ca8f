"""The engine x precision table: each engine raw and served, with its start times.

For every (engine, precision), on ResNet50 with random weights saved to a
file (so the conversion cache can hold it):

1. cold start: `run_keras_server.py` with an empty conversion cache, timed
   from launch until the HTTP port answers (the port opens only once the model
   is converted, checked and warmed up); stopped;
2. warm start: the same command again, now a cache hit; this server is the
   one driven;
3. served: wrk (a C client, with `bench/multipart.lua`) at 1 connection, then
   at 32, each after an uncounted warm-up; wrk's own CPU time is recorded, so
   the client's share of the two cores is known;
4. raw: the same predictor loaded in the harness process (from the cache the
   server filled) and timed by `bench.raw.measure` at batch 1 and the batch size.

Random weights make int8 calibration and the fidelity check meaningless (the
activations of an untrained network have no typical range): the servers run
with `--min-agreement 0`, and the table reports the agreement it measured.
The calibration images are crops of the sample photos.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

from keras_server.broker.redis_server import free_port

from . import raw, serve

log = logging.getLogger(__name__)

ROOT = serve.ROOT
LUA = Path(__file__).with_name("multipart.lua")
SYSTEMS = (("keras", "fp32"), ("onnx", "fp32"), ("openvino", "fp32"))
SYSTEMS += (("openvino", "bf16"), ("openvino", "int8"))
CALIBRATION_IMAGES = 60
MODEL = "resnet50"  # the keras.applications network every table measures by default


def weights_file(model: str = MODEL) -> str:
    """The name prepare saves `model`'s random weights under."""
    return f"{model}-random.weights.h5"


WEIGHTS_FILE = weights_file()


class WrkMissing(RuntimeError):
    """wrk is not installed (Debian: apt-get install wrk)."""


@dataclass(frozen=True)
class WrkResult:
    connections: int
    seconds: float
    requests: int
    errors: int  # non-2xx answers, timeouts, socket errors
    p50: float
    p99: float
    client_cpu_seconds: float  # wrk's own user + system time

    @property
    def throughput(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else float("nan")

    @property
    def client_cpu_share(self) -> float:
        """wrk's CPU time over the run's wall time: 1.0 is one core."""
        return self.client_cpu_seconds / self.seconds if self.seconds else float("nan")


@dataclass
class EngineRow:
    engine: str
    precision: str
    cold_start: float = float("nan")
    warm_start: float = float("nan")
    one: WrkResult | None = None
    many: WrkResult | None = None
    raw: raw.RawResult | None = None
    fidelity: dict[str, Any] | None = None
    description: str = ""
    # share of the machine's CPU time other processes took while this row ran
    others_cpu_share: float = float("nan")
    failure: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.engine} {self.precision}"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("one", "many"):
            result = getattr(self, key)
            if result is not None:
                data[key] |= {
                    "throughput": result.throughput,
                    "client_cpu_share": result.client_cpu_share,
                }
        return data


def prepare(directory: Path, images: list[Path], model: str = MODEL) -> tuple[Path, Path]:
    """`model`'s random weights saved to a file, and a calibration directory."""
    import keras
    from PIL import Image

    from keras_server.catalog import BUILTINS

    keras.utils.set_random_seed(42)
    weights = directory / weights_file(model)
    getattr(keras.applications, BUILTINS[model].constructor)(weights=None).save_weights(weights)
    calibration = directory / "calibration"
    calibration.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    photos = [Image.open(p).convert("RGB") for p in images]
    for i in range(CALIBRATION_IMAGES):
        photo = photos[i % len(photos)]
        width, height = photo.size
        scale = rng.uniform(0.5, 1.0)
        w, h = int(width * scale), int(height * scale)
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        crop = photo.crop((x, y, x + w, y + h))
        if i % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(calibration / f"{i:03d}.jpg", quality=90)
    return weights, calibration


def prepared(directory: Path, images: list[Path], model: str = MODEL) -> tuple[Path, Path]:
    """What `prepare` saved in `directory` before, else `prepare` now: the
    weights file's hash keys the conversion cache, so a later run on the same
    directory reuses the conversion."""
    weights = directory / weights_file(model)
    if weights.exists():
        return weights, directory / "calibration"
    return prepare(directory, images, model)


def run_wrk(url: str, images: list[Path], connections: int, seconds: float) -> WrkResult:
    """wrk at `connections` for `seconds`; its own CPU time from rusage."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise WrkMissing("wrk is not installed: apt-get install wrk")
    threads = min(2, connections)
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s"]
    command += ["-s", str(LUA), url]
    env = {**os.environ, "BENCH_IMAGES": ":".join(str(p) for p in images)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise serve.ServerFailed(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    errors = sum(
        data[k]
        for k in ("status_errors", "timeouts", "connect_errors", "read_errors", "write_errors")
    )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return WrkResult(
        connections=connections,
        seconds=data["duration_us"] / 1e6,
        requests=data["requests"],
        errors=errors,
        p50=data["p50_us"] / 1e6,
        p99=data["p99_us"] / 1e6,
        client_cpu_seconds=cpu,
    )


def drain(url: str, redis_url: str, queue: str, image: Path) -> None:
    """Wait until what wrk left in flight is served: the queue empty (wrk
    names no X-Priority, so its requests wait at level 1, the plain list),
    then one request of our own answered (it waits for the batch being run)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 300
        while client.llen(queue) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        client.close()
    answered(url, image)


def answered(url: str, image: Path) -> None:
    """One request of our own, answered: it waits for the batch being run."""
    with image.open("rb") as f:
        requests.post(url, files={"image": f}, timeout=300)


def wrk_levels(
    url: str,
    images: list[Path],
    seconds: float,
    settle: Callable[[], None],
    around_many: contextlib.AbstractContextManager[object] | None = None,
) -> tuple[WrkResult, WrkResult]:
    """wrk at 1 connection, then at 32, each for `seconds` after an uncounted
    warm-up; `settle` waits until what wrk left in flight is served;
    `around_many`: a context the measured 32-connection run goes in (a
    `bench.process_cpu.Probe`)."""
    run_wrk(url, images, 1, min(5.0, seconds))
    settle()
    one = run_wrk(url, images, 1, seconds)
    run_wrk(url, images, 32, min(10.0, seconds))
    settle()
    with around_many or contextlib.nullcontext():
        many = run_wrk(url, images, 32, seconds)
    settle()
    return one, many


def server_command(
    row: EngineRow,
    *,
    weights: Path,
    calibration: Path,
    cache: Path,
    redis_url: str,
    batch_size: int,
    port: int,
    model: str = MODEL,
) -> list[str]:
    return [
        "python", "run_keras_server.py", "--model", model, "--weights", str(weights),
        "--engine", row.engine, "--precision", row.precision,
        "--calibration-dir", str(calibration), "--cache-dir", str(cache), "--min-agreement", "0",
        "--batch-size", str(batch_size), "--redis-url", redis_url,
        "--queue-name", f"bench-{row.engine}-{row.precision}", "--port", str(port),
    ]  # fmt: skip


def measure_served(
    row: EngineRow,
    *,
    weights: Path,
    calibration: Path,
    cache: Path,
    redis_url: str,
    batch_size: int,
    images: list[Path],
    seconds: float,
    logs: Path,
) -> None:
    """Cold start, warm start, then wrk at 1 and 32 connections on the warm server."""
    import sys

    for phase in ("cold", "warm"):
        port = free_port()
        command = server_command(
            row, weights=weights, calibration=calibration, cache=cache,
            redis_url=redis_url, batch_size=batch_size, port=port,
        )  # fmt: skip
        command[0] = sys.executable
        url = f"http://127.0.0.1:{port}/predict"
        name = f"{row.engine}-{row.precision}-{phase}"
        server = serve.ServerProcess(name, command, url, logs / f"{name}.log")
        with server:
            # A cold ResNet50 conversion takes minutes on 2 busy cores.
            server.start(timeout=600)
            if phase == "cold":
                row.cold_start = server.start_seconds
                continue
            row.warm_start = server.start_seconds
            models = requests.get(url.removesuffix("predict") + "models", timeout=10).json()
            with contextlib.suppress(LookupError, TypeError):
                listed = models["models"][0]
                row.fidelity, row.description = listed["fidelity"], listed["description"]
            queue = f"bench-{row.engine}-{row.precision}"
            settle = functools.partial(drain, url, redis_url, queue, images[0])
            row.one, row.many = wrk_levels(url, images, seconds, settle)
            log.info(
                "%s: cold %.1f s, warm %.1f s; 1 client p50 %.0f ms; 32 clients %.1f req/s "
                "(wrk used %.0f%% of a core)",
                row.name,
                row.cold_start,
                row.warm_start,
                row.one.p50 * 1000,
                row.many.throughput,
                100 * row.many.client_cpu_share,
            )
            if server.process is not None and server.process.poll() is not None:
                raise serve.ServerFailed(f"{name} died under load:\n{server.log_tail()}")


def measure_raw(
    row: EngineRow,
    *,
    weights: Path,
    calibration: Path,
    cache: Path,
    batch: np.ndarray,
    runs: dict[str, int],
    model: str = MODEL,
) -> None:
    """The same predictor in this process, from the cache the server filled."""
    from keras_server.catalog import ModelSpec
    from keras_server.engines.choice import EngineOptions, load_predictor

    spec = ModelSpec(
        name=model, source=model, weights=str(weights), engine=row.engine,
        precision=row.precision, calibration_dir=str(calibration),
    )  # fmt: skip
    started = time.perf_counter()
    predictor = load_predictor(spec, EngineOptions(str(cache), 0.0, 50_000_000))
    setup = time.perf_counter() - started
    row.raw = raw.measure(row.name, predictor, batch, **runs, setup_seconds=setup)
