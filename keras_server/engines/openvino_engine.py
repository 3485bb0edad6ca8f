"""`--engine openvino`: the model converted to OpenVINO and compiled for the CPU.

The graph comes from the ONNX file `onnx_engine.export` writes (int8: that
file quantized by `calibration.quantize`, QDQ, which OpenVINO runs as int8),
saved as OpenVINO IR in the conversion cache with full-precision weights.
At compile time OpenVINO's PrePostProcessor puts the input preprocessing into
the graph: the compiled model takes the worker's uint8 RGB NHWC batch as it
is (a quarter of float32's bytes), converts it to float, averages the
channels for a grey model and runs the model's preprocessing steps
(`preprocess.STEPS`) itself; the cached IR stays the plain model, so an
entry does not depend on how it is compiled.

One batch at a time, it is compiled with the LATENCY hint and one
synchronous infer request: the THROUGHPUT hint with a single request was
half as fast here. `--parallel-batches N` (N claim loops running batches at
once; by default one per core on a CPU with AMX, else 1:
`predictor.parallel_batches_for`) compiles it with the THROUGHPUT hint for N
requests, OpenVINO splitting the cores into streams. One batch at a time,
`--openvino-streams S` splits each batch into S
parts run at once, a CPU stream each with its share of the cores (on 2
cores, S=2: two single-threaded streams instead of one two-threaded one),
which spends less CPU per image than one stream whose threads meet at
every layer, and leaves no thread spinning for a partner that a web
process has taken the core from. A batch of one image runs on the model
compiled for one batch at a time (LATENCY, every core) beside the streams
or parallel batches, so a lone request is as fast as without them.
`--openvino-streams 0` (the default) picks one stream per core on a CPU
with AMX when one batch runs at a time, where it was measured to pay, and 1
otherwise (`streams_for`, which logs its choice).
`precision` is
the CPU's inference precision: fp32 exact, bf16 (needs AVX512_BF16 or AMX),
or int8 (the quantized graph).

OpenVINO does not officially support AMD CPUs, and a Zen 4 crash in
compile_model came with 2025.3 (openvino#35943): on an AMD CPU only the
versions in `TESTED_ON_AMD` are used; others are refused with the reason.
"""

from __future__ import annotations

import functools
import logging
import queue
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.properties as props
import openvino.properties.hint as hints
from openvino import opset13 as ops
from openvino.preprocess import PrePostProcessor

from keras_server import cpuinfo
from keras_server.engines.predictor import EngineError, Fidelity
from keras_server.engines.preprocess import steps_of

log = logging.getLogger(__name__)

# Versions measured to convert, compile and match Keras on an AMD EPYC (Zen 4).
TESTED_ON_AMD = ("2026.4",)
# The CPU plugin's OPTIMIZATION_CAPABILITIES each precision needs.
NEEDS = {"fp32": "FP32", "bf16": "BF16", "int8": "INT8"}


def version() -> str:
    """e.g. 2026.4.1 (the build suffix dropped)."""
    return str(ov.__version__).split("-")[0]


@functools.cache
def core() -> ov.Core:
    return ov.Core()


def optimization_capabilities() -> set[str]:
    """What the CPU plugin can run on this CPU: FP32, BF16, INT8, ..."""
    return set(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def check_supported(precision: str) -> None:
    """Refuse, with the reason, a CPU or version this engine is not known to
    work on, or a precision the CPU cannot run."""
    if cpuinfo.vendor() == "AuthenticAMD" and not version().startswith(TESTED_ON_AMD):
        raise EngineError(
            f"OpenVINO {version()} is not tested on AMD CPUs (OpenVINO does not officially "
            f"support them; 2025.3 crashed in compile_model, openvino#35943). Install a tested "
            f"version ({', '.join(v + '.x' for v in TESTED_ON_AMD)}, as pyproject.toml pins) "
            "or use --engine keras"
        )
    capabilities = optimization_capabilities()
    if NEEDS[precision] not in capabilities:
        raise EngineError(
            f"--precision {precision}: this CPU cannot run {NEEDS[precision]} in OpenVINO "
            f"(it offers {', '.join(sorted(capabilities)) or 'nothing'}); use --precision fp32"
        )


def streams_for(requested: int, parallel_batches: int) -> int:
    """The streams a batch is split over: `requested`, or for 0 (auto) one
    per core on a CPU with AMX when one batch runs at a time, else 1. On the
    AMX Xeon's 2 cores, two streams served 5 % more images/s at 32 clients
    than one and spent 8 % less engine CPU per image at batch 16
    (BENCHMARKS.md, "OpenVINO streams"); on the CPUs without AMX they were
    not measured to pay. Parallel batches (`predictor.parallel_batches_for`,
    the default on AMX) have the cores' streams already, a batch each."""
    if requested:
        return requested
    cores, amx = cpuinfo.cores(), cpuinfo.has_amx()
    streams = cores if amx and cores > 1 and parallel_batches == 1 else 1
    log.info(
        "openvino: %d stream(s) a batch (--openvino-streams 0: %d cores, %s AMX, "
        "--parallel-batches %d)", streams, cores, "with" if amx else "no", parallel_batches,
    )  # fmt: skip
    return streams


def convert(onnx_path: Path, xml_path: Path) -> None:
    """ONNX -> OpenVINO IR (xml + bin), weights kept in full precision."""
    try:
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(xml_path), compress_to_fp16=False)
    except Exception as exc:
        raise EngineError(
            f"OpenVINO {version()} cannot convert the model ({type(exc).__name__}: {exc})"
        ) from None


