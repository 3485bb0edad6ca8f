"""The Open Inference Protocol (KServe v2) without its transport: what the
REST routes (web/v2.py) and the gRPC service (rpc/service.py) both call, so
that a request takes the same path whichever way it came.

- the server and model metadata, liveness and readiness, as plain values
  (from the process's survey of the workers, serving/workers.py);
- one input per request, checked: `image`, BYTES `[N]` or `[N, 1]`, each
  element an encoded image file (decoded by the pipeline within the
  process's decode memory budget, as /predict's uploads are), or `pixels`,
  UINT8 or FP32 `[N, H, W, 3]`, RGB 0..255 at the model's input size;
- the one output, `probabilities`, FP32 `[N, classes]`, or with
  `"classification": k` on it BYTES `[N, k]` of `"score:index:label"`
  (Triton's classification extension);
- `infer`: the request's images through the one pipeline
  (serving/pipeline.py: quota, response cache, decode, queue, await) at the
  level and deadline of `parameters.priority` and `parameters.timeout`
  (serving/admission.py), all answered together; a rejected request queues
  nothing. A version the request names is pinned (serving/traffic.py);
- explanations: `parameters.explain` ("occlusion" or "gradcam", with
  `explain_class` k, default the most likely, and occlusion's
  `explain_grid`) explains each image with serving/explain.py, at the
  lowest priority level, and adds the output `heatmap`, FP32
  `[N, rows, columns]`.

Failures are serving/failures.py's; each transport answers them from its
one table. TensorFlow-free.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keras_server import __version__
from keras_server.broker import messages
from keras_server.serving import explain as explaining
from keras_server.serving.admission import Urgency
from keras_server.serving.failures import BadInput, Failure, Unavailable, too_many
from keras_server.serving.models import Deployment, ServedModel
from keras_server.serving.pipeline import (
    Form,
    Image,
    Pipeline,
    check_version,
    read_probabilities,
    versions,
)
from keras_server.serving.quotas import Caller
from keras_server.serving.traffic import Route
from keras_server.settings import Settings

log = logging.getLogger(__name__)

SERVER_NAME = "keras-server"
EXTENSIONS = ["classification", "binary_tensor_data"]
PLATFORM = "keras"
IMAGE, PIXELS, OUTPUT = "image", "pixels", "probabilities"
HEATMAP = "heatmap"  # with parameters.explain
PIXEL_TYPES = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype(np.float32)}


def bad(message: str) -> BadInput:
    return BadInput(message)


@dataclass
class Output:
    """A requested output: `binary` is the REST binary extension's choice
    (gRPC ignores it); `classification` > 0 asks for the top classes."""

    binary: bool = False
    classification: int = 0  # 0: the probabilities themselves
    name: str = OUTPUT  # or HEATMAP


@dataclass
class Inference:
    """A parsed infer request: the images, as the worker takes them, and what to answer."""

    images: list[Image]  # the image input's files, or the pixels input's arrays
    outputs: list[Output]
    request_id: str | None = None
    # Its priority level and timeout (Triton's parameters); None: the defaults.
    urgency: Urgency | None = None
    explain: explaining.Ask | None = None  # parameters.explain; None: not asked
    classes: int = field(init=False)

    def __post_init__(self) -> None:
        self.classes = max((o.classification for o in self.outputs), default=0)
        asked = any(o.name == HEATMAP for o in self.outputs)
        if asked and self.explain is None:
            raise bad(f"output {HEATMAP!r} needs parameters.explain (occlusion or gradcam)")
        if self.explain is not None and not asked:
            binary = any(o.binary for o in self.outputs)
            self.outputs.append(Output(binary, name=HEATMAP))

    @property
    def pixels_dtype(self) -> str:
        """The pixels input's dtype, uint8 or float32; "" for image files."""
        pixels = self.images[0].pixels if self.images else None
        return "" if pixels is None else pixels.dtype.name


@dataclass
class Result:
    """An infer request answered: probabilities [N, classes], each image's top
    classes (as many as the largest classification asked), who answered."""

    model: str
    version: str
    probabilities: np.ndarray
    classes: list[list[dict[str, Any]]]
    cache: str | None = None  # X-Cache (hit, miss, partial); None: the cache is off
    heatmaps: np.ndarray | None = None  # [N, rows, columns] with parameters.explain

    def tensors(self, outputs: Sequence[Output]) -> Iterator[tuple[dict[str, Any], bytes, Any]]:
        """Each output asked for: its tensor's name, datatype and shape, its
        binary form (little-endian) and its values, a list or an array."""
        for output in outputs:
            if output.name == HEATMAP and self.heatmaps is not None:
                name, array = HEATMAP, self.heatmaps
            elif output.classification:
                strings, shape = self.classification(output.classification)
                tensor = {"name": OUTPUT, "datatype": "BYTES", "shape": shape}
                yield tensor, serialize_bytes(strings), strings
                continue
            else:
                name, array = OUTPUT, self.probabilities
            tensor = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
            yield tensor, np.ascontiguousarray(array, dtype="<f4").tobytes(), array

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


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


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


def resolve(
    pipeline: Pipeline, name: str, version: str | None
) -> tuple[ServedModel, list[messages.WorkerInfo]]:
    """The model, its live workers (from the process's survey), the version
    checked: NotFound for an unknown model or version."""
    model = pipeline.model(name)
    if version is None:
        return model, model.live_workers()
    return model, check_version(model, version)


def model_metadata(pipeline: Pipeline, name: str, version: str | None) -> dict[str, Any]:
    model, workers = resolve(pipeline, name, version)
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


