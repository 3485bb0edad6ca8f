"""Do thread settings pay on this machine? The forward pass under each setting.

    python -m bench.threads            # ~5 min on 2 cores
    python -m bench.threads --quick    # ~2 min, one repetition

Each setting runs in a fresh process (TensorFlow reads its thread counts once,
at start), twice, interleaved with the others so a busy machine's drift hits
all of them alike. Each measures the forward pass alone (img/s at the batch
size, one-image latency), then again while a thread decodes and resizes the
sample photos in a loop as the web tier does in `--role all`, and how many of
those it managed: a setting that speeds the model by starving the web tier
does not pay. The decoding thread works at a fixed rate (default 30 photos/s,
a little more than the model can take on 2 cores) and falls behind if starved.

TensorFlow settings are environment variables an operator can set today
(TF_NUM_INTRAOP_THREADS, TF_NUM_INTEROP_THREADS, OMP_NUM_THREADS,
TF_ENABLE_ONEDNN_OPTS); ONNX Runtime's are SessionOptions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESNET50_INPUT = (224, 224)  # (width, height) the web tier resizes to for ResNet50

ROOT = Path(__file__).resolve().parent.parent
IMAGES = [ROOT / "images" / name for name in ("chelsea.png", "coffee.png", "rocket.jpg")]

# name -> (engine, environment, ONNX Runtime session options)
SETTINGS: dict[str, tuple[str, dict[str, str], dict[str, Any]]] = {
    "tf default": ("keras", {}, {}),
    "tf intra 2, inter 1": (
        "keras",
        {"TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "1"},
        {},
    ),
    "tf intra 1, inter 1": (
        "keras",
        {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"},
        {},
    ),
    "tf OMP_NUM_THREADS=1": ("keras", {"OMP_NUM_THREADS": "1"}, {}),
    "tf oneDNN off": ("keras", {"TF_ENABLE_ONEDNN_OPTS": "0"}, {}),
    "ort default": ("onnx", {}, {}),
    "ort intra 1": ("onnx", {}, {"intra_op_num_threads": 1}),
    "ort no spinning": ("onnx", {}, {"config": {"session.intra_op.allow_spinning": "0"}}),
}


def _decode_loop(stop: threading.Event, counter: list[int], rate: float) -> None:
    """Decode and resize sample photos at `rate` per second, as the web tier would
    under a load the model can just keep up with; falls behind if starved."""
    from keras_server.images import load_image

    payloads = [p.read_bytes() for p in IMAGES]
    started = time.perf_counter()
    while not stop.is_set():
        due = started + counter[0] / rate
        if time.perf_counter() < due:
            stop.wait(due - time.perf_counter())
            continue
        load_image(payloads[counter[0] % len(payloads)], RESNET50_INPUT, 50_000_000)
        counter[0] += 1


def child(spec: dict[str, Any]) -> dict[str, float]:
    """In the fresh process: build the predictor, then time it alone and contended."""
    from bench.raw import sample_batch

    batch = sample_batch(IMAGES, spec["batch_size"])
    from keras_server.catalog import ModelSpec
    from keras_server.engines.keras_engine import load_classifier
    from keras_server.engines.predictor import warm_up

    keras_model = load_classifier(ModelSpec(name="resnet50", source="resnet50", weights="none"))
    if spec["engine"] == "keras":
        predictor: Any = keras_model
    else:
        import onnxruntime as ort

        from keras_server.engines.onnx_engine import OnnxClassifier

        options = ort.SessionOptions()
        for key, value in spec["ort"].get("config", {}).items():
            options.add_session_config_entry(key, value)
        if "intra_op_num_threads" in spec["ort"]:
            options.intra_op_num_threads = spec["ort"]["intra_op_num_threads"]
        session = ort.InferenceSession(
            spec["onnx_path"], options, providers=["CPUExecutionProvider"]
        )
        predictor = OnnxClassifier(
            session,
            keras_model.labels,
            "ONNX",
            keras_model.input_shape,
            channels=keras_model.channels,
            preprocess=keras_model.preprocess,
            top_k=keras_model.top_k,
        )
    warm_up(predictor, len(batch))
    predictor.predict(batch)

    def batches() -> float:
        started = time.perf_counter()
        for _ in range(spec["batch_runs"]):
            predictor.predict(batch)
        return len(batch) * spec["batch_runs"] / (time.perf_counter() - started)

    alone = batches()
    singles = []
    for i in range(spec["single_runs"]):
        started = time.perf_counter()
        predictor.predict(batch[i % len(batch)][None])
        singles.append(time.perf_counter() - started)
    stop, counter = threading.Event(), [0]
    decoder = threading.Thread(
        target=_decode_loop, args=(stop, counter, spec["decode_rate"]), daemon=True
    )
    started = time.perf_counter()
    decoder.start()
    contended = batches()
    stop.set()
    decoder.join()
    decodes = counter[0] / (time.perf_counter() - started)
    return {
        "img_s": alone,
        "single_ms": statistics.median(singles) * 1000,
        "img_s_contended": contended,
        "decodes_s": decodes,
    }


def export_onnx(path: Path) -> None:
    """One ONNX file for every ONNX Runtime setting (the export takes ~25 s)."""
    import keras
    import numpy as np

    model = keras.applications.ResNet50(weights=None)
    model.predict_on_batch(np.zeros((1, 224, 224, 3), np.float32))
    model.export(str(path), format="onnx", verbose=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--decode-rate", type=float, default=30.0, help="web-tier decodes/s to run alongside"
    )
    parser.add_argument("--only", help="comma-separated setting names (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "threads.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    names = args.only.split(",") if args.only else list(SETTINGS)
    repetitions = 1 if args.quick else 2
    runs = {"batch_runs": 2 if args.quick else 4, "single_runs": 10 if args.quick else 20}
    measured: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        onnx_path = Path(tmp) / "resnet50.onnx"
        if any(SETTINGS[n][0] == "onnx" for n in names):
            print("exporting ResNet50 to ONNX once for the ONNX Runtime settings", file=sys.stderr)
            export_onnx(onnx_path)
        for rep in range(repetitions):
            for name in names:
                engine, env, ort_options = SETTINGS[name]
                spec = {
                    "engine": engine,
                    "ort": ort_options,
                    "onnx_path": str(onnx_path),
                    "batch_size": args.batch_size,
                    "decode_rate": args.decode_rate,
                    **runs,
                }
                done = subprocess.run(
                    [sys.executable, "-m", "bench.threads", "--child", json.dumps(spec)],
                    cwd=ROOT,
                    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env},
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=False,
                )
                if done.returncode != 0:
                    print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                measured[name].append(result)
                print(f"[{rep + 1}/{repetitions}] {name}: {result}", file=sys.stderr)
    table = _table(measured, args.batch_size, repetitions, args.decode_rate)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    command = "python -m bench.threads " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.write_text(f"`{command.strip()}`, load average at the end {load}:\n\n{table}")
    print(table)
    return 0


def _table(
    measured: dict[str, list[dict[str, float]]], batch_size: int, reps: int, rate: float
) -> str:
    def mean(rows: list[dict[str, float]], key: str) -> str:
        return f"{statistics.fmean(r[key] for r in rows):.1f}" if rows else "failed"

    lines = [
        f"| setting | img/s at batch {batch_size} | one image ms "
        f"| img/s while decoding {rate:g}/s | decodes/s achieved |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rows in measured.items():
        lines.append(
            f"| {name} | {mean(rows, 'img_s')} | {mean(rows, 'single_ms')} "
            f"| {mean(rows, 'img_s_contended')} | {mean(rows, 'decodes_s')} |"
        )
    return "\n".join(lines) + f"\n\nMeans of {reps} fresh process(es) per setting.\n"


if __name__ == "__main__":
    sys.exit(main())
