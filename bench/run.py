"""One command, one machine: raw model, served model, the seed design, Redis memory.

    python -m bench.run            # the full run (about 30 min on 2 cores)
    python -m bench.run --quick    # a smoke test (~5 min)

    python -m bench.run --only-engine-table   # the engine x precision table alone

Run from the repository root. It starts its own redis-server on a free
loopback port, then, in order: the engine x precision table
(`bench/engines.py`: cold and warm start, wrk at 1 and 32 connections, the raw
forward pass; needs Debian's `wrk`); Redis memory per queued image for each
wire format; the raw forward pass in process for each engine; each engine
served by `run_keras_server.py --weights none` as a subprocess, driven at each
concurrency; the seed design (`bench/seed_server.py`) driven the same way.
Results go to bench/results/ (results.md, results.json, benchmark.png) and
BENCHMARKS.md; the table is printed too.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import redis

from keras_server.broker.redis_server import RedisServer, free_port

from . import cpu, engines, raw, redis_memory, report, serve
from .report import SEED, Results, system_name

log = logging.getLogger("bench")

ROOT = serve.ROOT
IMAGES = [ROOT / "images" / name for name in ("chelsea.png", "coffee.png", "rocket.jpg")]

# (full, quick) defaults of the knobs --quick changes
PRESETS: dict[str, tuple[object, object]] = {
    "requests": (200, 40),
    # at least this many requests per client: the ramp-up and the drain of the
    # last round (counted in the elapsed time) then weigh little on req/s
    "rounds": (8, 3),
    "max_seconds": (40.0, 8.0),
    "warmup": (8, 4),
    "batch_runs": (8, 3),
    "single_runs": (30, 10),
    "memory_count": (100, 30),
    "engine_seconds": (30.0, 12.0),
}


def _csv_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive whole numbers, e.g. 1,8,32,64")
    return values


# The engines run from a conversion of the Keras model, openvino the default on a CPU.
CONVERTED = ("onnx", "openvino")


def _csv_engines(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = set(values) - {"keras", *CONVERTED}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown engine(s) {', '.join(sorted(unknown))}")
    return values


def _csv_systems(text: str) -> list[tuple[str, str]]:
    """keras:fp32,openvino:int8,... ('none': no engine table)."""
    if text.strip().lower() == "none":
        return []
    systems = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        engine, _, precision = item.partition(":")
        if (engine, precision or "fp32") not in engines.SYSTEMS:
            known = ",".join(f"{e}:{p}" for e, p in engines.SYSTEMS)
            raise argparse.ArgumentTypeError(f"unknown {item!r}; known: {known}")
        systems.append((engine, precision or "fp32"))
    return systems


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test: ~2-3 minutes")
    parser.add_argument("--batch-size", type=int, default=32, help="server --batch-size (32)")
    parser.add_argument(
        "--concurrency", type=_csv_ints, default=[1, 8, 32, 64], help="levels (1,8,32,64)"
    )
    parser.add_argument(
        "--requests", type=int, help="measured requests per level (full 200, quick 40)"
    )
    parser.add_argument(
        "--rounds", type=int, help="but at least this many per client (full 8, quick 3)"
    )
    parser.add_argument("--max-seconds", type=float, help="time cap per level (full 40, quick 8)")
    parser.add_argument(
        "--warmup", type=int, help="uncounted requests before each level, at least one per "
        "client (full 8, quick 4)"
    )  # fmt: skip
    parser.add_argument(
        "--engines", type=_csv_engines, default=["keras", *CONVERTED],
        help="engines timed raw, in process (keras,onnx,openvino)",
    )  # fmt: skip
    parser.add_argument(
        "--serve-engines", type=_csv_engines,
        help="engines served and driven (full: as --engines; quick: keras)",
    )  # fmt: skip
    parser.add_argument("--skip-seed", action="store_true", help="do not run the seed design")
    parser.add_argument(
        "--engine-table", type=_csv_systems,
        help="engine:precision pairs of the engine table, served with wrk "
        "(full: all five; quick: openvino:fp32; 'none': skip it)",
    )  # fmt: skip
    parser.add_argument(
        "--engine-seconds", type=float,
        help="wrk seconds per engine-table level (full 30, quick 12)",
    )  # fmt: skip
    parser.add_argument(
        "--only-engine-table", action="store_true",
        help="skip the Redis memory, the classic raw / served levels and the seed design",
    )  # fmt: skip
    parser.add_argument("--batch-runs", type=int, help="timed raw passes at the batch size")
    parser.add_argument("--single-runs", type=int, help="timed raw one-image passes")
    parser.add_argument("--memory-count", type=int, help="requests queued to measure memory")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results",
        help="results.md, results.json, benchmark.png go here (bench/results)",
    )  # fmt: skip
    parser.add_argument(
        "--benchmarks-md", type=Path, default=ROOT / "BENCHMARKS.md",
        help="where to write BENCHMARKS.md ('-': do not)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for name, (full, quick) in PRESETS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.engine_table is None:
        args.engine_table = [("openvino", "fp32")] if args.quick else list(engines.SYSTEMS)
    if args.serve_engines is None:
        args.serve_engines = ["keras"] if args.quick else args.engines
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    page = args.benchmarks_md
    if str(page) != "-" and not args.out.resolve().is_relative_to(page.resolve().parent):
        # Checked before the run, not when the page links the plot at its end.
        parser.error(
            f"--out {args.out} is outside {page.parent}, so {page.name} could not link its "
            "plot: add --benchmarks-md - (or --benchmarks-md a page beside --out)"
        )
    return args


def machine() -> dict[str, object]:
    import keras
    import tensorflow as tf

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu.model(),
        # AVX-512 / AMX: the ratios between engines and precisions depend on them
        "cpu_flags": cpu.vector_flags(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "onnxruntime": ort_version,
        "openvino": _version("openvino"),
        "load_before": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and
    its finished children). Their changes over a run tell how much CPU time other
    processes took from it."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # - idle, iowait
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        own += usage.ru_utime + usage.ru_stime
    return busy, own


def run_memory(args: argparse.Namespace, results: Results, client: redis.Redis) -> None:
    image = raw.sample_batch(IMAGES[:1], 1)[0]
    formats = [
        ("keras-server: uint8, keras_server.broker.messages", redis_memory.ours),
        ("seed: float32 base64 JSON", redis_memory.seed(IMAGES[0])),
    ]
    for name, encode in formats:
        results.memory.append(redis_memory.measure(client, name, encode, image, args.memory_count))


def run_raw(args: argparse.Namespace, results: Results) -> None:
    from keras_server.catalog import ModelSpec
    from keras_server.engines.keras_engine import load_classifier

    batch = raw.sample_batch(IMAGES, args.batch_size)
    runs = {"batch_runs": args.batch_runs, "single_runs": args.single_runs}
    classifier = load_classifier(ModelSpec(name="resnet50", source="resnet50", weights="none"))
    if "keras" in args.engines:
        results.raw.append(raw.measure("keras", classifier, batch, **runs))
    for name in CONVERTED:
        if name not in args.engines:
            continue
        from keras_server.engines.choice import EngineOptions, load_predictor

        started = time.perf_counter()
        spec = ModelSpec(name="resnet50", source="resnet50", weights="none", engine=name)
        engine = load_predictor(spec, EngineOptions("none", 0.0, 50_000_000))
        setup = time.perf_counter() - started
        results.raw.append(raw.measure(name, engine, batch, **runs, setup_seconds=setup))
        del engine
    del classifier
    gc.collect()


def run_served(
    args: argparse.Namespace,
    results: Results,
    system: str,
    command: list[str],
    *,
    logs: Path,
    start_timeout: float,
) -> None:
    port = free_port()
    command = [*command, "--port", str(port)]
    url = f"http://127.0.0.1:{port}/predict"
    log.info("starting %s: %s", system, shlex.join(command))
    name = system.replace(" ", "_").replace("(", "").replace(")", "")
    server = serve.ServerProcess(system, command, url, logs / f"{name}.log")
    with server:
        server.start(timeout=start_timeout)
        results.start_seconds[system] = server.start_seconds
        images = [str(p) for p in IMAGES]
        for concurrency in args.concurrency:
            level = serve.drive(
                system,
                url,
                images,
                concurrency=concurrency,
                requests_count=max(args.requests, args.rounds * concurrency),
                max_seconds=args.max_seconds,
                warmup=max(args.warmup, concurrency),
            )
            results.levels.append(level)
            if server.process is not None and server.process.poll() is not None:
                raise serve.ServerFailed(f"{system} died under load:\n{server.log_tail()}")


def _run_or_record(
    args: argparse.Namespace, results: Results, system: str, command: list[str], *, logs: Path
) -> None:
    """One system failing (it did not start, or died) must not lose the others' numbers."""
    try:
        # ONNX exports at start-up: tens of seconds on 2 busy cores.
        run_served(args, results, system, command, logs=logs, start_timeout=300)
    except serve.ServerFailed as exc:
        log.error("%s", exc)
        results.failures.append(str(exc).splitlines()[0])


