"""KServe's `GRPCInferenceService` over the serving core: the same models,
tensors, checks, pipeline and answers as the REST routes under /v2
(serving/inference.py), in protobuf.

- ServerLive, ServerReady, ModelReady: `live` / `ready` (false is an
  answer, not an error; an unknown model or version is NOT_FOUND);
- ServerMetadata, ModelMetadata: as `GET /v2` and `GET /v2/models/{name}`;
- ModelInfer: the input's data in `raw_input_contents` (as tritonclient
  sends it; little-endian) or in `contents` (`bytes_contents`, or for
  pixels `uint_contents` / `fp32_contents`); every output answers in
  `raw_output_contents`. The client's deadline is the request's (capped by
  --result-timeout and the `timeout` parameter): its images are dropped
  from the queue past it. `priority`, `timeout`, `explain_class` and
  `explain_grid` are int64_params, `explain` a string_param.

Failures are the core's (serving/failures.py), answered with the gRPC code
its one table names and the same message as REST; a Retry-After (503) or
RateLimit-* (429) goes along as trailers, in lower case.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from keras_server import logs, metrics
from keras_server.rpc import grpc_predict_v2_pb2 as pb
from keras_server.rpc import grpc_predict_v2_pb2_grpc as pb_grpc
from keras_server.serving import inference as core
from keras_server.serving.admission import Urgency
from keras_server.serving.failures import Failure, from_exception
from keras_server.serving.inference import (
    IMAGE,
    PIXELS,
    Inference,
    Output,
    Result,
    bad,
)
from keras_server.serving.keys import ApiKeys, Rejected, key_from
from keras_server.serving.pipeline import UNKNOWN, Decoder, Pipeline, who_answered
from keras_server.serving.quotas import Caller
from keras_server.settings import Settings

log = logging.getLogger(__name__)
# Calls the request log leaves out, as the REST log leaves out the probes.
QUIET = frozenset({"ServerLive", "ServerReady"})

Request = TypeVar("Request")
Reply = TypeVar("Reply")
Method = Callable[[Any, Request, grpc.ServicerContext], Reply]


def answered(method: Method[Request, Reply]) -> Method[Request, Reply]:
    """Every failure of `method` answered with its gRPC code, counted (with
    the model and version that answered, as the pipeline names them) and logged."""
    name = method.__name__

    @functools.wraps(method)
    def call(self: Any, request: Request, context: grpc.ServicerContext) -> Reply:
        started = time.perf_counter()
        logs.request_id.set("-")
        who_answered.set(UNKNOWN)  # the pipeline names who answered (metrics.ANSWERED_BY)
        error: Failure | None = None
        try:
            reply = method(self, request, context)
        except Exception as exc:  # a bug is logged with its traceback, answered INTERNAL
            error = from_exception(exc)
        code = grpc.StatusCode.OK if error is None else grpc.StatusCode[error.answer.grpc]
        elapsed = time.perf_counter() - started
        by = who_answered.get()
        metrics.GRPC_REQUESTS.labels(name, code.name, by.model, by.version).inc()
        metrics.GRPC_REQUEST_SECONDS.labels(name, by.model, by.version).observe(elapsed)
        if name not in QUIET or error is not None:
            log.info("gRPC %s %s in %.0f ms", name, code.name, elapsed * 1000)
        if error is None:
            return reply
        if error.headers:
            context.set_trailing_metadata(tuple((k.lower(), v) for k, v in error.headers.items()))
        context.abort(code, error.message)  # raises: the call ends here
        raise AssertionError("unreachable")  # pragma: no cover

    return call


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's six calls, over one process's serving core; `keys`: the
    API keys (--api-keys), to charge a caller's quota per image."""

    def __init__(self, pipeline: Pipeline, keys: ApiKeys | None = None) -> None:
        self.pipeline = pipeline
        self.keys = keys

    @answered
    def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @answered
    def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=core.server_ready(self.pipeline.deployment))

    @answered
    def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        ready = core.model_ready(self.pipeline, request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    @answered
    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**core.server_metadata())

    @answered
    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        metadata = core.model_metadata(self.pipeline, request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata["versions"],
            platform=metadata["platform"],
            inputs=[tensor(**t) for t in metadata["inputs"]],
            outputs=[tensor(**t) for t in metadata["outputs"]],
        )

    @answered
    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        pipeline = self.pipeline
        model, route = pipeline.target(request.model_name, request.model_version or None)
        inference = parse_request(request, model.input_size(), pipeline.settings, pipeline.decoder)
        # The client's deadline, if it set one, is the request's: None when it did not.
        remaining = context.time_remaining()
        result = core.infer(
            pipeline, model, route, inference, timeout=remaining, caller=self._caller(context)
        )
        return answer(inference, result)

    def _caller(self, context: grpc.ServicerContext) -> Caller | None:
        """The call's key, as the interceptor checked it (rpc/server.py); None without keys."""
        if self.keys is None:
            return None
        metadata = dict(context.invocation_metadata())
        try:
            entry = self.keys.identify(
                key_from(metadata.get("authorization"), metadata.get("x-api-key"))
            )
        except Rejected:
            return None
        return Caller(entry.name, entry.quota) if entry is not None else None


