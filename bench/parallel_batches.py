"""--parallel-batches: one batch at a time (LATENCY hint) against N at once
(THROUGHPUT hint, N infer requests), raw and served.

On ResNet50 with random weights (`bench.engines.prepare`, converted once into
`--work`'s conversion cache and reused by later runs):

- raw: the predictor loaded in this process with each setting, driven by as
  many threads as it runs batches at once, each calling `predict` on a batch
  of the sample photos back to back for `--seconds`: images per second;
- served: `run_keras_server.py --role all` with each setting, driven by wrk
  (bench/multipart.lua) at 1 connection and at 32, each after an uncounted
  warm-up (`bench.engines.wrk_levels`).

    python -m bench.parallel_batches --precision int8 --parallel 1 2
    python -m bench.parallel_batches --skip-served --batch-size 8 32
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import cpu, engines, raw, serve
from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.catalog import ModelSpec
from keras_server.engines.choice import EngineOptions, load_predictor

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)


def spec_of(work: Path, precision: str) -> ModelSpec:
    return ModelSpec(
        name="resnet50", source="resnet50", weights=str(work / engines.WEIGHTS_FILE),
        engine="openvino", precision=precision, calibration_dir=str(work / "calibration"),
    )  # fmt: skip


def raw_rate(work: Path, precision: str, parallel: int, batch_size: int, seconds: float) -> float:
    """Images per second with `parallel` threads calling predict at once."""
    options = EngineOptions(str(work / "cache"), 0.0, 50_000_000, parallel_batches=parallel)
    predictor = load_predictor(spec_of(work, precision), options)
    photos = sorted(ROOT.glob("images/*.*g"))
    batch = raw.sample_batch(photos, batch_size)
    for _ in range(2 * parallel):
        predictor.predict(batch)
    done = [0] * parallel
    stop = threading.Event()

    def run(i: int) -> None:
        while not stop.is_set():
            predictor.predict(batch)
            done[i] += len(batch)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(parallel)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)


def served(
    work: Path, precision: str, parallel: int, batch_size: int, seconds: float
) -> dict[str, Any]:
    """wrk at 1 and 32 connections on a warm `--role all` server (its log in `work`)."""
    photos = sorted(ROOT.glob("images/*.*g"))
    with RedisServer() as redis_server:
        port = free_port()
        queue = f"bench-parallel-{parallel}"
        command = [
            sys.executable, "run_keras_server.py", "--role", "all",
            "--weights", str(work / engines.WEIGHTS_FILE), "--engine", "openvino",
            "--precision", precision, "--calibration-dir", str(work / "calibration"),
            "--cache-dir", str(work / "cache"), "--min-agreement", "0",
            "--batch-size", str(batch_size), "--redis-url", redis_server.url,
            "--queue-name", queue, "--port", str(port), "--log-level", "WARNING",
            "--parallel-batches", str(parallel),
        ]  # fmt: skip
        url = f"http://127.0.0.1:{port}/predict"
        name = f"parallel-{parallel}-{precision}"
        with serve.ServerProcess(name, command, url, work / f"{name}.log") as server:
            server.start(timeout=600)
            settle = functools.partial(engines.drain, url, redis_server.url, queue, photos[0])
            one, many = engines.wrk_levels(url, photos, seconds, settle)
    return {
        "one_p50_ms": round(one.p50 * 1000, 1),
        "one_rate": round(one.throughput, 1),
        "many_rate": round(many.throughput, 1),
        "many_p50_ms": round(many.p50 * 1000, 1),
        "errors": one.errors + many.errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-parallel-batches"))
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32])
    parser.add_argument("--seconds", type=float, default=20, help="per raw or wrk measurement")
    parser.add_argument("--repeats", type=int, default=1, help="raw rounds, in turns")
    parser.add_argument("--skip-raw", action="store_true")
    parser.add_argument("--skip-served", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    print(cpu.describe(cpu.model(), cpu.vector_flags()), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    engines.prepared(args.work, sorted(ROOT.glob("images/*.*g")))
    rows: list[dict[str, Any]] = []
    if not args.skip_raw:
        for repeat in range(args.repeats):
            for size in args.batch_size:
                for parallel in args.parallel:
                    rate = raw_rate(args.work, args.precision, parallel, size, args.seconds)
                    row = {"kind": "raw", "repeat": repeat, "batch": size, "parallel": parallel}
                    rows.append({**row, "images_per_s": round(rate, 1)})
                    print(json.dumps(rows[-1]), flush=True)
    if not args.skip_served:
        for parallel in args.parallel:
            size = args.batch_size[-1]
            result = served(args.work, args.precision, parallel, size, args.seconds)
            rows.append({"kind": "served", "batch": size, "parallel": parallel, **result})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu.model(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
