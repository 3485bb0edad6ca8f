"""keras-server, mosec and LitServe side by side: `python -m bench.peers`.

    python -m bench.peers            # 3 interleaved rounds of 20 s wrk runs
    python -m bench.peers --quick    # 2 rounds of 6 s wrk runs
    python -m bench.peers --peer-decodes pillow --parallel-batches 1 --streams 2

Run from the repository root; needs Debian's `wrk`. mosec and LitServe are
not project dependencies: when missing, they are installed into this Python's
environment first (`pip install` of `PEER_PACKAGES`). The run saves ResNet50
(or `--model`) with random weights, converts it once into a conversion cache
and loads it in this process (`graph.load`, as the peers load it), times the
engine alone (`bench.raw.measure`), then, for each
round, starts each system in turn on that cache and drives it with wrk at 1
and 32 connections (`bench.engines.wrk_levels`): keras-server, then the peers
with each of `--peer-decodes` in turn (plain Pillow as the peers' users
would write it, then keras-server's `load_image`). keras-server and the
limit's engine run `--parallel-batches` batches at once, each split over
`--streams` (0, the defaults: what the server itself picks,
`predictor.parallel_batches_for` and `openvino_engine.streams_for`); the
peers load the graph as their users would, one batch at a time on one
LATENCY stream (`--peer-streams`).
After each round it measures the limit
(`bench.limit`): the graph's CPU per image in this process at the batch sizes
keras-server's worker logged over its measured run, the decodes' CPU per
image on the sample photos, and wrk's CPU per image from the round's runs. A
run or a limit over which the host stole more than 2 % of the CPU time is
discarded (named in the table, left out of the medians). The CPU model and its
AVX-512 / AMX flags are printed first and go with the table into
bench/results/peers.md, bench/results/peers.json and BENCHMARKS.md's peers
section (the rest of BENCHMARKS.md is left as it is); `--model mobilenet_v2`
writes peers-mobilenet_v2 instead, a network small enough that the serving
tier, not the engine, is the limit on a CPU without AMX.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import cpu, engines, limit, process_cpu, raw, report, serve
from bench.peers import graph, table
from bench.peers.graph import TIMEOUT_S, PeerConfig
from bench.run import IMAGES, ROOT, machine
from keras_server import cpuinfo
from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.catalog import BUILTINS
from keras_server.engines import openvino_engine
from keras_server.engines.predictor import Predictor, parallel_batches_for
from keras_server.images import load_image, single_threaded_resize

log = logging.getLogger("bench.peers")

# The versions this harness was written against (LitServe's API still moves).
PEER_PACKAGES = ("mosec~=0.9.8", "litserve~=0.2.19")
PRESETS: dict[str, tuple[float, float]] = {"rounds": (3, 2), "seconds": (20.0, 6.0)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of 6 s wrk runs")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (full 3, quick 2)")
    parser.add_argument("--seconds", type=float, help="seconds per wrk run (full 20, quick 6)")
    parser.add_argument(
        "--systems", default=",".join(table.SYSTEMS),
        help=f"which to run, comma-separated ({','.join(table.SYSTEMS)})",
    )  # fmt: skip
    parser.add_argument(
        "--model", default=engines.MODEL, choices=sorted(BUILTINS),
        help="the keras.applications network all three serve (resnet50); a smaller one "
        "(mobilenet_v2) makes the serving tier, not the engine, the limit on a CPU "
        "without AMX",
    )  # fmt: skip
    parser.add_argument(
        "--peer-decodes", default=",".join(limit.DECODES),
        help="each peer runs once a round with each of these decodes, comma-separated: "
        "pillow (plain Pillow, as its users would write it), load_image (keras-server's)",
    )  # fmt: skip
    parser.add_argument(
        "--streams", type=int, default=0,
        help="--openvino-streams of keras-server and of the limit's engine "
        "(0: the server's default, one per core on a CPU with AMX, else 1)",
    )  # fmt: skip
    parser.add_argument(
        "--parallel-batches", type=int, default=0,
        help="--parallel-batches of keras-server and of the limit's engine (0: the server's "
        "default, one per core on a CPU with AMX, else 1)",
    )  # fmt: skip
    parser.add_argument(
        "--peer-streams", type=int, default=1,
        help="the peers' --openvino-streams (1: one LATENCY stream, as their users load it)",
    )  # fmt: skip
    parser.add_argument(
        "--decode-passes", type=int, default=20,
        help="passes over the sample photos timing each decode for the limit (20)",
    )  # fmt: skip
    parser.add_argument("--precision", default="int8", choices=("fp32", "bf16", "int8"))
    parser.add_argument("--batch-size", type=int, default=32, help="largest batch (32)")
    parser.add_argument(
        "--wait-ms", type=float, default=10.0,
        help="the peers' batching wait: mosec max_wait_time, LitServe batch_timeout (10)",
    )  # fmt: skip
    parser.add_argument(
        "--work-dir", type=Path,
        help="keep the random weights, calibration images and conversion cache here and "
        "reuse them on the next run (default: a temporary directory, converted afresh)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results",
        help="peers.md and peers.json go here (bench/results)",
    )  # fmt: skip
    parser.add_argument(
        "--benchmarks-md", type=Path, default=ROOT / "BENCHMARKS.md",
        help="whose peers section to rewrite ('-': none)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for name, (full, quick) in PRESETS.items():
        if getattr(args, name) is None:
            setattr(args, name, type(full)(quick if args.quick else full))
    args.rounds = int(args.rounds)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(table.SYSTEMS)
    if unknown or not args.systems:
        parser.error(f"--systems: unknown {', '.join(sorted(unknown)) or 'nothing'}")
    args.peer_decodes = [d.strip() for d in args.peer_decodes.split(",") if d.strip()]
    unknown = set(args.peer_decodes) - set(limit.DECODES)
    if unknown or not args.peer_decodes:
        parser.error(f"--peer-decodes: unknown {', '.join(sorted(unknown)) or 'nothing'}")
    if min(args.streams, args.peer_streams, args.parallel_batches) < 0 or args.decode_passes < 1:
        parser.error(
            "--streams, --peer-streams and --parallel-batches must be 0 or more, "
            "--decode-passes positive"
        )
    if args.rounds < 1 or args.seconds <= 0 or args.batch_size < 1:
        parser.error("--rounds, --seconds and --batch-size must be positive")
    # Resolved once, so that every system and the table name the same number.
    args.parallel_batches = parallel_batches_for(args.parallel_batches, "openvino")
    args.streams = openvino_engine.streams_for(args.streams, args.parallel_batches)
    args.peer_streams = openvino_engine.streams_for(args.peer_streams, parallel_batches=1)
    return args


def ensure_peers() -> dict[str, str]:
    """mosec and LitServe importable here (installed with pip when missing);
    their versions."""
    missing = [p for p in PEER_PACKAGES if importlib.util.find_spec(_module(p)) is None]
    if missing:
        log.info("installing %s into %s", " ".join(missing), sys.prefix)
        subprocess.run([sys.executable, "-m", "pip", "install", *missing], check=True)
    return {_module(p): importlib.metadata.version(_module(p)) for p in PEER_PACKAGES}


def _module(requirement: str) -> str:
    return requirement.split("~=", maxsplit=1)[0]


def start_command(system: str, config: PeerConfig, redis_url: str, port: int) -> list[str]:
    """The command that serves `system` on `port`."""
    if system == table.OURS:
        row = engines.EngineRow(config.engine, config.precision)
        command = engines.server_command(
            row, weights=Path(config.weights), calibration=Path(config.calibration_dir),
            cache=Path(config.cache_dir), redis_url=redis_url, batch_size=config.batch_size,
            port=port, model=config.model,
        )  # fmt: skip
        # The worker logs each batch's size at INFO: the limit reads them.
        command += ["--log-level", "INFO", "--openvino-streams", str(config.streams),
                    "--parallel-batches", str(config.parallel_batches)]  # fmt: skip
        return [sys.executable, *command[1:]]
    # The peers read their model from the environment: `env` sets it and execs
    # Python, so the process stopped at the end is the server itself.
    variables = [f"{k}={v}" for k, v in config.for_peers().to_env().items()]
    module = f"bench.peers.{system}_server"
    command = ["env", *variables, sys.executable, "-m", module, "--port", str(port)]
    if system == "mosec":  # its default, 3 s, is not keras-server's
        command += ["--timeout", str(round(TIMEOUT_S * 1000))]
    return command


def run_order(systems: Sequence[str], decodes: Sequence[str]) -> list[tuple[str, str]]:
    """(system, decode) in the order a round runs them: keras-server (with
    load_image), then the peers with the first decode, then with the next, so
    that the comparison the targets name (plain Pillow) runs closest."""
    order = [(table.OURS, limit.LOAD_IMAGE)] if table.OURS in systems else []
    order += [(s, d) for d in decodes for s in systems if s != table.OURS]
    return order


def route(system: str) -> str:
    return "/inference" if system == "mosec" else "/predict"  # mosec's own route


def measure(
    system: str,
    round_: int,
    config: PeerConfig,
    *,
    redis_url: str,
    seconds: float,
    logs: Path,
    redis_pid: int | None = None,
) -> tuple[table.Measured, dict[int, int]]:
    """One round of `system` (a peer with `config.decode`): started, driven at
    1 and 32 connections, its processes' CPU counted over the measured
    32-connection run, stopped; and for keras-server the batch sizes its
    worker logged over that run (size -> passes)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}{route(system)}"
    command = start_command(system, config, redis_url, port)
    name = f"{system}-{round_}" if system == table.OURS else f"{system}-{config.decode}-{round_}"
    log_path = logs / f"{name}.log"
    with serve.ServerProcess(name, command, url, log_path, group=True) as server:
        server.start(timeout=300)
        settle: Callable[[], None]
        if system == table.OURS:
            queue = f"bench-{config.engine}-{config.precision}"
            settle = functools.partial(engines.drain, url, redis_url, queue, IMAGES[0])
        else:
            settle = functools.partial(engines.answered, url, IMAGES[0])
        # mosec's front answers before its model has loaded: one answer first.
        engines.answered(url, IMAGES[0])
        assert server.process is not None
        # keras-server's CPU counts the Redis it queues through.
        extra = [redis_pid] if system == table.OURS and redis_pid else []
        probe = process_cpu.Probe(process_cpu.server_processes(server.process.pid, extra))
        window = LoggedWindow(probe, log_path)
        with limit.Stolen() as stolen:
            one, many = engines.wrk_levels(url, IMAGES, seconds, settle, around_many=window)
        if server.process.poll() is not None:
            raise serve.ServerFailed(f"{name} died under load:\n{server.log_tail()}")
    counted = probe.window
    served = dict(limit.served_batches(window.text)) if system == table.OURS else {}
    log.info(
        "%s round %d: 1 client p50 %.1f ms; 32 clients %.1f images/s (%d errors); "
        "%.1f %% of the CPU time stolen",
        name, round_, one.p50 * 1000, many.throughput, one.errors + many.errors,
        stolen.share * 100,
    )  # fmt: skip
    measured = table.Measured(
        system, round_, one, many, server.start_seconds,
        decode=limit.LOAD_IMAGE if system == table.OURS else config.decode,
        stolen=stolen.share,
        server_cpu_seconds=counted.server_cpu if counted else math.nan,
        others_cpu_seconds=counted.others(many.client_cpu_seconds) if counted else math.nan,
        window_seconds=counted.seconds if counted else math.nan,
    )  # fmt: skip
    return measured, served


