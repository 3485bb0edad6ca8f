"""The messages between the web tier and the model worker, and the Redis keys
they travel under. Both sides import this file and nothing of each other.
Nothing read from Redis is ever unpickled or evaluated.

Every message names its format, `"format": FORMAT`, so that a change can be
told apart: a request, a result and a heartbeat of another format are
refused, naming it (a worker answers such a request with an error; a web
server takes such a result for a failure; a heartbeat is neither routed to
nor reaped).

A request is a JSON header, a newline (JSON never holds a raw one), then the
image's raw array bytes (C order): `{"format", "id", "shape", "dtype",
"deadline"}\n<bytes>`, `deadline` the Unix time after which nobody waits for
the answer. The web tier sends the resized image as uint8 (150,528 bytes at
224x224x3, a quarter of float32) and unencoded, so a queued image costs
Redis 160 KiB rather than the 224 KiB of base64 (bench/redis_memory.py); the
model's own preprocessing runs on the whole batch in the worker. Optional
fields, each absent when it has its default:
- `"priority": n`, 2 .. --priority-levels (absent: level 1, `priority_of`):
  the queue's requeue script reads it (cjson) to put a dead worker's claim
  back on its own level;
- `"trace"`: the W3C traceparent of the span that queued it (tracing.py),
  which the worker's batch span links to; one that is not a short string
  is ignored;
- `"version": v`, a request pinned to a version (`Keys.for_version`): a
  worker of another version refuses it;
- `"probabilities": true` (the v2 protocol; `/predict` never asks), with
  `"classes": k`, the most likely k classes' indices and labels to name, and
  `"explain": "gradcam"` (EXPLAIN_METHODS) with `"explain_class": k` (absent:
  the most likely).

A result is JSON too: `{"format", "success": true, "predictions": [...]}` or
`{"format", "success": false, "error": "..."}`, the HTTP response body once
`decode_result` has read its format. A probabilities request's success answer
is a JSON header, a newline, the raw float32 vector: `{"format", "success":
true, "model", "shape": [classes], "dtype": "float32", "classes": [{"index",
"label"}, ...]}\n<bytes>` (`decode_probabilities`), with `"heatmap"` (rows of
importances in [0, 1]) and `"explained": {"index", "label"}` when it asked
for an explanation; a worker whose engine cannot compute it answers an error
with status 400. Errors stay plain JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis.crc import key_slot

# The messages' format: in every request and result header and heartbeat.
# Change it with any change to them that the other side cannot read.
FORMAT = 1

# Only these may cross the wire: a message can never make the worker build an
# object dtype or an array of absurd size.
ALLOWED_DTYPES = frozenset({"uint8", "float32"})
MAX_ELEMENTS = 4096 * 4096 * 4
# Most classes a probabilities answer may list by name.
MAX_CLASSES = 100_000
# A W3C traceparent is 55 characters; a longer "trace" is not one.
MAX_TRACE = 256
# What a worker may be asked to explain itself with (see the docstring).
EXPLAIN_METHODS = ("gradcam",)


def out_of_range(index: int, classes: int) -> str:
    """Why class `index` cannot be explained: both sides say it the same way."""
    return f"class {index} is out of range: the model has {classes} classes (0..{classes - 1})"


def no_live_version(version: str, model: str) -> str:
    """Why a request pinned to `version` is refused (503), by the web tier or a worker."""
    return f"version {version!r} of model {model!r} has no live worker; retry shortly"


class BadMessage(ValueError):
    """A queue entry that is not a well-formed request."""


class UnknownFormat(BadMessage):
    """A message of a format this side does not read; the message names it."""


def format_error(what: str, found: object) -> str:
    return f"{what} in message format {found!r}; this server reads format {FORMAT}"


# The words a queue's own keys add after its name. Another model's queue is
# "<queue-name>:<model>", so a model named after one of them would share keys
# with the default model (a model "workers" would queue into its workers set):
# `for_model` refuses these names for every model but the default (the entry
# point asks it first: cli.read_models). "quota" holds the API keys' quotas
# (`Keys.quota`).
KEY_PARTS = (
    "result", "processing", "worker", "workers", "cache", "level", "wakeup", "job", "jobs",
    "quota", "version", "versions", "traffic", "models", "callbacks",
)  # fmt: skip


# Redis Cluster's slots: a key's slot is CRC16 of its hash tag, mod SLOTS.
SLOTS = 16384


@functools.cache
def partition_tags(queue_name: str, partitions: int) -> tuple[str, ...]:
    """The hash tags of a queue spread over `partitions` (--queue-partitions):
    the plain name alone for one; else, for partition i, "<name>#i.k" with
    the smallest k whose slot lies in the i-th of `partitions` equal ranges
    of the slot space. `redis-cli --cluster create` gives its masters equal
    ranges in that order, so a cluster of as many masters as partitions has
    one partition on each; on other layouts they still spread by slot.
    Every process computes the same tags from the same two settings."""
    if partitions < 1:
        raise ValueError(f"{partitions} queue partitions")
    if partitions == 1:
        return (queue_name,)
    tags = []
    for i in range(partitions):
        low, high = i * SLOTS // partitions, (i + 1) * SLOTS // partitions
        k = 0
        while not low <= key_slot(f"{queue_name}#{i}.{k}".encode()) < high:
            k += 1
        tags.append(f"{queue_name}#{i}.{k}")
    return tuple(tags)


@dataclass(frozen=True)
class Keys:
    """Every Redis key name the service uses is built here and only here.

    Every name starts with one hash tag, `{<tag>}` (`tag`): the model's
    queue name, or a partition's (`partitions`). Redis Cluster puts the keys
    of one tag on one slot, so every script and transaction here, each of
    which touches one tag's keys, runs on one node; on a plain Redis the
    braces are only part of the names."""

    queue_name: str  # the model's queue name (the plain --queue-name: the default model)
    partition: str = ""  # this partition's tag ("": the model's queue_name)
    version: str = ""  # a version's own queue (for_version); "": the model's

    @property
    def tag(self) -> str:
        """The hash tag every name starts with, braces and all."""
        return "{" + (self.partition or self.queue_name) + "}"

    @property
    def _name(self) -> str:
        """What every key of this queue starts with: the tag, then the
        version's part for a version's own queue."""
        return f"{self.tag}:version:{self.version}" if self.version else self.tag

    @classmethod
    def for_model(cls, queue_name: str, model: str, default: str) -> Keys:
        """Each model has its own queue. The default model keeps the plain
        --queue-name, so a one-model deployment's keys never change."""
        if model == default:
            return cls(queue_name)
        if model in KEY_PARTS:
            raise ValueError(
                f"model name {model!r} would collide with the Redis keys every queue uses "
                f"({', '.join(KEY_PARTS)}); choose another name"
            )
        return cls(f"{queue_name}:{model}")

    def partitions(self, count: int) -> list[Keys]:
        """The model's queue on `count` hash tags (partition_tags), each with
        keys of its own: its levels, wake-up list, claims, results,
        heartbeats, jobs and traffic copy, so that each is like a shard."""
        if count == 1:
            return [self]
        return [
            dataclasses.replace(self, partition=tag)
            for tag in partition_tags(self.queue_name, count)
        ]

    @property
    def queue(self) -> str:
        """The level-1 queue: the queue's name itself, no level suffix."""
        return self._name

    def queue_at(self, level: int) -> str:
        """The queue of priority `level` (1 is the highest). Every name of a
        queue's lists is built here, so a finer queue (one per model version:
        `for_version`) has its own levels and wake-up list."""
        if level < 1:
            raise ValueError(f"priority level {level} < 1")
        return self._name if level == 1 else f"{self._name}:level:{level}"

    def for_version(self, version: str) -> Keys:
        """Version `version`'s own queue (its levels and wake-up list), on
        the same tag: only that version's workers claim from it. Results,
        claims, heartbeats and jobs stay under the model's keys."""
        return dataclasses.replace(self, version=version)

    @property
    def worker_versions(self) -> str:
        """Hash: worker id -> the version it serves, so any worker can put a
        dead one's claims back on that version's queue."""
        return f"{self._name}:versions"

    @property
    def known_versions(self) -> str:
        """Set of every version that has had workers: the queues a worker
        sweeps for requests left behind when a version's last worker leaves."""
        return f"{self._name}:versions:known"

    @property
    def models(self) -> str:
        """Hash, under the plain --queue-name only: model name -> JSON
        `{"queue", "version", "at"}`, written by each worker's heartbeat, from
        which web servers learn the models they were not told of
        (serving/models.py, --models-from workers)."""
        return f"{self._name}:models"

    @property
    def traffic(self) -> str:
        """The model's traffic policy (JSON, stamped: broker/traffic.py; absent:
        `latest`), serving/traffic.py."""
        return f"{self._name}:traffic"

    def queues(self, levels: int) -> list[str]:
        """The queues of levels 1 .. `levels`, highest first."""
        return [self.queue_at(level) for level in range(1, levels + 1)]

    @property
    def wakeup(self) -> str:
        """Tokens, one per push (a few at most), that a worker blocks on while
        every level is empty: BLMOVE watches one list, the levels are several."""
        return f"{self._name}:wakeup"

    def result(self, request_id: str) -> str:
        return f"{self._name}:result:{request_id}"

    def processing(self, worker_id: str) -> str:
        """The requests a worker has claimed and not yet answered."""
        return f"{self._name}:processing:{worker_id}"

    def heartbeat(self, worker_id: str) -> str:
        """Exists (with a TTL) while the worker is alive; holds its WorkerInfo."""
        return f"{self._name}:worker:{worker_id}"

    @property
    def workers(self) -> str:
        """Set of worker ids that may hold claims, live or dead."""
        return f"{self._name}:workers"

    def cached(self, model: str, version: str, form: str, digest: str) -> str:
        """A cached answer (serving/cache.py): the answer `version` of
        `model` gave, in `form` (top-k, or probabilities and how many
        classes), to the upload whose hash is `digest`. The model is named
        even though the queue name may say it: the default model's keys
        carry no model name, and the default can change."""
        return f"{self._name}:cache:{model}:{version}:{form}:{digest}"

    def quota(self, key_name: str) -> str:
        """An API key's quota state (broker/quotas.py), by the key's name from
        the keys file, never by the key itself. Under the default model's
        queue name, on the first shard: one per deployment."""
        return f"{self._name}:quota:{key_name}"

    # -- asynchronous jobs (broker/jobs.py) --------------------------------

    @property
    def jobs(self) -> str:
        """Set of the ids of jobs with items not yet moved onto the queue."""
        return f"{self._name}:jobs"

    def job(self, job_id: str) -> str:
        """Hash: the job's record (state, owner, counts, times, callback)."""
        return f"{self._name}:job:{job_id}"

    def job_items(self, job_id: str) -> str:
        """List: the job's encoded requests not yet on the queue, in order."""
        return f"{self.job(job_id)}:items"

    def job_names(self, job_id: str) -> str:
        """List: every item's file name, in submission order."""
        return f"{self.job(job_id)}:names"

    def job_results(self, job_id: str) -> str:
        """Hash: item index -> its result (the /predict body)."""
        return f"{self.job(job_id)}:results"

    @property
    def callbacks(self) -> str:
        """Sorted set: the ids of done jobs whose callback is not yet
        delivered, each scored by when it is due (Unix seconds; a claimed
        one: when its lease ends). Added by the transaction that completes
        the job (broker/jobs.py), claimed and cleared by
        broker/pending_callbacks.py."""
        return f"{self._name}:callbacks"

    @property
    def callback_tries(self) -> str:
        """Hash: job id -> how many times its callback was claimed (tried)."""
        return f"{self._name}:callbacks:tries"

    def job_keys(self, job_id: str) -> list[str]:
        return [
            self.job(job_id),
            self.job_items(job_id),
            self.job_names(job_id),
            self.job_results(job_id),
        ]