def run_engine_table(args: argparse.Namespace, results: Results, redis_url: str, tmp: Path) -> None:
    """The engine x precision table (bench/engines.py): one failing system does
    not lose the others' numbers."""
    from keras_server.engines.predictor import ModelLoadError

    weights, calibration = engines.prepare(tmp, IMAGES)
    cache = tmp / "conversion-cache"
    batch = raw.sample_batch(IMAGES, args.batch_size)
    runs = {"batch_runs": args.batch_runs, "single_runs": args.single_runs}
    for engine, precision in args.engine_table:
        row = engines.EngineRow(engine, precision)
        results.engines.append(row)
        busy_before, own_before = cpu_seconds()
        started = time.monotonic()
        try:
            engines.measure_served(
                row, weights=weights, calibration=calibration, cache=cache,
                redis_url=redis_url, batch_size=args.batch_size, images=IMAGES,
                seconds=args.engine_seconds, logs=tmp,
            )  # fmt: skip
            engines.measure_raw(
                row, weights=weights, calibration=calibration, cache=cache, batch=batch, runs=runs
            )
        except (serve.ServerFailed, ModelLoadError, engines.WrkMissing) as exc:
            row.failure = str(exc).splitlines()[0]
            log.error("%s: %s", row.name, exc)
            results.failures.append(f"{row.name}: {row.failure}")
        busy_after, own_after = cpu_seconds()
        others = max(0.0, (busy_after - busy_before) - (own_after - own_before))
        row.others_cpu_share = others / ((time.monotonic() - started) * (os.cpu_count() or 1))
        gc.collect()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    started = time.monotonic()
    command = "python -m bench.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = Results(
        command=command.strip(),
        mode="quick" if args.quick else "full",
        batch_size=args.batch_size,
        machine=machine(),
    )
    busy_before, own_before = cpu_seconds()
    with RedisServer() as redis_server, tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        client = redis.Redis.from_url(redis_server.url)
        results.machine["redis"] = client.info("server")["redis_version"]
        if args.engine_table:
            run_engine_table(args, results, redis_server.url, Path(tmp))
        if args.only_engine_table:
            args.serve_engines, args.engines, args.skip_seed = [], [], True
        else:
            run_memory(args, results, client)
        if args.engines:
            run_raw(args, results)
        b = str(args.batch_size)
        for engine in args.serve_engines:
            system = system_name(engine)
            results.baselines[system] = engine
            ours = [sys.executable, "run_keras_server.py", "--weights", "none"]
            ours += ["--batch-size", b, "--engine", engine, "--redis-url", redis_server.url]
            ours += ["--queue-name", f"bench-{engine}"]
            _run_or_record(args, results, system, ours, logs=Path(tmp))
        if not args.skip_seed:
            results.baselines[SEED] = "keras"
            seed = [sys.executable, "-m", "bench.seed_server", "--batch-size", b]
            seed += ["--redis-url", redis_server.url, "--queue-name", "bench-seed"]
            _run_or_record(args, results, SEED, seed, logs=Path(tmp))
        client.close()
    elapsed = time.monotonic() - started
    results.machine["load_after"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    results.machine["seconds"] = round(elapsed)
    # Every child (Redis, the servers) has been waited for by now, so its CPU time
    # is in RUSAGE_CHILDREN; what is left is other processes'.
    busy_after, own_after = cpu_seconds()
    others = max(0.0, (busy_after - busy_before) - (own_after - own_before))
    results.machine["others_cpu_share"] = round(others / (elapsed * (os.cpu_count() or 1)), 3)
    if results.machine["others_cpu_share"] > report.BUSY_SHARE:
        log.warning(
            "other processes used %.0f%% of the CPUs during the run: the numbers are noisy",
            100 * results.machine["others_cpu_share"],
        )
    benchmarks = None if str(args.benchmarks_md) == "-" else args.benchmarks_md
    print(report.write(results, args.out, benchmarks))
    log.info("done in %.0f s", time.monotonic() - started)
    failed = sum(level.errors for level in results.levels)
    return 1 if failed or results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
