"""The Open Inference Protocol (KServe v2) without its transport: what the
REST routes (v2.py) and the gRPC service (keras_server/rpc/) both call, so
that a request takes the same path whichever way it came.

- the server and model metadata, liveness and readiness, as plain values;
- the model and version a request names (`find_model`, `check_version`,
  `resolve`), 404 when unknown;
- the tensors every model takes, checked: `image` (BYTES, encoded files,
  each decoded within the process's decode memory budget as /predict's
  uploads are) and `pixels` (UINT8 or FP32 `[N, H, W, 3]`); the one output,
  `probabilities`, with the classification extension;
- `infer`: the images as N queue entries through dispatch.submit (one shard,
  all or none, batched with everyone else's) at the request's priority level
  (Triton's `parameters.priority`, dispatch.Urgency), awaited until the
  request's deadline (--result-timeout, or less when the caller says so:
  `parameters.timeout`, or a gRPC client's deadline), and the answer
  (`Result`) with the classification strings made here once; with the
  response cache on for the model (web/response_cache.py), each image is
  looked up before it is decoded, and only the misses are queued.

Failures are errors.HttpError with their HTTP status (400, 404, 413, 500,
503, 504); the REST routes answer them as they are, the gRPC service maps
each status to a gRPC code. Neither Flask's request nor its app is used here.
TensorFlow-free.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keras_server.broker import messages
from keras_server.broker.messages import WorkerInfo
from keras_server.images import ImageError
from keras_server.settings import Settings
from keras_server.web import errors
from keras_server.web.deployment import Deployment, ServedModel
from keras_server.web.dispatch import Decoder, Urgency, pinned, submit, timed_out, too_many
from keras_server.web.errors import HttpError
from keras_server.web.page import openapi_document
from keras_server.web.response_cache import ResponseCache, probabilities_form
from keras_server.web.routing import Route

log = logging.getLogger(__name__)

SERVER_NAME = "keras-server"
EXTENSIONS = ["classification", "binary_tensor_data"]
PLATFORM = "keras"
IMAGE, PIXELS, OUTPUT = "image", "pixels", "probabilities"
PIXEL_TYPES = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype(np.float32)}


def bad(message: str) -> HttpError:
    return HttpError(400, message)


@dataclass
class Output:
    """A requested output: `binary` is the REST binary extension's choice
    (gRPC ignores it); `classification` > 0 asks for the top classes."""

    binary: bool = False
    classification: int = 0  # 0: the probabilities themselves


@dataclass
class Inference:
    """A parsed infer request: the images, as the worker takes them, and what to answer."""

    images: list[np.ndarray]  # the pixels input's, or the files' once decoded
    outputs: list[Output]
    request_id: str | None = None
    # The image input's encoded files, not yet decoded: `infer` decodes those
    # the response cache does not answer (with `decode` and `size`).
    files: list[bytes] = field(default_factory=list)
    pixels_dtype: str = ""  # the pixels input's: uint8 or float32
    # Its priority level and timeout (Triton's parameters); None: the defaults.
    urgency: Urgency | None = None
    classes: int = field(init=False)

    def __post_init__(self) -> None:
        self.classes = max((o.classification for o in self.outputs), default=0)


@dataclass
class Result:
    """An infer request answered: probabilities [N, classes], each image's top
    classes (as many as the largest classification asked), who answered."""

    model: str
    version: str
    probabilities: np.ndarray
    classes: list[list[dict[str, Any]]]
    cache: str | None = None  # X-Cache (hit, miss, partial); None: the cache is off

    def classification(self, k: int) -> tuple[list[str], list[int]]:
        """Triton's classification extension: `"score:index:label"` for each
        image's top `k` (at most the model's classes), and the shape [N, k]."""
        k = min(k, self.probabilities.shape[1])
        strings = [
            f"{float(row[c['index']]):f}:{c['index']}:{c['label']}"
            for row, top in zip(self.probabilities, self.classes, strict=True)
            for c in top[:k]
        ]
        return strings, [len(self.classes), k]


# -- metadata, health ---------------------------------------------------------


def server_version() -> str:
    """The package's version, as the OpenAPI description states it (a test
    keeps that equal to pyproject.toml's)."""
    return str(json.loads(openapi_document())["info"]["version"])


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}


