"""Resident memory of a serving process after a cold start and after a warm one.

A cold start converts the model (an empty conversion cache, or `--weights
none`, which is never cached); a warm start opens the entry the cold start
left. Each start is a fresh `python` process that loads the model as a worker
does (`choice.load_predictor`), warms it up at the batch size, and reports
its resident memory then (VmRSS), its peak (VmHWM), the peak of the children
it waited for (the converter: `ru_maxrss` of RUSAGE_CHILDREN) and whether
TensorFlow is imported. `--code DIR` runs another checkout's keras_server
(e.g. `git archive main`), so before and after are measured by one command.

    python -m bench.start_memory --weights /tmp/resnet50.weights.h5
    python -m bench.start_memory --weights none --code /tmp/main-checkout
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, resource, sys, time
started = time.perf_counter()
from keras_server.catalog import ModelSpec
from keras_server.engines.predictor import warm_up
from keras_server.engines.choice import EngineOptions, load_predictor
spec = ModelSpec(name="m", source=sys.argv[1], weights=sys.argv[2], engine=sys.argv[3],
                 precision=sys.argv[4]).validate()
predictor = load_predictor(spec, EngineOptions(sys.argv[5], 0.0, 50_000_000))
warm_up(predictor, int(sys.argv[6]))
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(json.dumps({
    "engine": f"{predictor.engine} {predictor.precision}",
    "seconds": round(time.perf_counter() - started, 1),
    "rss_mib": int(status["VmRSS"].split()[0]) // 1024,
    "peak_mib": int(status["VmHWM"].split()[0]) // 1024,
    "children_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
    "tensorflow_imported": "tensorflow" in sys.modules,
}))
"""


def start(args: argparse.Namespace, cache: Path) -> dict[str, object]:
    """One start in a fresh process; its report."""
    command = [sys.executable, "-c", PROBE, args.model, args.weights, args.engine]
    command += [args.precision, str(cache), str(args.batch_size)]
    done = subprocess.run(
        command, cwd=args.code, capture_output=True, text=True, check=False, timeout=1800
    )
    if done.returncode != 0:
        raise SystemExit(f"the start failed:\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--weights", default="none", help="none, or a .weights.h5 file")
    parser.add_argument("--engine", default="openvino")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--code", default=str(ROOT), help="the checkout whose code runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="start-memory-") as cache:
        starts = [("cold", start(args, Path(cache)))]
        if args.weights.lower() != "none":
            starts.append(("warm", start(args, Path(cache))))
    for kind, report in starts:
        print(json.dumps({"start": kind, "code": args.code, **report}))


if __name__ == "__main__":
    main()