# -- the request --------------------------------------------------------------


def parameters(entries: Any) -> dict[str, Any]:
    """A protobuf map of InferParameter as plain values."""
    values = {}
    for key, parameter in entries.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, choice) if choice else None
    return values


def parse_request(
    request: pb.ModelInferRequest, size: tuple[int, int] | None, settings: Settings, decode: Decoder
) -> Inference:
    """A ModelInferRequest -> the images to queue (the files not yet decoded);
    BadInput says what is wrong."""
    inputs = list(request.inputs)
    if not inputs:
        raise bad("'inputs' must hold one tensor")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(inputs):
        raise bad(
            f"raw_input_contents holds {len(raw)} tensors for {len(inputs)} inputs: "
            "one each, or none"
        )
    _check_inputs(inputs, bool(raw))
    outputs = [
        core.requested_output(o.name, parameters(o.parameters), default_binary=False)
        for o in request.outputs
    ] or [Output()]
    tensor, data = inputs[0], (raw[0] if raw else None)
    shape = list(tensor.shape)
    if tensor.name == IMAGE:
        checked, count = core.check_image_tensor(tensor.datatype, shape, settings)
        files = core.bytes_elements(data) if data is not None else tensor.contents.bytes_contents
        images = core.check_files(list(files), checked, count)
    elif tensor.name == PIXELS:
        if size is None:
            raise core.input_unknown()
        dtype, checked, _ = core.check_pixel_tensor(tensor.datatype, shape, size, settings)
        if data is not None:
            array = core.pixels_from_bytes(data, dtype, checked, tensor.datatype)
        else:
            array = _typed_pixels(tensor.contents, dtype, checked, decode)
        images = core.split_pixels(array, checked)
    else:
        raise core.unknown_input(tensor.name)
    given = parameters(request.parameters)
    for name in ("priority", "timeout", "explain_class", "explain_grid"):
        if name in given and given[name] is None:
            # A choice this proto lacks: tritonclient's priority= is a uint64_param.
            raise bad(f"parameters.{name} must be an int64_param (KServe's protocol has no uint64)")
    urgency = Urgency.from_parameters(given, settings)
    ask = core.explain_of(given, settings)
    return Inference(images, outputs, request.id or None, urgency=urgency, explain=ask)


def _check_inputs(inputs: list[Any], raw: bool) -> None:
    """One input, its data in one place, no shared memory."""
    for tensor in inputs:
        if raw and tensor.HasField("contents"):
            # The protocol forbids both; Triton answers INVALID_ARGUMENT too.
            raise bad(
                f"input {tensor.name!r} sets contents while the request sets "
                "raw_input_contents: send each tensor's data in one of them"
            )
        if any(key.startswith("shared_memory") for key in tensor.parameters):
            raise bad("shared memory is not supported: send the data in the request")
    core.one_input([t.name for t in inputs])


def _typed_pixels(
    contents: pb.InferTensorContents, dtype: np.dtype, shape: list[int], decode: Decoder
) -> np.ndarray:
    """Pixels sent as typed values: UINT8 in `uint_contents` (each a uint32),
    FP32 in `fp32_contents`. The copies are held within the decode budget."""
    values = contents.uint_contents if dtype == np.uint8 else contents.fp32_contents
    elements = math.prod(shape)
    if len(values) != elements:
        field = "uint_contents" if dtype == np.uint8 else "fp32_contents"
        raise bad(f"input {PIXELS!r}: shape {shape} holds {elements} values, {field} {len(values)}")
    wide = np.uint32 if dtype == np.uint8 else np.float32
    with decode.budget.reserve(elements * (4 + dtype.itemsize), "the request's tensor"):
        array = np.fromiter(values, dtype=wide, count=elements)
        if dtype == np.uint8:
            if elements and array.max() > 255:
                raise bad(f"input {PIXELS!r}: UINT8 values must be whole numbers 0..255")
            return array.astype(np.uint8)
        return array


# -- the response -------------------------------------------------------------


def answer(inference: Inference, result: Result) -> pb.ModelInferResponse:
    """The ModelInferResponse: every output in raw_output_contents, as Triton
    answers (tritonclient reads either form)."""
    response = pb.ModelInferResponse(model_name=result.model, model_version=result.version)
    if inference.request_id is not None:
        response.id = inference.request_id
    for tensor, raw, _ in result.tensors(inference.outputs):
        response.outputs.add(**tensor)
        response.raw_output_contents.append(raw)
    return response
