"""Property-based fuzzing (Hypothesis) of every parser of outside input: only
the parser's own error type ever comes out, and what parses round-trips
where there is an encoder.

The parsers: the multipart reader (web/uploads.py), the v2 JSON and binary
request (web/v2.py parse_request), the queue message decoder
(broker/messages.py), the models file (catalog.py), the API keys file
(web/auth.py), a job's archive (web/archives.py) and every settings value
(settings.py). The server-level fuzz,
against a real process, is test_fuzz_server.py.

Runs are deterministic (derandomize, no example database in the
repository); how many examples each test takes is the Hypothesis profile's
(conftest.py: `ci` in `make test`, `deep` in `make fuzz`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from keras_server.broker import messages
from keras_server.catalog import CatalogError, load_models_file
from keras_server.settings import KNOBS, Settings, SettingsError, load_settings
from keras_server.web import archives, uploads, v2
from keras_server.web.auth import KeysFileError, load_keys
from keras_server.web.dispatch import Decoder
from keras_server.web.errors import HttpError
from keras_server.web.inference import PIXEL_TYPES, bytes_elements

# The archive tests build a zip per example: half the profile's examples
# (conftest's `ci`, or `deep` under `make fuzz`).
HALF = settings(max_examples=max(10, settings.default.max_examples // 2))

# Any JSON value, nested a little.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
# Numbers where the parsers compare and multiply: edges, huge, negative, bools.
numbers = st.one_of(
    st.sampled_from([0, 1, 2, 3, -1, 2**31, 2**32, 2**63, 2**64, 10**400, True, False]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)
shapes = st.lists(numbers | json_values, max_size=5) | st.sampled_from(
    [[2**32, 2**32, 1], [2**64], [2**63, 2], [-1, -1], [0], [10**400], [1, 2, 3, 3], [True]]
)


def deep(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


# What a hostile client puts in a field: any JSON, edge numbers, deep nesting.
hostile = json_values | numbers | shapes | st.integers(0, 100_000).map(lambda d: deep(0, d))


def mutate(data: bytes, draw: st.DrawFn) -> bytes:
    """`data` with a few bytes flipped, cut, inserted or duplicated."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        match draw(st.sampled_from(["flip", "cut", "insert", "truncate", "repeat"])):
            case "flip":
                data[at] ^= 1 << draw(st.integers(0, 7))
            case "cut":
                del data[at : at + draw(st.integers(1, 16))]
            case "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            case "truncate":
                del data[at:]
            case "repeat":
                data[at:at] = data[at : at + draw(st.integers(1, 64))]
    return bytes(data)


# -- the multipart reader ------------------------------------------------------

BOUNDARY = "fuzzboundary"


def multipart_body(files: list[tuple[str, str, bytes]]) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"'
        f"\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, filename, data in files
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


safe_text = st.text(
    st.characters(codec="ascii", exclude_characters='"\\\r\n', exclude_categories=["Cc"]),
    min_size=1,
    max_size=12,
)
upload_files = st.lists(st.tuples(safe_text, safe_text, st.binary(max_size=64)), max_size=4)


@given(upload_files)
def test_multipart_round_trips(files: list[tuple[str, str, bytes]]) -> None:
    parsed = uploads.read_files(multipart_body(files), f"multipart/form-data; boundary={BOUNDARY}")
    expected: dict[str, list[uploads.Upload]] = {}
    for name, filename, data in files:
        expected.setdefault(name, []).append(uploads.Upload(filename, data))
    assert parsed == expected


# WSGI hands headers over as latin-1 text: no other character reaches the reader.
header_text = st.text(st.characters(codec="latin-1"), max_size=60)


@given(st.data(), upload_files, header_text)
def test_multipart_reader_never_raises(
    data: st.DataObject, files: list[tuple[str, str, bytes]], content_type: str
) -> None:
    body = mutate(multipart_body(files), data.draw)
    for kind in (f"multipart/form-data; boundary={BOUNDARY}", content_type):
        parsed = uploads.read_files(body, kind)
        assert parsed is None or isinstance(parsed, dict)


# -- v2 requests -----------------------------------------------------------------

SIZE = (3, 2)  # the model's input (width, height): small, so valid pixels are cheap
V2_SETTINGS = Settings(max_images=4)
DECODER = Decoder(V2_SETTINGS)

