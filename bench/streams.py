"""`--openvino-streams`: the graph's CPU per image with each batch on one
stream (every core, LATENCY hint) against split over several (THROUGHPUT
hint, the cores shared out), at batch 1, 8 and 32: `python -m bench.streams`.

    python -m bench.streams --work-dir /tmp/peerswork --model resnet50 --precision int8
    python -m bench.streams --streams 1 2 --batch-sizes 1 8 32 --rounds 3 --seconds 3

Saves `--model` with random weights into `--work-dir` and converts it into
that directory's conversion cache once (the files `bench.peers` and
`bench.process_cpu` use, so one run's conversion serves the others), loads
the predictor once per `--streams` value in this process, and then, in
`--rounds` interleaved rounds (each configuration at each batch size in
turn), calls `predict` on the sample photos back to back for `--seconds`:
CPU seconds per image (`time.process_time`: every thread of this process,
OpenVINO's included) and wall images per second, the medians of the passes.
A round over which the host stole more than 2 % of the CPU time
(`bench.limit.Stolen`) is dropped. Prints the CPU model and its AVX-512 / AMX
flags, then the medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import cpu, engines, limit, raw
from bench.peers import graph
from bench.run import IMAGES
from keras_server import cpuinfo
from keras_server.catalog import BUILTINS
from keras_server.engines.predictor import Predictor

log = logging.getLogger("bench.streams")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.streams", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/peerswork"))
    parser.add_argument("--model", default=engines.MODEL, choices=sorted(BUILTINS))
    parser.add_argument("--precision", default="int8", choices=("fp32", "bf16", "int8"))
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per configuration and size")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if min(args.streams + args.batch_sizes) < 1 or args.rounds < 1 or args.seconds <= 0:
        parser.error("--streams, --batch-sizes, --rounds and --seconds must be positive")
    return args


def timed(predictor: Predictor, images: np.ndarray, seconds: float) -> tuple[float, float]:
    """(CPU seconds per image, wall images per second): the medians over the
    passes of `predict` on `images` run back to back for `seconds` (3 at least)."""
    predictor.predict(images)  # a first pass at a size still allocates
    cpu_s, wall_s = [], []
    ends = time.perf_counter() + seconds
    while len(cpu_s) < 3 or time.perf_counter() < ends:
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        predictor.predict(images)
        cpu_s.append(time.process_time() - cpu_started)
        wall_s.append(time.perf_counter() - wall_started)
    return statistics.median(cpu_s) / len(images), len(images) / statistics.median(wall_s)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(cpu.describe(cpu.model(), cpu.vector_flags()), f"{cpuinfo.cores()} CPUs", flush=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    weights, calibration = engines.prepared(args.work_dir, IMAGES, args.model)
    largest = max(args.batch_sizes)
    predictors = {}
    for streams in args.streams:
        config = graph.PeerConfig(
            model=args.model, weights=str(weights), calibration_dir=str(calibration),
            cache_dir=str(args.work_dir / "conversion-cache"), engine="openvino",
            precision=args.precision, batch_size=largest, wait_ms=0, streams=streams,
        )  # fmt: skip
        predictors[streams] = graph.load(config)
    side = BUILTINS[args.model].size
    batch = raw.sample_batch(IMAGES, largest, (side, side))
    rows: list[dict[str, Any]] = []
    for round_ in range(1, args.rounds + 1):
        with limit.Stolen() as stolen:
            found = []
            for batch_size in args.batch_sizes:
                for streams, predictor in predictors.items():
                    cpu_s, rate = timed(predictor, batch[:batch_size], args.seconds)
                    found.append({
                        "round": round_, "streams": streams, "batch": batch_size,
                        "cpu_ms_per_image": cpu_s * 1000, "images_per_s": rate,
                    })  # fmt: skip
        for row in found:
            row["stolen"] = stolen.share
            print(json.dumps(row), flush=True)
        if limit.discarded(stolen.share):
            log.warning(
                "round %d dropped: %.1f %% of the CPU time stolen", round_, stolen.share * 100
            )
            continue
        rows += found
    print(markdown(rows, args))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu.model(), "rows": rows}, indent=2) + "\n")
    return 0 if rows else 1


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The medians over the counted rounds: a row per batch size, a column
    pair per streams value."""
    rounds = len({r["round"] for r in rows})
    lines = [
        f"{args.model} {args.precision}, medians of {rounds} rounds "
        f"(of {args.rounds}; rounds with over 2 % stolen dropped):",
        "",
        "| batch | "
        + " | ".join(f"{s} stream(s): CPU ms per image | images/s" for s in args.streams)
        + " |",
        "|---:|" + "---:|---:|" * len(args.streams),
    ]
    for batch_size in args.batch_sizes:
        cells = []
        for streams in args.streams:
            mine = [r for r in rows if (r["batch"], r["streams"]) == (batch_size, streams)]
            cpu_ms = limit.median(r["cpu_ms_per_image"] for r in mine)
            rate = limit.median(r["images_per_s"] for r in mine)
            cells += ["n/a" if math.isnan(cpu_ms) else f"{cpu_ms:.2f}",
                      "n/a" if math.isnan(rate) else f"{rate:.1f}"]  # fmt: skip
        lines.append(f"| {batch_size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