# A job's item is a request whose id names the job and the item's place in it:
# the worker answers it into the job's record instead of a result key.
JOB_ITEM_PREFIX = "job."


def job_item_id(job_id: str, index: int) -> str:
    return f"{JOB_ITEM_PREFIX}{job_id}.{index}"


def job_item(request_id: str) -> tuple[str, int] | None:
    """(job id, index) of a job item's request id; None for any other request."""
    if not request_id.startswith(JOB_ITEM_PREFIX):
        return None
    job_id, _, index = request_id[len(JOB_ITEM_PREFIX) :].rpartition(".")
    if not job_id or not index.isdigit():
        return None
    return job_id, int(index)


@dataclass(frozen=True)
class ImageRequest:
    id: str
    image: np.ndarray
    deadline: float
    probabilities: bool = False  # answer with the whole vector (v2 protocol)
    classes: int = 0  # with it, the indices and labels of the k most likely
    priority: int = 1  # the queue level it waits at (1 is the highest)
    trace: str = ""  # the W3C traceparent of the span that queued it (tracing.py)
    # The version the client pinned ("": any); a worker of another version
    # that meets it (swept off a version with no worker left) refuses it.
    version: str = ""
    explain: str = ""  # "" or one of EXPLAIN_METHODS (with probabilities)
    explain_class: int = -1  # the class to explain; -1: the most likely

    @classmethod
    def create(cls, image: np.ndarray, timeout: float, **options: Any) -> ImageRequest:
        """A new request, due in `timeout` seconds; `options`: the fields after `deadline`."""
        # 128 random bits, as uuid4 has, at a fifth of its cost (issue 23).
        return cls(os.urandom(16).hex(), image, time.time() + timeout, **options)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) > self.deadline


