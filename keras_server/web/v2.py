"""The Open Inference Protocol (KServe v2) over REST: a Flask blueprint under
`/v2` that `web.create_app` registers; its routes read the app's pipeline
with `web.state()`.

    GET  /v2                                   server metadata
    GET  /v2/health/live, /v2/health/ready     200 when live / ready, else 400
    GET  /v2/models/{name}[/versions/{v}]      model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer
    POST /v2/repository/index                  Triton's model repository index
                                               (read-only: models, versions, state)

The tensors (one input, `image` or `pixels`; the outputs `probabilities`
and, with `parameters.explain`, `heatmap`), their checks, the parameters and
`infer` are the serving core's (serving/inference.py), which the gRPC front
shares. This module is the REST form: routes, JSON (a BYTES element is
base64 text) and the binary tensor data extension (what tritonclient sends
by default; an output answers binary with `"binary_data": true` on it, or
`"binary_data_output": true` on the request). `X-Cache` says hit, miss or
partial while the cache is on for the model, without --api-keys. Every
error is `{"error": "..."}`, with the core's status: 400 for a request the
protocol or the model does not take, 404 for an unknown model or version,
413 past --max-images, 503/504 as `/predict`. TensorFlow-free.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from flask import Blueprint, Response, jsonify, request

from keras_server.images import ImageError
from keras_server.serving import inference as core
from keras_server.serving.admission import Urgency
from keras_server.serving.failures import BadInput, from_image
from keras_server.serving.inference import (
    IMAGE,
    OUTPUT,
    PIXELS,
    Inference,
    Output,
    Result,
    bad,
)
from keras_server.serving.pipeline import Decoder, Image
from keras_server.settings import Settings
from keras_server.web import auth, state
from keras_server.web.predict import CACHE_HEADER

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"

blueprint = Blueprint("v2", __name__, url_prefix="/v2")


def owns(path: str) -> bool:
    """Whether `path` is the protocol's, routed or not: its errors take its shape."""
    return path == blueprint.url_prefix or path.startswith(f"{blueprint.url_prefix}/")


@blueprint.get("")
def server_metadata() -> Response:
    return jsonify(core.server_metadata())


@blueprint.get("/health/live")
def live() -> Response:
    return jsonify(live=True)


@blueprint.get("/health/ready")
def ready() -> Response | tuple[Response, int]:
    # /readyz's rule. The protocol: 200 is true, a 4xx false (/readyz says
    # why, with a 503).
    ok = core.server_ready(state().pipeline.deployment)
    return jsonify(ready=ok), 200 if ok else 400


@blueprint.post("/repository/index")
def repository_index() -> Response:
    """Triton's repository index, read-only: each model's versions with live
    workers (READY), or the model alone (UNAVAILABLE) while it has none.
    `{"ready": true}` lists the READY ones only."""
    body = request.get_json(silent=True) if request.get_data() else {}
    if not isinstance(body, dict) or not isinstance(body.get("ready", False), bool):
        raise BadInput('send {} or {"ready": true}')
    deployment = state().pipeline.deployment
    return jsonify(core.repository_index(deployment, ready_only=body.get("ready", False)))


@blueprint.get("/models/<name>")
@blueprint.get("/models/<name>/versions/<version>")
def model_metadata(name: str, version: str | None = None) -> Response:
    return jsonify(core.model_metadata(state().pipeline, name, version))