def with_preprocessing(model: ov.Model, mode: str, channels: int) -> ov.Model:
    """`model` (float NHWC input, preprocessed) taking uint8 RGB NHWC instead,
    with `preprocess.batch_of` and the steps of `mode` inside the graph."""
    ppp = PrePostProcessor(model)
    height, width = model.input().get_partial_shape()[1:3]
    tensor = ppp.input().tensor()
    tensor.set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    tensor.set_shape(ov.PartialShape([-1, height, width, 3]))
    ppp.input().model().set_layout(ov.Layout("NHWC"))
    steps = ppp.input().preprocess()
    steps.convert_element_type(ov.Type.f32)
    if channels == 1:
        # batch_of's grey: the plain mean of R, G and B (not a luma weighting).
        steps.custom(
            lambda node: ops.reduce_mean(node, ops.constant([-1]), keep_dims=True).output(0)
        )
    for op, value in steps_of(mode):
        if op == "reverse":
            steps.reverse_channels()
        elif op == "divide":
            steps.scale(np.atleast_1d(value).astype(np.float32).tolist())
        else:
            steps.mean(np.atleast_1d(value).astype(np.float32).tolist())
    return ppp.build()


def compile_model(
    xml_path: Path, precision: str, mode: str, channels: int, *, requests: int = 1, streams: int = 1
) -> ov.CompiledModel:
    """The IR at `xml_path`, taking uint8 RGB with preprocessing `mode` inside,
    for `requests` batches running at once, each split over `streams` infer
    requests (a CPU stream each)."""
    config: dict[str, object] = {
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        # Explicit: on a CPU with AMX, OpenVINO would otherwise pick bf16 itself.
        hints.inference_precision: ov.Type.bf16 if precision == "bf16" else ov.Type.f32,
    }
    if requests * streams > 1:
        config[hints.performance_mode] = hints.PerformanceMode.THROUGHPUT
        config[hints.num_requests] = requests * streams
    if streams > 1:
        # Exactly one stream per infer request: the hint alone may pick fewer.
        config[props.num_streams] = requests * streams
    try:
        model = with_preprocessing(core().read_model(str(xml_path)), mode, channels)
        return core().compile_model(model, "CPU", config)
    except Exception as exc:
        raise EngineError(
            f"OpenVINO {version()} cannot compile the model for this CPU "
            f"({type(exc).__name__}: {exc})"
        ) from None


class OpenVinoClassifier:
    """The `predictor.Predictor` of the openvino engine: `requests` groups of
    `streams` infer requests; a `predict` call takes a free group (waiting for
    one), so that many calls run at once, and splits its batch over the group's
    requests. `single`, the model compiled for every core (LATENCY), runs the
    batches of one image instead when there are several requests."""

    engine = "openvino"

    def __init__(
        self,
        compiled: ov.CompiledModel,
        *,
        labels: Sequence[str],
        description: str,
        input_shape: tuple[int, int, int],
        top_k: int,
        precision: str,
        requests: int = 1,
        streams: int = 1,
        single: ov.CompiledModel | None = None,
    ) -> None:
        self.labels = labels
        self.description = description
        self.input_shape = input_shape
        self.top_k = top_k
        self.precision = precision
        self.fidelity: Fidelity | None = None
        # The claim loops take turns already; the pool keeps each group to
        # one caller at a time for any other caller too (warm-up, the fidelity check).
        self._idle: queue.SimpleQueue[_Group] = queue.SimpleQueue()
        for _ in range(requests):
            parts = [compiled.create_infer_request() for _ in range(streams)]
            alone = single.create_infer_request() if single is not None else parts[0]
            self._idle.put(_Group(parts, alone))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, classes), for uint8 RGB images (n, h, w, 3)."""
        # The graph preprocesses (see the module's docstring): the pixels go in as they are.
        batch = np.ascontiguousarray(images, dtype=np.uint8)
        group = self._idle.get()
        try:
            if len(group.parts) == 1 or len(batch) == 1:
                request = group.alone if len(batch) == 1 else group.parts[0]
                request.infer({0: batch})
                return np.array(request.get_output_tensor(0).data, copy=True)
            return _split_over(group.parts, batch)
        finally:
            self._idle.put(group)


@dataclass(frozen=True)
class _Group:
    """The infer requests one `predict` call holds: one per stream (`parts`),
    and the one that runs a batch of one image (`alone`: `single`'s, or the
    first part's)."""

    parts: list[ov.InferRequest]
    alone: ov.InferRequest


def _split_over(group: list[ov.InferRequest], batch: np.ndarray) -> np.ndarray:
    """`batch` in near-equal parts, one per request of `group` (as many as
    there are images, at most), run at once; the outputs in order."""
    parts = np.array_split(batch, min(len(group), len(batch)))
    started: list[ov.InferRequest] = []
    try:
        for request, part in zip(group, parts, strict=False):
            request.start_async({0: part})
            started.append(request)
    finally:
        # Every started request finishes before its buffers are reused.
        for request in started:
            request.wait()
    return np.concatenate([np.array(r.get_output_tensor(0).data, copy=True) for r in started])