def encode_request(request: ImageRequest) -> bytes:
    array = np.ascontiguousarray(request.image)
    if array.dtype.name not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {array.dtype} cannot be sent")
    message: dict[str, Any] = {
        "format": FORMAT,
        "id": request.id,
        "shape": list(array.shape),
        "dtype": array.dtype.name,
        "deadline": request.deadline,
    }
    # Only when asked for: a plain request's header stays short.
    if request.probabilities:
        message["probabilities"] = True
        if request.classes:
            message["classes"] = request.classes
        if request.explain:
            message["explain"] = request.explain
            if request.explain_class >= 0:
                message["explain_class"] = request.explain_class
    if request.priority != 1:
        message["priority"] = request.priority
    if request.trace:
        message["trace"] = request.trace
    if request.version:
        message["version"] = request.version
    return json.dumps(message).encode() + b"\n" + array.tobytes()


def _parse(raw: bytes | str) -> tuple[Any, bytes | None]:
    """(the JSON header, the bytes that follow it raw; None for JSON alone)."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    header, newline, data = raw.partition(b"\n")
    return json.loads(header), data if newline else None


def _request_header(raw: bytes | str) -> tuple[dict[str, Any], bytes]:
    """(a request's header, its image bytes); BadMessage, or UnknownFormat."""
    try:
        message, data = _parse(raw)
    except (ValueError, RecursionError) as exc:
        raise BadMessage(f"malformed request: {exc!r}") from None
    if not isinstance(message, dict):
        raise BadMessage(f"malformed request: a {type(message).__name__}, not a JSON object")
    if message.get("format") != FORMAT:
        raise UnknownFormat(format_error("a request", message.get("format")))
    if data is None:
        raise BadMessage("malformed request: no image bytes after its header")
    return message, data


def decode_request(raw: bytes | str) -> ImageRequest:
    """Parse one queue entry; BadMessage (only) says what is wrong with it,
    UnknownFormat (a BadMessage) when it is of another format."""
    message, data = _request_header(raw)
    try:
        request_id = message["id"]
        if not isinstance(request_id, str):
            raise TypeError(f"the id {request_id!r} is not a string")
        shape = tuple(_whole(n) for n in message["shape"])
        dtype = message["dtype"]
        if not isinstance(dtype, str):
            raise TypeError(f"the dtype {dtype!r} is not a string")
        deadline = float(message["deadline"])
        probabilities = message.get("probabilities") is True
        classes = _whole(message.get("classes", 0))
        priority = _whole(message.get("priority", 1))
        trace = message.get("trace", "")
        version = message.get("version", "")
        if not isinstance(version, str):
            raise TypeError(f"the version {version!r} is not a string")
        explain = message.get("explain", "")
        explain_class = _whole(message.get("explain_class", -1))
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        # OverflowError: float() of a huge integer.
        raise BadMessage(f"malformed request: {exc!r}") from None
    if dtype not in ALLOWED_DTYPES:
        raise BadMessage(f"request {request_id}: dtype {dtype!r} not allowed")
    # Python's integers: np.prod would wrap past 2**64 (to 0, fitting no data).
    count = math.prod(shape)
    if any(n <= 0 for n in shape) or count > MAX_ELEMENTS:
        raise BadMessage(f"request {request_id}: bad shape {shape}")
    if len(data) != count * np.dtype(dtype).itemsize:
        raise BadMessage(f"request {request_id}: {len(data)} bytes do not fit {shape} {dtype}")
    if not math.isfinite(deadline):
        raise BadMessage(f"request {request_id}: deadline {deadline} is not a time")
    if not 0 <= classes <= MAX_CLASSES:
        raise BadMessage(f"request {request_id}: classes {classes} out of range")
    if priority < 1:
        raise BadMessage(f"request {request_id}: priority {priority} out of range")
    if explain and (explain not in EXPLAIN_METHODS or not probabilities):
        raise BadMessage(
            f"request {request_id}: explain {explain!r} is not one of "
            f"{', '.join(EXPLAIN_METHODS)} on a probabilities request"
        )
    if not -1 <= explain_class <= MAX_CLASSES:
        raise BadMessage(f"request {request_id}: explain_class {explain_class} out of range")
    image = np.frombuffer(data, dtype=dtype).reshape(shape)
    return ImageRequest(
        id=request_id,
        image=image,
        deadline=deadline,
        probabilities=probabilities,
        classes=classes,
        priority=priority,
        # Only a link to a trace rides on it: a bad one loses that, not the request.
        trace=trace if isinstance(trace, str) and len(trace) <= MAX_TRACE else "",
        version=version,
        explain=explain,
        explain_class=explain_class,
    )


def _whole(value: object) -> int:
    """A JSON whole number; ValueError for anything else (a float, a bool,
    a string of digits: the encoder writes none of these)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{value!r} is not a whole number")
    return value


def priority_of(raw: bytes) -> int:
    """The level a queue entry was pushed at: 1 when its header names none
    (a level-1 request) or cannot be read (the worker answers it as malformed)."""
    header = raw.partition(b"\n")[0] if raw[:1] == b"{" else b""
    if b'"priority"' not in header:
        return 1
    try:
        value = json.loads(header).get("priority", 1)
    except (ValueError, AttributeError, RecursionError):
        return 1
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1


def request_id_of(raw: bytes | str) -> str | None:
    """Best-effort id of a queue entry that failed to decode, to answer it."""
    try:
        value = _parse(raw)[0].get("id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


def trace_of(raw: bytes | str) -> str:
    """A queue entry's traceparent ("" when it has none, or is malformed),
    read from its header alone, before the batch is decoded."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    end = raw.find(b"\n")  # the header only: no copy of the image
    try:
        value = json.loads(raw if end < 0 else raw[:end]).get("trace", "")
    except (ValueError, AttributeError, RecursionError):
        return ""
    return value if isinstance(value, str) and len(value) <= MAX_TRACE else ""


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker's heartbeat says about it (JSON in its heartbeat key)."""

    description: str  # what the worker loaded, e.g. "ResNet50, ImageNet weights"
    batch_size: int
    host: str
    pid: int
    at: float  # Unix time of this beat
    name: str = ""  # the model's name in the deployment
    input_size: tuple[int, int] | None = None  # (width, height) the web tier resizes to
    labels: int = 0  # how many classes
    version: str = ""  # the model's version (ModelSpec.version)
    engine: str = ""  # what runs it: keras, onnx, openvino, sim
    precision: str = ""  # fp32, bf16, int8
    # Measured against Keras fp32 at start-up (predictor.Fidelity.as_dict);
    # None for Keras itself.
    fidelity: dict[str, float] | None = None
    # Claims from its version's own queue (Keys.for_version), not only the
    # model's (a worker whose queue names no version claims the model's alone).
    versioned: bool = False

    def encode(self) -> bytes:
        return json.dumps({"format": FORMAT, **self.__dict__}).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> WorkerInfo:
        """BadMessage for a malformed heartbeat, UnknownFormat for one of
        another format. Fields this version does not know are ignored: a
        field added within a format is for whoever reads it."""
        try:
            fields = json.loads(raw)
        except ValueError as exc:
            raise BadMessage(f"malformed heartbeat: {exc!r}") from None
        if isinstance(fields, dict) and fields.get("format") != FORMAT:
            raise UnknownFormat(format_error("a heartbeat", fields.get("format")))
        try:
            known = {f.name for f in dataclasses.fields(cls)}
            fields = {k: v for k, v in fields.items() if k in known}
            if fields.get("input_size") is not None:
                fields["input_size"] = tuple(int(n) for n in fields["input_size"])
            return cls(**fields)
        except (ValueError, TypeError, AttributeError) as exc:
            raise BadMessage(f"malformed heartbeat: {exc!r}") from None


def success_result(predictions: list[dict[str, Any]], model: str = "", version: str = "") -> bytes:
    """The answer, naming the model and version that made it when known."""
    body: dict[str, Any] = {"format": FORMAT, "success": True, "predictions": predictions}
    if model:
        body["model"] = {"name": model, "version": version}
    return json.dumps(body).encode()


def probabilities_result(
    probabilities: np.ndarray,
    classes: list[dict[str, Any]],
    model: str = "",
    version: str = "",
    *,
    heatmap: np.ndarray | None = None,
    explained: dict[str, Any] | None = None,
) -> bytes:
    """The answer to a request that asked for the whole vector (float32,
    raw); with the heat map that explains the class `explained`, when asked."""
    vector = np.ascontiguousarray(probabilities, dtype=np.float32)
    header: dict[str, Any] = {
        "format": FORMAT,
        "success": True,
        "shape": list(vector.shape),
        "dtype": "float32",
        "classes": classes,
    }
    if model:
        header["model"] = {"name": model, "version": version}
    if heatmap is not None:
        header["heatmap"] = np.round(np.asarray(heatmap, dtype=np.float64), 5).tolist()
        header["explained"] = explained or {}
    return json.dumps(header).encode() + b"\n" + vector.tobytes()


def decode_probabilities(raw: bytes | str) -> tuple[dict[str, Any], np.ndarray | None]:
    """(the JSON header, the float32 vector) of an answer to a probabilities
    request; the vector is None for an error (an answer of another format is
    one, naming it)."""
    try:
        header, data = _parse(raw)
    except ValueError as exc:
        raise BadMessage(f"malformed result: {exc!r}") from None
    if not isinstance(header, dict) or "success" not in header:
        raise BadMessage("malformed result")
    header = _read_format(header)
    if data is None or not header["success"]:
        return header, None
    try:
        shape = tuple(int(n) for n in header["shape"])
        if header["dtype"] != "float32" or len(shape) != 1:
            raise ValueError(f"{header['dtype']} {shape}")
        return header, np.frombuffer(data, dtype=np.float32).reshape(shape)
    except (ValueError, KeyError, TypeError) as exc:
        raise BadMessage(f"malformed probabilities: {exc!r}") from None


def error_result(message: str, status: int | None = None) -> bytes:
    """A failed answer; `status`, when given, is the HTTP-like status the web
    tier answers it with (a version with no live worker: 503), else 500."""
    body: dict[str, Any] = {"format": FORMAT, "success": False, "error": message}
    if status is not None:
        body["status"] = status
    return json.dumps(body).encode()


def decode_result(raw: bytes | str) -> dict[str, Any]:
    """The body of a top-k answer, the HTTP response's (an answer of another
    format is a failure naming it)."""
    result = json.loads(raw)
    if not isinstance(result, dict) or "success" not in result:
        raise BadMessage("malformed result")
    return _read_format(result)


def _read_format(header: dict[str, Any]) -> dict[str, Any]:
    """An answer's header without its format; for one of another format, a
    failure that names it."""
    found = header.pop("format", None)
    if found != FORMAT:
        return {"success": False, "error": format_error("a worker answered", found)}
    return header