@blueprint.get("/models/<name>/ready")
@blueprint.get("/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str | None = None) -> Response | tuple[Response, int]:
    ok = core.model_ready(state().pipeline, name, version)
    return jsonify(name=name, ready=ok), 200 if ok else 400


@blueprint.post("/models/<name>/infer")
@blueprint.post("/models/<name>/versions/<version>/infer")
def infer(name: str, version: str | None = None) -> Response:
    pipeline = state().pipeline
    model, route = pipeline.target(name, version)
    inference = parse_request(
        request.get_data(), request.headers, model.input_size(), pipeline.settings,
        pipeline.decoder,
    )  # fmt: skip
    result = core.infer(pipeline, model, route, inference, caller=auth.caller())
    response = answer(inference, result)
    if result.cache and not pipeline.settings.api_keys:
        response.headers[CACHE_HEADER] = result.cache
    return response


# -- the request --------------------------------------------------------------


def parse_request(
    body: bytes, headers: Any, size: tuple[int, int] | None, settings: Settings, decode: Decoder
) -> Inference:
    """An infer request's body, checked, its `image` files not yet decoded
    (the pipeline decodes those the response cache does not answer);
    `size` is the model's input size (None while unknown: a pixels input is
    then refused); BadInput says what is wrong."""
    if headers.get("Content-Encoding", "identity") != "identity":
        raise bad(f"Content-Encoding {headers['Content-Encoding']!r} is not supported")
    header_bytes, binary = _split(body, headers.get(HEADER_LENGTH))
    # The parsed JSON is held until the files are taken out of it or the
    # pixels made: it costs the decode budget, as a decoded image does (a
    # 16 MB body of numbers is ~250 MB of Python objects).
    try:
        with decode.budget.reserve(json_cost(header_bytes), "the request's JSON"):
            return _parse_json(header_bytes, binary, size, settings)
    except ImageError as exc:
        raise from_image(exc) from None


def json_cost(text: bytes) -> int:
    """An upper bound on the bytes `json.loads(text)` holds: per container
    and per value, a Python object and a list slot; strings about their size.
    (Measured, CPython 3.11: 16 MB of `[1],` is 385 MB parsed, of `1.5,`
    129 MB; the bound says 416 and 128.) bytes.count runs at memchr speed."""
    containers = text.count(b"[") + text.count(b"{")
    return len(text) + containers * _CONTAINER_BYTES + text.count(b",") * _VALUE_BYTES


# A list or dict object with its first slots; a float object and its slot.
_CONTAINER_BYTES = 72
_VALUE_BYTES = 32


def _parse_json(
    header_bytes: bytes, binary: bytes, size: tuple[int, int] | None, settings: Settings
) -> Inference:
    try:
        message = json.loads(header_bytes)
    except RecursionError:
        raise bad("the request's JSON is nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError is one
        raise bad(f"the request is not valid JSON ({exc})") from None
    if not isinstance(message, dict):
        raise bad("the request must be a JSON object with 'inputs'")
    request_id = message.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad("'id' must be a string")
    parameters = _object(message.get("parameters", {}), "the request's 'parameters'")
    urgency = Urgency.from_parameters(parameters, settings)
    ask = core.explain_of(parameters, settings)
    inputs = message.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad("'inputs' must be a non-empty list of tensors")
    # Walk every input's binary part first: a length that does not add up is
    # the first thing to report.
    parts = _binary_parts(inputs, binary)
    core.one_input([i.get("name") if isinstance(i, dict) else None for i in inputs])
    # The outputs before the images: a request refused for them decodes nothing.
    default_binary = parameters.get("binary_data_output") is True
    requested = message.get("outputs")
    if requested is not None and not isinstance(requested, list):
        raise bad("'outputs' must be a list of the outputs to answer")
    outputs = [_output(o, default_binary) for o in requested or [{"name": OUTPUT}]]
    tensor, data = inputs[0], parts[0]
    name = tensor.get("name")
    if name == IMAGE:
        images = _image_files(tensor, data, settings)
    elif name == PIXELS:
        images = _pixels(tensor, data, size, settings)
    else:
        raise core.unknown_input(name)
    return Inference(images, outputs, request_id, urgency=urgency, explain=ask)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise bad(f"{HEADER_LENGTH} {header_length!r} is not a whole number") from None
    if not 0 < length <= len(body):
        raise bad(
            f"{HEADER_LENGTH} says the JSON header is {length} bytes, but the body has {len(body)}"
        )
    return body[:length], body[length:]


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad(f"{what} must be a JSON object")
    return value


def _binary_parts(inputs: list[Any], binary: bytes) -> list[bytes | None]:
    """Each input's binary data (None: its data is in the JSON), in order."""
    parts: list[bytes | None] = []
    offset = 0
    for tensor in inputs:
        if not isinstance(tensor, dict):
            raise bad("each input must be a JSON object")
        what = f"input {tensor.get('name')!r}'s parameters"
        parameters = _object(tensor.get("parameters", {}), what)
        if any(key.startswith("shared_memory") for key in parameters):
            raise bad("shared memory is not supported: send the data in the request")
        size = parameters.get("binary_data_size")
        if size is None:
            parts.append(None)
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad(f"input {tensor.get('name')!r}: binary_data_size must be a whole number")
        if offset + size > len(binary):
            raise bad(
                f"input {tensor.get('name')!r}: binary_data_size {size} runs past the "
                f"{len(binary)} bytes after the JSON header ({HEADER_LENGTH})"
            )
        parts.append(binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise bad(
            f"{len(binary) - offset} bytes after the JSON header belong to no input: the "
            f"binary_data_size values and {HEADER_LENGTH} do not match the body"
        )
    return parts


def _image_files(tensor: dict[str, Any], data: bytes | None, settings: Settings) -> list[Image]:
    """BYTES: encoded image files, checked, not yet decoded."""
    shape, count = core.check_image_tensor(tensor.get("datatype"), tensor.get("shape"), settings)
    files = core.bytes_elements(data) if data is not None else _base64_elements(tensor)
    return core.check_files(files, shape, count)


def _base64_elements(tensor: dict[str, Any]) -> list[bytes]:
    """The JSON form of a BYTES tensor of files: base64 strings (JSON cannot
    carry raw bytes), flat or nested."""
    files = []
    for index, text in enumerate(_flatten(tensor.get("data"), IMAGE)):
        if not isinstance(text, str):
            raise bad(f"input {IMAGE!r} element {index}: expected a base64 string")
        try:
            files.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise bad(f"input {IMAGE!r} element {index} is not valid base64") from None
    return files


def _flatten(data: object, name: str) -> Iterator[Any]:
    """The values of a nested JSON list in order, made one at a time (the
    list may hold millions: no flat copy)."""
    if not isinstance(data, list):
        raise bad(f"input {name!r}: 'data' must be a list (or send binary_data_size)")
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


# JSON numbers are converted this many at a time.
_CHUNK = 65_536


def _pixels(
    tensor: dict[str, Any], data: bytes | None, size: tuple[int, int] | None, settings: Settings
) -> list[Image]:
    """UINT8 or FP32 [N, H, W, 3] at the model's input size, RGB 0..255."""
    if size is None:
        raise core.input_unknown()
    datatype = tensor.get("datatype")
    dtype, shape, _ = core.check_pixel_tensor(datatype, tensor.get("shape"), size, settings)
    if data is not None:
        array = core.pixels_from_bytes(data, dtype, shape, str(datatype))
    else:
        array = _json_pixels(tensor.get("data"), shape, dtype)
    return core.split_pixels(array, shape)


def _json_pixels(data: object, shape: list[int], dtype: np.dtype) -> np.ndarray:
    """The JSON form of a pixels tensor as a flat array of `dtype`, filled a
    chunk at a time: beside the parsed list, only the result and one chunk's
    float64 copy are ever held."""
    elements = math.prod(shape)
    array = np.empty(elements, dtype)
    values = _flatten(data, PIXELS)
    filled = 0
    while chunk := list(itertools.islice(values, _CHUNK)):
        if filled + len(chunk) > elements:
            filled += len(chunk) + sum(1 for _ in values)
            break
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in chunk):
            raise bad(f"input {PIXELS!r}: 'data' must hold only numbers")
        try:
            numbers = np.array(chunk, dtype=np.float64)
        except OverflowError:  # an integer past float64's range: inf, refused below
            numbers = np.array([math.inf])
        if dtype == np.uint8 and (
            not np.all(numbers == np.round(numbers)) or numbers.min() < 0 or numbers.max() > 255
        ):
            raise bad(f"input {PIXELS!r}: UINT8 values must be whole numbers 0..255")
        with np.errstate(over="ignore"):  # past float32's range: inf, refused by _pixels
            array[filled : filled + len(chunk)] = numbers
        filled += len(chunk)
    if filled != elements:
        raise bad(f"input {PIXELS!r}: shape {shape} holds {elements} values, the data {filled}")
    return array


def _output(spec: object, default_binary: bool) -> Output:
    if not isinstance(spec, dict):
        raise bad("each requested output must be a JSON object")
    parameters = _object(spec.get("parameters", {}), f"output {OUTPUT!r}'s parameters")
    return core.requested_output(spec.get("name"), parameters, default_binary)


# -- the response -------------------------------------------------------------


def answer(inference: Inference, result: Result) -> Response:
    """The infer response: JSON, or JSON then the binary outputs when any
    output asked for binary data."""
    tensors, blobs = [], []
    for output, (tensor, raw, values) in zip(
        inference.outputs, result.tensors(inference.outputs), strict=True
    ):
        if output.binary:
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = values if isinstance(values, list) else values.ravel().tolist()
        tensors.append(tensor)
    body: dict[str, Any] = {"model_name": result.model, "model_version": result.version}
    if inference.request_id is not None:
        body["id"] = inference.request_id
    body["outputs"] = tensors
    header = json.dumps(body).encode()
    if not blobs:
        return Response(header, mimetype="application/json")
    response = Response(header + b"".join(blobs), mimetype="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(len(header))
    return response