def model_ready(pipeline: Pipeline, name: str, version: str | None) -> bool:
    _, workers = resolve(pipeline, name, version)
    if version is not None:
        workers = [w for w in workers if w.version == version]
    return bool(workers)


def input_unknown() -> Unavailable:
    """A pixels input while no worker has said the model's input size."""
    return Unavailable(
        f"input {PIXELS!r}: no worker has said the model's input size yet; retry shortly"
    )


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
        raise too_many(shape[0], settings.max_images)
    return shape[0]


def unknown_input(name: object) -> BadInput:
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


def check_files(files: Sequence[bytes], shape: list[int], count: int) -> list[Image]:
    """The `image` input's files, as many as its shape says, none empty."""
    if len(files) != count:
        raise bad(f"input {IMAGE!r}: shape {shape} holds {count} images, the data {len(files)}")
    for index, file in enumerate(files):
        if not file:
            raise bad(f"input {IMAGE!r} element {index} is empty")
    return [Image(data=bytes(file)) for file in files]


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


def split_pixels(array: np.ndarray, shape: list[int]) -> list[Image]:
    """A flat array of the pixels' values, checked, as one image per entry."""
    if array.dtype == np.float32 and not np.all(np.isfinite(array)):
        raise bad(f"input {PIXELS!r}: FP32 values must be finite")
    batch = array.reshape(shape)
    return [Image(pixels=batch[i]) for i in range(shape[0])]


def requested_output(name: object, parameters: dict[str, Any], default_binary: bool) -> Output:
    """An output the request asks for, from its name and parameters."""
    if name not in (OUTPUT, HEATMAP):
        raise bad(
            f"unknown output {name!r}: the model has {OUTPUT!r}, and {HEATMAP!r} with "
            "parameters.explain"
        )
    if any(key.startswith("shared_memory") for key in parameters):
        raise bad("shared memory is not supported")
    binary = parameters.get("binary_data", default_binary)
    if not isinstance(binary, bool):
        raise bad("binary_data must be true or false")
    k = parameters.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= messages.MAX_CLASSES:
        raise bad(f"classification must be a whole number of classes, 1..{messages.MAX_CLASSES}")
    if name == HEATMAP and k:
        raise bad(f"output {HEATMAP!r} takes no classification")
    return Output(binary, k, str(name))


def explain_of(parameters: dict[str, Any], settings: Settings) -> explaining.Ask | None:
    """The request's `parameters.explain`, `explain_class` and
    `explain_grid`; None when it asks for no explanation."""
    method = parameters.get("explain")
    if method is None:
        for name in ("explain_class", "explain_grid"):
            if name in parameters:
                raise bad(f"parameters.{name} needs parameters.explain (occlusion or gradcam)")
        return None
    if not isinstance(method, str):
        raise bad(f"parameters.explain must be one of {', '.join(explaining.METHODS)}")
    index = parameters.get("explain_class")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
        raise bad("parameters.explain_class must be a class index, 0 or more")
    grid = parameters.get("explain_grid")
    if grid is not None and (not isinstance(grid, int) or isinstance(grid, bool)):
        raise bad("parameters.explain_grid must be a whole number")
    return explaining.Ask(
        explaining.method_of(method), index, explaining.grid_of(grid, settings.explain_grid)
    )


# -- the answer -----------------------------------------------------------------


def infer(
    pipeline: Pipeline,
    model: ServedModel,
    route: Route,
    inference: Inference,
    *,
    timeout: float | None = None,
    caller: Caller | None = None,
) -> Result:
    """The request's images through the pipeline and their answers, waiting
    at most --result-timeout, the request's `parameters.timeout` or
    `timeout` (a gRPC client's deadline), whichever is shortest. Any image
    that fails fails the request: a bad file names its element."""
    urgency = (inference.urgency or Urgency.default(pipeline.settings)).within(timeout)
    if inference.explain is not None:
        return _explained(pipeline, model, route, inference, urgency.timeout, caller=caller)
    form = Form(True, inference.classes, inference.pixels_dtype)
    answered = pipeline.run(model, route, inference.images, form, urgency, caller=caller)
    rows, classes = [], []
    for position, raw in enumerate(answered.answers):
        if isinstance(raw, Failure):
            if 400 <= raw.status < 500:
                raw.message = f"input {IMAGE!r} element {position}: {raw.message}"
            raise raw
        header, vector = read_probabilities(raw)
        rows.append(vector)
        classes.append(header.get("classes", []))
    version = answered.version or model.spec.version
    return Result(model.name, version, np.stack(rows), classes, answered.cache)


def _explained(
    pipeline: Pipeline,
    model: ServedModel,
    route: Route,
    inference: Inference,
    timeout: float,
    *,
    caller: Caller | None,
) -> Result:
    """Each image explained (serving/explain.py, at the lowest level, within
    `timeout` in all): the probabilities and the heat maps, of one shape."""
    assert inference.explain is not None
    deadline = time.monotonic() + timeout
    found = []
    for position, image in enumerate(inference.images):
        try:
            found.append(
                explaining.explain(
                    pipeline,
                    (model, route),
                    image,
                    inference.explain,
                    max(deadline - time.monotonic(), 0.0),
                    classes=inference.classes,
                    caller=caller,
                )
            )
        except Failure as failure:
            if 400 <= failure.status < 500:
                failure.message = f"input {IMAGE!r} element {position}: {failure.message}"
            raise
    version = found[0].model.get("version") or model.spec.version
    return Result(
        model.name,
        version,
        np.stack([f.probabilities for f in found]),
        [f.classes for f in found],
        heatmaps=np.stack([f.heatmap for f in found]),
    )
