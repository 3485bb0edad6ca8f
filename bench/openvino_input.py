"""OpenVINO raw throughput: preprocessing in numpy (float32 in) against
preprocessing inside the compiled graph (uint8 in), side by side.

ResNet50 with random weights saved to a file (`bench.engines.prepare`) is
converted once per precision into a scratch conversion cache (or `--work`'s,
kept and reused: then only the timing runs); both variants
are then compiled from the same IR with the same hints and timed in turns
(`--repeats` rounds, each variant at batch 1 and at `--batch-size`), so a busy
machine's noise falls on both alike.

    python -m bench.openvino_input --precision fp32 int8 --repeats 3
    python -m bench.openvino_input --work /tmp/ov-bench   # converts once, reused after
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench import engines, raw
from keras_server.catalog import ModelSpec
from keras_server.engines import openvino_engine
from keras_server.engines.choice import EngineOptions, load_predictor
from keras_server.engines.conversion_cache import MANIFEST
from keras_server.engines.preprocess import batch_of, preprocessing

ROOT = Path(__file__).resolve().parent.parent


def numpy_input(xml: Path, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    """The engine before: the plain IR, fed a float32 batch preprocessed in numpy."""
    import openvino as ov
    import openvino.properties.hint as hints

    config = {
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        hints.inference_precision: ov.Type.bf16 if precision == "bf16" else ov.Type.f32,
    }
    core = openvino_engine.core()
    request = core.compile_model(core.read_model(str(xml)), "CPU", config).create_infer_request()
    caffe = preprocessing("caffe")

    def predict(images: np.ndarray) -> np.ndarray:
        request.infer({0: batch_of(images, 3, caffe)})
        return np.array(request.get_output_tensor(0).data, copy=True)

    return predict


def timed(predict: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, runs: int) -> float:
    """Images per second: the median of `runs` passes over `batch`."""
    predict(batch)
    passes = []
    for _ in range(runs):
        started = time.perf_counter()
        predict(batch)
        passes.append(time.perf_counter() - started)
    return len(batch) / statistics.median(passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10, help="passes per measurement")
    parser.add_argument(
        "--work",
        type=Path,
        help="keep the weights and the conversion cache here and reuse them (default: "
        "a temporary directory, converted anew)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    photos = sorted(ROOT.glob("images/*.*g"))
    batch = raw.sample_batch(photos, args.batch_size)
    with contextlib.ExitStack() as stack:
        if args.work is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ov-input-")))
        else:
            scratch = args.work
            scratch.mkdir(parents=True, exist_ok=True)
        weights, calibration = engines.prepared(scratch, photos)
        cache = scratch / "cache"
        for precision in args.precision:
            spec = ModelSpec(
                name="resnet50", source="resnet50", weights=str(weights), engine="openvino",
                precision=precision, calibration_dir=str(calibration),
            )  # fmt: skip
            graph = load_predictor(spec, EngineOptions(str(cache), 0.0, 50_000_000))
            (xml,) = [
                p.parent / "model.xml"
                for p in cache.glob(f"*/{MANIFEST}")
                if json.loads(p.read_text())["inputs"]["precision"] == precision
            ]
            variants = {"numpy, float32 in": numpy_input(xml, precision)}
            variants["in the graph, uint8 in"] = graph.predict
            for repeat in range(args.repeats):
                for name, predict in variants.items():
                    for size in (1, args.batch_size):
                        runs = args.runs * (4 if size == 1 else 1)
                        rate = timed(predict, batch[:size], runs)
                        print(
                            json.dumps(
                                {
                                    "precision": precision,
                                    "repeat": repeat,
                                    "preprocessing": name,
                                    "batch": size,
                                    "images_per_s": round(rate, 1),
                                }
                            ),
                            flush=True,
                        )


if __name__ == "__main__":
    main()