class LoggedWindow:
    """The measured run: `probe` counts the server's CPU over it, and `text`
    is what the server logged meanwhile (its worker's batch sizes)."""

    def __init__(self, probe: process_cpu.Probe, log_path: Path) -> None:
        self.probe = probe
        self.log_path = log_path
        self.text = ""
        self._offset = 0

    def __enter__(self) -> LoggedWindow:
        self._offset = self.log_path.stat().st_size
        self.probe.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.probe.__exit__(*exc)
        with self.log_path.open("rb") as logged:
            logged.seek(self._offset)
            self.text = logged.read().decode(errors="replace")


def measure_limit(
    round_: int,
    predictor: Predictor,
    batch: np.ndarray,
    *,
    served: dict[int, int],
    runs: list[table.Measured],
    input_size: tuple[int, int],
    decode_passes: int,
) -> limit.Limit:
    """The round's limit (bench.limit): the graph's CPU per pass at the batch
    sizes keras-server `served` (or at the largest batch, if none were
    counted), each decode's CPU per image on the sample photos, and wrk's CPU
    per image over the round's measured runs."""
    started = time.monotonic()
    samples = [p.read_bytes() for p in IMAGES]
    decoders = {
        limit.LOAD_IMAGE: lambda data: load_image(data, input_size, graph.MAX_IMAGE_PIXELS),
        limit.PILLOW: lambda data: limit.plain_pillow(data, input_size),
    }
    with limit.Stolen() as stolen:
        per_batch = limit.engine_cpu(predictor, batch, served or [len(batch)])
        decode = {d: limit.decode_cpu(f, samples, decode_passes) for d, f in decoders.items()}
    client = limit.median(m.per_image(m.many.client_cpu_seconds) for m in runs if not m.discarded)
    found = limit.Limit(
        round=round_, cores=cpuinfo.cores(), served=served, engine_cpu_per_batch=per_batch,
        decode_cpu=decode, client_cpu=client, stolen=stolen.share, assumed_batch=len(batch),
        seconds=time.monotonic() - started,
    )  # fmt: skip
    log.info(
        "limit, round %d: engine %.1f ms CPU per image (mean batch %.1f), load_image %.1f ms, "
        "plain Pillow %.1f ms, wrk %.1f ms: %.1f images/s with load_image, %.1f with plain "
        "Pillow; %.1f %% stolen",
        round_, found.engine_cpu * 1000, found.mean_batch, decode[limit.LOAD_IMAGE] * 1000,
        decode[limit.PILLOW] * 1000, client * 1000, found.images_per_second(limit.LOAD_IMAGE),
        found.images_per_second(limit.PILLOW), stolen.share * 100,
    )  # fmt: skip
    return found