def server_ready(deployment: Deployment) -> bool:
    """/readyz's rule: a worker beats for every model on every reachable shard."""
    return not deployment.unready(deployment.survey())


def repository_index(deployment: Deployment, ready_only: bool = False) -> list[dict[str, str]]:
    """Triton's repository index: per model, each version with live workers
    (READY); a model with none, under its spec's version (UNAVAILABLE)."""
    survey = deployment.survey()  # learns models first (--models-from workers)
    index = []
    for model in deployment.models.values():
        live = sorted({w.version or model.spec.version for w in survey.live_workers(model.name)})
        for version in live:
            index.append({"name": model.name, "version": version, "state": "READY"})
        if not live and not ready_only:
            index.append(
                {
                    "name": model.name,
                    "version": model.spec.version,
                    "state": "UNAVAILABLE",
                    "reason": "no live worker",
                }
            )
    return index


def find_model(deployment: Deployment, name: str) -> ServedModel:
    model = deployment.get(name)
    if model is None:
        known = ", ".join(sorted(deployment.models))
        raise HttpError(404, f"unknown model {name!r}; this server serves {known}")
    return model


def versions(model: ServedModel, workers: list[WorkerInfo]) -> list[str]:
    return sorted({model.spec.version, *(w.version for w in workers if w.version)})


def check_version(model: ServedModel, version: str | None, workers: list[WorkerInfo]) -> None:
    if version is not None and version not in versions(model, workers):
        served = ", ".join(versions(model, workers))
        raise HttpError(404, f"model {model.name!r} has no version {version!r}; it serves {served}")


def resolve(
    deployment: Deployment, name: str, version: str | None
) -> tuple[ServedModel, list[WorkerInfo]]:
    """The model, its live workers (read from Redis now), the version checked."""
    model = find_model(deployment, name)
    workers = model.live_workers()
    check_version(model, version, workers)
    return model, workers