datatypes = st.sampled_from(["BYTES", "UINT8", "FP32", "INT64", "FP16", "bytes", ""]) | json_values
parameters = st.dictionaries(
    st.sampled_from(["binary_data_size", "binary_data", "classification", "shared_memory_region"])
    | st.text(max_size=6),
    numbers | json_values,
    max_size=3,
)


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, Any]:
    tensor: dict[str, Any] = {}
    for key, value in [
        ("name", st.sampled_from(["image", "pixels", "probabilities"]) | json_values),
        ("datatype", datatypes),
        ("shape", shapes),
        ("data", json_values | st.lists(numbers, max_size=40)),
        ("parameters", parameters | json_values),
    ]:
        if draw(st.booleans()):
            tensor[key] = draw(value)
    return tensor


@st.composite
def v2_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A valid pixels request (JSON or binary data), then a field or two of it
    (or of its input, or of its output) replaced by something hostile, or
    random tensors, then maybe a few bytes mutated."""
    n = draw(st.integers(1, V2_SETTINGS.max_images))
    dtype = draw(st.sampled_from(["UINT8", "FP32"]))
    shape = [n, SIZE[1], SIZE[0], 3]
    tensor: dict[str, Any] = {"name": "pixels", "datatype": dtype, "shape": shape}
    binary = b""
    if draw(st.booleans()):
        binary = bytes(math.prod(shape) * PIXEL_TYPES[dtype].itemsize)
        tensor["parameters"] = {"binary_data_size": len(binary)}
    else:
        tensor["data"] = [0] * math.prod(shape)
    output: dict[str, Any] = {"name": "probabilities", "parameters": {"classification": 2}}
    message: dict[str, Any] = {"id": "x", "inputs": [tensor], "outputs": [output]}
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.sampled_from([message, tensor, output]))
        key = draw(st.sampled_from([*where, "parameters", "id", "inputs", "outputs"]))
        where[key] = draw(hostile | parameters | st.lists(tensors(), max_size=2))
    try:
        header = json.dumps(message).encode()
    except RecursionError:  # too deep for json.dumps itself: write it out
        header = b'{"inputs": [' + b"[" * 100_000
    headers: dict[str, str] = {}
    length = draw(st.sampled_from(["exact", "none", "any"]))
    if length == "exact":
        headers[v2.HEADER_LENGTH] = str(len(header))
    elif length == "any":
        headers[v2.HEADER_LENGTH] = draw(st.text(max_size=8) | numbers.map(str))
    body = header + (binary if length != "none" else b"")
    if draw(st.integers(0, 3)) == 0:
        body = mutate(body, draw)
    return body, headers


@given(v2_requests())
def test_v2_parser_raises_only_http_error(request: tuple[bytes, dict[str, str]]) -> None:
    body, headers = request
    status = 400
    try:
        v2.parse_request(body, headers, SIZE, V2_SETTINGS, DECODER)
    except HttpError as exc:
        status = exc.status
    assert 400 <= status < 500 or status == 503
    assert DECODER.budget.used == 0, "the JSON's reservation is given back"


@st.composite
def bytes_tensors(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """The binary BYTES form, with lengths that may lie."""
    elements = draw(st.lists(st.binary(max_size=16), min_size=1, max_size=4))
    data = b"".join(
        struct.pack("<I", draw(st.sampled_from([len(e), len(e) + 1, 2**32 - 1, 0]))) + e
        for e in elements
    )
    size = draw(st.sampled_from([len(data), len(data) + 3, 0]) | numbers)
    tensor = {"name": "image", "datatype": "BYTES", "shape": [len(elements)]}
    tensor["parameters"] = {"binary_data_size": size}
    header = json.dumps({"inputs": [tensor]}).encode()
    return header + data, {v2.HEADER_LENGTH: str(len(header))}


@given(bytes_tensors())
def test_v2_binary_lengths_raise_only_http_error(request: tuple[bytes, dict[str, str]]) -> None:
    status = 400
    try:
        v2.parse_request(*request, SIZE, V2_SETTINGS, DECODER)
    except HttpError as exc:
        status = exc.status
    assert status == 400


pixel_batches = st.integers(1, V2_SETTINGS.max_images).flatmap(
    lambda n: st.lists(
        st.integers(0, 255), min_size=n * SIZE[0] * SIZE[1] * 3, max_size=n * SIZE[0] * SIZE[1] * 3
    ).map(lambda values: np.array(values, np.uint8).reshape(n, SIZE[1], SIZE[0], 3))
)


@given(pixel_batches, st.sampled_from(["UINT8", "FP32"]), st.booleans(), st.booleans())
def test_v2_pixels_round_trip(batch: np.ndarray, datatype: str, binary: bool, nested: bool) -> None:
    tensor: dict[str, Any] = {"name": "pixels", "datatype": datatype, "shape": list(batch.shape)}
    dtype = PIXEL_TYPES[datatype]
    raw = b""
    if binary:
        raw = batch.astype(dtype).tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
    else:
        values = batch.astype(dtype)
        tensor["data"] = values.tolist() if nested else values.ravel().tolist()
    header = json.dumps({"inputs": [tensor], "outputs": [{"name": "probabilities"}]}).encode()
    inference = v2.parse_request(
        header + raw, {v2.HEADER_LENGTH: str(len(header))}, SIZE, V2_SETTINGS, DECODER
    )
    assert len(inference.images) == len(batch)
    for image, expected in zip(inference.images, batch, strict=True):
        assert image.dtype == dtype
        np.testing.assert_array_equal(image, expected)


@given(st.lists(st.binary(max_size=12), min_size=1, max_size=4))
def test_v2_bytes_elements_round_trip(elements: list[bytes]) -> None:
    data = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    assert bytes_elements(data) == elements
    tensor = {"data": [base64.b64encode(e).decode() for e in elements]}
    assert v2._base64_elements(tensor) == elements


# -- queue messages ----------------------------------------------------------------

images = st.tuples(st.integers(1, 4), st.integers(1, 4), st.sampled_from([1, 3])).flatmap(
    lambda shape: st.sampled_from([np.uint8, np.float32]).map(
        lambda dtype: np.arange(math.prod(shape), dtype=dtype).reshape(shape)
    )
)


@given(
    images,
    st.floats(0, 1e6),
    st.booleans(),
    st.integers(0, messages.MAX_CLASSES),
    st.text(max_size=messages.MAX_TRACE),
)
def test_queue_messages_round_trip(
    image: np.ndarray, timeout: float, probabilities: bool, classes: int, trace: str
) -> None:
    request = messages.ImageRequest.create(
        image, timeout, probabilities=probabilities, classes=classes if probabilities else 0
    )
    request = dataclasses.replace(request, trace=trace)
    raw = messages.encode_request(request)
    decoded = messages.decode_request(raw)
    assert (decoded.id, decoded.deadline, decoded.probabilities, decoded.classes) == (
        request.id, request.deadline, request.probabilities, request.classes,
    )  # fmt: skip
    assert decoded.trace == messages.trace_of(raw) == trace
    assert decoded.image.dtype == image.dtype
    np.testing.assert_array_equal(decoded.image, image)


@st.composite
def queue_entries(draw: st.DrawFn) -> bytes:
    """A valid entry (either form), a field or two replaced by something
    hostile, its data maybe cut or emptied, then maybe bytes mutated."""
    image = draw(images)
    # Not ImageRequest.create: a fixed id and deadline keep the draws repeatable.
    request = messages.ImageRequest(
        "a-request", image, 2e9, probabilities=True, classes=5, trace=f"00-{'1' * 32}-{'2' * 16}-01"
    )
    raw = messages.encode_request(request)
    text, _, data = raw.partition(b"\n")
    header = json.loads(text)
    if draw(st.booleans()):  # the older all-JSON form
        header["image"] = base64.b64encode(data).decode()
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from([*header, "classes", "image", "trace"]))
        header[key] = draw(
            hostile | st.sampled_from(["uint8", "float32", "object", "<U1"]) | st.text(max_size=8)
        )
    data = draw(st.sampled_from([data, b"", data[: len(data) // 2], data + b"x"]))
    try:
        text = json.dumps(header).encode()
    except RecursionError:
        text = b'{"id": "x", "shape": ' + b"[" * 100_000
    raw = text if "image" in header else text + b"\n" + data
    return mutate(raw, draw) if draw(st.integers(0, 3)) == 0 else raw


@given(queue_entries() | st.binary(max_size=64))
def test_queue_decoder_raises_only_bad_message(raw: bytes) -> None:
    trace = messages.trace_of(raw)  # never raises: a bad one is ""
    assert isinstance(trace, str) and len(trace) <= messages.MAX_TRACE
    try:
        request = messages.decode_request(raw)
    except messages.BadMessage:
        assert messages.request_id_of(raw) is None or isinstance(messages.request_id_of(raw), str)
        return
    assert request.image.size * request.image.itemsize <= len(raw)
    assert math.isfinite(request.deadline)
    assert request.trace == trace


# -- the models file and the API keys file --------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string (mostly)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


toml_scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.sampled_from(["sim", "resnet50", "imagenet", "none", "scale", "openvino", "int8", ""])
    | st.text(max_size=12)
)
toml_values = toml_scalars | st.lists(toml_scalars, max_size=2)
model_names = st.sampled_from(["a", "b", "resnet50", "workers", "x-y"])
# Mostly well-formed tables (model = "sim"), so the checks past the first run.
paths = st.sampled_from(["sim", "x.keras", "/abs/x", "../up", "", "x\x00y", "imagenet"])
PATH_KEYS = ["weights", "labels", "calibration_dir"]
OTHER_KEYS = ["preprocessing", "top_k", "version", "engine", "precision", "other"]
model_tables = st.fixed_dictionaries(
    {"model": st.just("sim") | paths | toml_values},
    optional=dict.fromkeys(PATH_KEYS + OTHER_KEYS, paths | toml_values),
)


@st.composite
def models_files(draw: st.DrawFn) -> str:
    lines = []
    if draw(st.booleans()):
        lines.append(f"default = {toml_value(draw(model_names | toml_values))}")
    for name in draw(st.lists(model_names, min_size=1, max_size=3, unique=True)):
        lines.append(f"[models.{json.dumps(name)}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in draw(model_tables).items()]
    text = "\n".join(lines) + "\n"
    if draw(st.integers(0, 3)) == 0:
        return mutate(text.encode(), draw).decode("utf-8", "replace")
    return text


@given(models_files())
def test_models_file_raises_only_catalog_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "models.toml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        try:
            models = load_models_file(path)
        except CatalogError:
            return
    assert models.default in {spec.name for spec in models.specs}


keys = st.text(st.sampled_from("abcXYZ0129._~+/-"), min_size=16, max_size=40)


# Unique: a key given twice is refused (which line's name and quota would count?).
@given(st.lists(keys, min_size=1, max_size=4, unique=True), st.binary(max_size=80), st.booleans())
def test_keys_file_round_trips_and_raises_only_keys_file_error(
    good: list[str], junk: bytes, spoil: bool
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "keys"
        text = "# keys\n" + "\n\n".join(f"  {key}  " for key in good) + "\n"
        path.write_bytes(text.encode() + (junk if spoil else b""))
        try:
            loaded = load_keys(str(path))
        except KeysFileError:
            assert spoil, "a file of good keys is read"
            return
    assert len(loaded) >= len(good) and all(loaded.accepts(key) for key in good)


# -- settings ----------------------------------------------------------------------

setting_values = (
    st.text(max_size=20)
    | numbers.map(str)
    | st.sampled_from(
        [
            "0",
            "-1",
            "1e999",
            "nan",
            "inf",
            "true",
            "off",
            "redis://x:1/0,redis://y:2",
            "  ",
            ",",
            "",
        ]
    )
)


@given(st.sampled_from(KNOBS), setting_values, st.booleans())
def test_every_setting_raises_only_settings_error(knob: Any, value: str, as_flag: bool) -> None:
    argv, environ = ([f"{knob.flag}={value}"], {}) if as_flag else ([], {knob.env: value})
    if "\0" in value and not as_flag:
        return  # no environment variable can hold a NUL
    message = knob.flag
    try:
        load_settings(argv, environ)
    except SettingsError as exc:
        message = str(exc)
    except SystemExit:
        pytest.fail(f"argparse refused {argv}")
    assert knob.flag in message or knob.env in message, "the error names where the value came from"


# -- a job's archive (web/archives.py) ------------------------------------------

UNSAFE_NAMES = ["../a.png", "/abs.png", "a/../../b.png", "C:\\x.png", "\\\\host\\x"]
entry_names = st.one_of(
    st.text(min_size=1, max_size=12),
    st.sampled_from(["a.png", "x.zip", ".hidden", "__MACOSX/._a", "d/", *UNSAFE_NAMES]),
)


def _zip_of(entries: list[tuple[str, bytes]]) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


@HALF
@given(st.binary(max_size=2048))
def test_archive_bytes_raise_only_archive_refused(data: bytes) -> None:
    status = 0
    try:
        list(archives.files(data, 10, 1 << 20))
    except archives.ArchiveRefused as exc:
        status = exc.status
    assert status in (0, 400, 413)


@HALF
@pytest.mark.filterwarnings("ignore:Duplicate name")
@given(st.lists(st.tuples(entry_names, st.binary(max_size=64)), max_size=6), st.data())
def test_archives_never_yield_an_unsafe_path(
    entries: list[tuple[str, bytes]], data: st.DataObject
) -> None:
    """Whatever an archive holds (here a zip, mangled or not), what comes
    out is a relative path with no `..`, or a refusal."""
    try:
        raw = bytearray(_zip_of(entries))
    except (ValueError, IndexError, OSError):
        assume(False)  # names zipfile itself cannot write

    if raw and data.draw(st.booleans()):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    try:
        found = list(archives.files(bytes(raw), 4, 4096))
    except archives.ArchiveRefused:
        return
    for name, _ in found:
        assert not name.startswith(("/", "\\"))
        assert ".." not in name.replace("\\", "/").split("/")