def write(results: table.PeerResults, out: Path, benchmarks: Path | None) -> str:
    """The table into out/NAME.md and .json and BENCHMARKS.md's section NAME
    (`PeerResults.name`)."""
    name = results.name
    text = table.markdown(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps(results.as_dict(), indent=2) + "\n")
    if benchmarks is not None:
        old = benchmarks.read_text() if benchmarks.exists() else ""
        benchmarks.write_text(report.replace_section(old, name, text))
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    command = "python -m bench.peers " + shlex.join(sys.argv[1:] if argv is None else argv)
    info = machine()
    print(f"CPU: {cpu.describe(str(info['cpu']), list(info['cpu_flags']))}", flush=True)
    if any(s in table.PEERS for s in args.systems):
        info["versions"] = ensure_peers()
    results = table.PeerResults(
        command=command.strip(), mode="quick" if args.quick else "full", machine=info,
        model=args.model, engine="openvino", precision=args.precision, batch_size=args.batch_size,
        wait_ms=args.wait_ms, streams=args.streams, peer_streams=args.peer_streams,
        parallel_batches=args.parallel_batches,
    )  # fmt: skip
    # The web processes resize with one OpenCV thread: so does the limit's decode.
    single_threaded_resize()
    started = time.monotonic()
    with RedisServer() as redis_server, tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        weights, calibration = engines.prepared(work, IMAGES, args.model)
        config = PeerConfig(
            model=args.model, weights=str(weights), calibration_dir=str(calibration),
            cache_dir=str(work / "conversion-cache"), engine=results.engine,
            precision=results.precision, batch_size=args.batch_size, wait_ms=args.wait_ms,
            streams=args.streams, peer_streams=args.peer_streams,
            parallel_batches=args.parallel_batches,
        )  # fmt: skip
        # Converts into the cache every system then loads (minutes, once), and
        # times the engine alone: the latency target is relative to it. The
        # same predictor times the graph's CPU for the limit after each round.
        loading = time.perf_counter()
        predictor = graph.load(config)
        setup = time.perf_counter() - loading
        batch = raw.sample_batch(IMAGES, args.batch_size, config.input_size)
        results.raw = raw.measure(
            f"{config.engine} {config.precision}", predictor, batch, batch_runs=5,
            single_runs=30, setup_seconds=setup, parallel=config.parallel_batches,
        )  # fmt: skip
        order = run_order(args.systems, args.peer_decodes)
        for round_ in range(1, args.rounds + 1):
            served: dict[int, int] = {}
            for system, decode in order:
                try:
                    measured, logged = measure(
                        system, round_, dataclasses.replace(config, decode=decode),
                        redis_url=redis_server.url, seconds=args.seconds, logs=work,
                        redis_pid=redis_server.child.pid,
                    )  # fmt: skip
                except (serve.ServerFailed, engines.WrkMissing) as exc:
                    log.error("%s round %d: %s", system, round_, exc)
                    results.failures.append(f"{system} round {round_}: {str(exc).splitlines()[0]}")
                    continue
                results.runs.append(measured)
                if system == table.OURS and not measured.discarded:
                    served = logged
            results.limits.append(
                measure_limit(
                    round_, predictor, batch, served=served,
                    runs=[m for m in results.runs if m.round == round_],
                    input_size=config.input_size, decode_passes=args.decode_passes,
                )
            )  # fmt: skip
    info["seconds"] = round(time.monotonic() - started)
    # What else ran while the 32-connection runs were measured: a whole-run
    # count would charge a peer's orphaned workers (reaped by init, not by us)
    # to "other processes".
    windows = [m for m in results.runs if not math.isnan(m.window_seconds)]
    if windows:
        others = sum(m.others_cpu_seconds for m in windows)
        wall = sum(m.window_seconds for m in windows) * (os.cpu_count() or 1)
        info["others_cpu_share"] = round(others / wall, 3)
    benchmarks = None if str(args.benchmarks_md) == "-" else args.benchmarks_md
    print(write(results, args.out, benchmarks))
    failed = sum(m.one.errors + m.many.errors for m in results.runs)
    return 1 if failed or results.failures else 0