def model_metadata(deployment: Deployment, name: str, version: str | None) -> dict[str, Any]:
    model, workers = resolve(deployment, name, version)
    size = model.input_size(workers)
    width, height = size or (-1, -1)
    classes = max((w.labels for w in workers), default=0) or -1
    return {
        "name": model.name,
        "versions": versions(model, workers) if version is None else [version],
        "platform": PLATFORM,
        "inputs": [
            {"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS, "datatype": "UINT8", "shape": [-1, height, width, 3]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, classes]}],
    }


def model_ready(deployment: Deployment, name: str, version: str | None) -> bool:
    _, workers = resolve(deployment, name, version)
    if version is not None:
        workers = [w for w in workers if w.version == version]
    return bool(workers)


def infer_target(
    deployment: Deployment, name: str, version: str | None
) -> tuple[ServedModel, tuple[int, int], Route]:
    """The model an infer request names, its input size, and where the
    request goes (web/routing.py: the version named, else the model's
    traffic policy's); 404 for an unknown model or version, 503 while no
    worker has said its size, or the version named has no live worker. The
    live workers are read from Redis only to check a version the request
    names; the size comes from the model's cache, as for /predict."""
    model = find_model(deployment, name)
    if version:
        check_version(model, version, model.live_workers())
    route = model.router.route(version or None)
    size = model.input_size()
    if size is None:
        raise errors.no_live_worker(model.name)
    return model, size, route


# -- the tensors ----------------------------------------------------------------


def check_shape(name: object, shape: object) -> list[int]:
    if not isinstance(shape, list | tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise bad(f"input {name!r}: 'shape' must be a list of whole numbers")
    return list(shape)


def count_images(shape: list[int], settings: Settings) -> int:
    """How many images the shape holds; too many is a 413, none a 400."""
    if not shape or shape[0] < 1:
        raise bad(f"shape {shape}: at least one image")
    if shape[0] > settings.max_images:
        raise too_many(shape[0], settings)
    return shape[0]


def unknown_input(name: object) -> HttpError:
    return bad(
        f"unknown input {name!r}: the model takes {IMAGE!r} (BYTES, encoded image files) "
        f"or {PIXELS!r} (UINT8 or FP32, [N, H, W, 3])"
    )


def one_input(names: Sequence[object]) -> None:
    if len(names) != 1:
        raise bad(f"one input per request, {IMAGE!r} or {PIXELS!r}; got {list(names)}")


def check_image_tensor(
    datatype: object, shape: object, settings: Settings
) -> tuple[list[int], int]:
    """The `image` input's header: BYTES [N] or [N, 1]; (shape, N)."""
    if datatype != "BYTES":
        raise bad(f"input {IMAGE!r} must be BYTES (encoded image files), not {datatype!r}")
    checked = check_shape(IMAGE, shape)
    if len(checked) not in (1, 2) or (len(checked) == 2 and checked[1] != 1):
        raise bad(f"input {IMAGE!r}: shape must be [N] or [N, 1], not {checked}")
    return checked, count_images(checked, settings)


def decode_images(
    files: Sequence[bytes], shape: list[int], count: int, size: tuple[int, int], decode: Decoder
) -> list[np.ndarray]:
    """The `image` input's files, decoded and resized as /predict does, each
    within the decode memory budget."""
    checked = check_files(files, shape, count)
    return decode_files(list(enumerate(checked)), size, decode)


def check_files(files: Sequence[bytes], shape: list[int], count: int) -> list[bytes]:
    """The `image` input's files, as many as its shape says, none empty."""
    if len(files) != count:
        raise bad(f"input {IMAGE!r}: shape {shape} holds {count} images, the data {len(files)}")
    for index, file in enumerate(files):
        if not file:
            raise bad(f"input {IMAGE!r} element {index} is empty")
    return list(files)


def decode_files(
    files: Sequence[tuple[int, bytes]], size: tuple[int, int], decode: Decoder
) -> list[np.ndarray]:
    """Files of the `image` input (each with its element index), decoded; an
    HttpError names the element that failed."""
    images = []
    for index, file in files:
        try:
            images.append(decode(file, size))
        except ImageError as exc:
            refused = errors.from_image(exc)
            refused.message = f"input {IMAGE!r} element {index}: {refused.message}"
            raise refused from None
    return images


def bytes_elements(data: bytes) -> list[bytes]:
    """The binary form of a BYTES tensor (REST's binary extension, gRPC's raw
    contents): each element a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise bad(f"input {IMAGE!r}: its binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise bad(
                f"input {IMAGE!r} element {len(elements)}: its length says {length} bytes, "
                f"{len(data) - offset} are left"
            )
        elements.append(data[offset : offset + length])
        offset += length
    return elements


def serialize_bytes(strings: Sequence[str]) -> bytes:
    """A BYTES tensor of text in the binary form `bytes_elements` reads."""
    encoded = [s.encode() for s in strings]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)


def check_pixel_tensor(
    datatype: object, shape: object, size: tuple[int, int], settings: Settings
) -> tuple[np.dtype, list[int], int]:
    """The `pixels` input's header: UINT8 or FP32 [N, H, W, 3] at the model's
    input size; (dtype, shape, N)."""
    dtype = PIXEL_TYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise bad(f"input {PIXELS!r} must be UINT8 or FP32, not {datatype!r}")
    checked = check_shape(PIXELS, shape)
    width, height = size
    if len(checked) != 4 or checked[1:] != [height, width, 3]:
        raise bad(
            f"input {PIXELS!r}: shape must be [N, {height}, {width}, 3] "
            f"(the model's input size, RGB), not {checked}"
        )
    return dtype, checked, count_images(checked, settings)


def pixels_from_bytes(data: bytes, dtype: np.dtype, shape: list[int], datatype: str) -> np.ndarray:
    """The binary form of a pixels tensor (little-endian, row-major), unchecked values."""
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise bad(
            f"input {PIXELS!r}: {len(data)} bytes of binary data do not fit {shape} {datatype}"
        )
    return np.frombuffer(data, dtype=dtype.newbyteorder("<"))


def split_pixels(array: np.ndarray, shape: list[int]) -> list[np.ndarray]:
    """A flat array of the pixels' values, checked, as one image per entry."""
    if array.dtype == np.float32 and not np.all(np.isfinite(array)):
        raise bad(f"input {PIXELS!r}: FP32 values must be finite")
    batch = array.reshape(shape)
    return [batch[i] for i in range(shape[0])]


def requested_output(name: object, parameters: dict[str, Any], default_binary: bool) -> Output:
    """An output the request asks for, from its name and parameters."""
    if name != OUTPUT:
        raise bad(f"unknown output {name!r}: the model has one, {OUTPUT!r}")
    if any(key.startswith("shared_memory") for key in parameters):
        raise bad("shared memory is not supported")
    binary = parameters.get("binary_data", default_binary)
    if not isinstance(binary, bool):
        raise bad("binary_data must be true or false")
    k = parameters.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= messages.MAX_CLASSES:
        raise bad(f"classification must be a whole number of classes, 1..{messages.MAX_CLASSES}")
    return Output(binary, k)


# -- the answer -----------------------------------------------------------------


def infer(
    model: ServedModel,
    inference: Inference,
    settings: Settings,
    timeout: float | None = None,
    *,
    cache: ResponseCache | None = None,
    decode: Decoder | None = None,
    size: tuple[int, int] | None = None,
    route: Route | None = None,
) -> Result:
    """Queue the request's images and await their answers, for at most
    --result-timeout or `timeout` seconds, whichever is shorter: that is each
    image's deadline in the queue, too (a worker drops it past then), at the
    request's priority level.

    With the response `cache` on for the model, each image is looked up
    first (the files as sent, the pixels' bytes) and only the misses are
    decoded (`inference.files`, with `decode` and `size`) and queued, as
    `route` says (None: on the model's own queue, any version)."""
    urgency = inference.urgency or Urgency.default(settings)
    # urgency.timeout is --result-timeout at most already.
    limit = urgency.timeout if timeout is None else min(timeout, urgency.timeout)
    count = len(inference.files or inference.images)
    looked = None
    if cache and cache.on_for(model):
        form = probabilities_form(inference.classes, inference.pixels_dtype)
        payloads = inference.files or [
            memoryview(np.ascontiguousarray(image)) for image in inference.images
        ]
        looked = cache.lookup(model, form, payloads, route.answered_by if route else None)
    raws: dict[int, bytes | None] = dict(looked.hits) if looked else {}
    missed = [i for i in range(count) if i not in raws]
    if missed:
        if inference.files:
            if decode is None or size is None:
                raise ValueError("undecoded files need decode and size")
            images = decode_files([(i, inference.files[i]) for i in missed], size, decode)
        else:
            images = [inference.images[i] for i in missed]
        jobs = [
            messages.ImageRequest.create(
                image,
                limit,
                probabilities=True,
                classes=inference.classes,
                priority=urgency.priority,
                version=pinned(route),
            )
            for image in images
        ]
        answers = submit(model, jobs, settings, route)
        found = {i: answers[j.id] for i, j in zip(missed, jobs, strict=True) if j.id in answers}
        if cache and looked:
            cache.store(looked, found)
        raws.update({i: found.get(i) for i in missed})
    rows, classes, made_by = [], [], None
    for position in range(count):
        raw = raws[position]
        if raw is None:
            raise HttpError(504, _timed_out(limit, settings))
        header, vector = messages.decode_probabilities(raw)
        if not header["success"]:
            raise HttpError(500, header.get("error", "the model failed"))
        if vector is None:
            raise HttpError(
                500, "a worker answered without the probabilities: is it older than this server?"
            )
        rows.append(vector)
        classes.append(header.get("classes", []))
        made_by = made_by or header.get("model")
    version = (made_by or {}).get("version") or model.spec.version
    return Result(model.name, version, np.stack(rows), classes, looked.header if looked else None)


def _timed_out(limit: float, settings: Settings) -> str:
    if limit < settings.result_timeout:
        return (
            f"no prediction within the request's deadline ({limit:.3g} s): the model "
            "workers are down or overloaded"
        )
    return timed_out(limit)
