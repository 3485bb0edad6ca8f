"""Property-based fuzzing (Hypothesis) of every parser of outside input: only
the parser's own error type ever comes out, and what parses round-trips
where there is an encoder.

The parsers: the multipart reader (web/uploads.py), the v2 JSON and binary
request (web/v2.py parse_request), the queue message decoder
(broker/messages.py), the models file (catalog.py), the API keys file
(web/auth.py), a job's streamed body (web/uploads.py read_job_body) and its
archive (web/archives.py: arbitrary bytes, plain or compressed, and
well-formed zips and tars of hostile shapes), and every settings value
(settings.py). The server-level fuzz,
against a real process, is test_fuzz_server.py.

Runs are deterministic (derandomize, no example database in the
repository); how many examples each test takes is the Hypothesis profile's
(conftest.py: `ci` in `make test`, `deep` in `make fuzz`).
"""

from __future__ import annotations

import base64
import bz2
import dataclasses
import gzip
import io
import json
import lzma
import math
import stat
import struct
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_server.broker import messages
from keras_server.catalog import CatalogError, load_models_file
from keras_server.serving.failures import Failure
from keras_server.serving.inference import PIXEL_TYPES, bytes_elements
from keras_server.serving.keys import KeysFileError, load_keys
from keras_server.serving.pipeline import Decoder
from keras_server.settings import KNOBS, Settings, SettingsError, load_settings
from keras_server.web import archives, uploads, v2

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
    except Failure as exc:
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
    except Failure as exc:
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
        assert image.pixels is not None
        assert image.pixels.dtype == dtype
        np.testing.assert_array_equal(image.pixels, expected)


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
    """A valid entry, a field or two replaced by something hostile, its data
    maybe cut or emptied, then maybe bytes mutated."""
    image = draw(images)
    # Not ImageRequest.create: a fixed id and deadline keep the draws repeatable.
    request = messages.ImageRequest(
        "a-request", image, 2e9, probabilities=True, classes=5, trace=f"00-{'1' * 32}-{'2' * 16}-01"
    )
    raw = messages.encode_request(request)
    text, _, data = raw.partition(b"\n")
    header = json.loads(text)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from([*header, "classes", "trace"]))
        header[key] = draw(
            hostile | st.sampled_from(["uint8", "float32", "object", "<U1"]) | st.text(max_size=8)
        )
    data = draw(st.sampled_from([data, b"", data[: len(data) // 2], data + b"x"]))
    try:
        text = json.dumps(header).encode()
    except RecursionError:
        text = b'{"id": "x", "shape": ' + b"[" * 100_000
    raw = text + b"\n" + data
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
    st.sampled_from(["a.png", "x.zip", ".hidden", "__MACOSX/._a", "d/", "d/e/f.png",
                     "a" * 120 + "/long.png", *UNSAFE_NAMES]),
)  # fmt: skip
# An entry's contents: a few bytes, or zeros that inflate past the limits below.
contents = st.binary(max_size=64) | st.integers(0, 6).map(lambda k: bytes(k * 20_000))
ARCHIVE_LIMITS = (4, 64_000, 30_000)  # files, bytes inflated in all, bytes per file
ZIP_MODES = [0, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFIFO]
COMPRESSIONS = {"tar": "", "tar.gz": "gz", "tar.bz2": "bz2", "tar.xz": "xz"}


def _read_archive(data: bytes) -> list[tuple[str, bytes]] | int:
    """What the reader makes of `data`, spooled as a job's upload is: the
    files (checked against ARCHIVE_LIMITS), or the refusal's status."""
    max_files, max_bytes, max_file = ARCHIVE_LIMITS
    with tempfile.SpooledTemporaryFile(1024) as spool:
        spool.write(data)
        try:
            found = list(archives.files(spool, max_files, max_bytes, max_file))
        except archives.ArchiveRefused as exc:
            refusal = exc
        else:
            refusal = None
    if refusal is not None:
        assert refusal.status in (400, 413), refusal.message
        return refusal.status
    assert len(found) <= max_files
    assert sum(len(c) for _, c in found) <= max_bytes
    for name, data_ in found:
        assert len(data_) <= max_file
        assert not name.startswith(("/", "\\"))
        assert ".." not in name.replace("\\", "/").split("/")
        assert not archives._skipped(name)
    return found


@st.composite
def zips(draw: st.DrawFn) -> bytes:
    """A well-formed zip of hostile shapes: any names, zeros that inflate,
    symlinks and devices, many entries, any compression."""
    import zipfile

    methods = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
    compression = draw(st.sampled_from(methods))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in draw(st.lists(st.tuples(entry_names, contents), max_size=6)):
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            mode = draw(st.sampled_from(ZIP_MODES))
            info.external_attr = (mode | 0o644) << 16
            archive.writestr(info, data)
        for index in range(draw(st.sampled_from([0, 0, 100]))):  # many entries
            archive.writestr(f".many/{index}", b"")
    return buffer.getvalue()


@st.composite
def tars(draw: st.DrawFn) -> bytes:
    """A well-formed tar, plain or compressed, of hostile shapes: any names
    (long ones as pax or GNU headers), zeros that inflate, links, devices,
    folders, many members, and a header declaring a huge size."""
    kinds = [tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
             tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]  # fmt: skip
    raw = io.BytesIO()
    tar_format = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
    with tarfile.open(fileobj=raw, mode="w", format=tar_format) as archive:
        for name, data in draw(st.lists(st.tuples(entry_names, contents), max_size=6)):
            info = tarfile.TarInfo(name)
            info.type = draw(st.sampled_from(kinds))
            if info.isreg():
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                info.linkname = "/etc/passwd"
                archive.addfile(info)
        for index in range(draw(st.sampled_from([0, 0, 100]))):  # many members
            archive.addfile(tarfile.TarInfo(f".many/{index}"))
        if draw(st.booleans()):  # a header declaring more than what follows
            huge = tarfile.TarInfo(draw(entry_names))
            huge.size = draw(st.sampled_from([10**6, 2**33 - 1, 10**12]))
            archive.fileobj.write(huge.tobuf(tar_format))
    compression = COMPRESSIONS[draw(st.sampled_from(sorted(COMPRESSIONS)))]
    match compression:
        case "gz":
            return gzip.compress(raw.getvalue(), mtime=0)
        case "bz2":
            return bz2.compress(raw.getvalue())
        case "xz":
            return lzma.compress(raw.getvalue())
    return raw.getvalue()


@HALF
@given(st.binary(max_size=2048), st.sampled_from(["", "gz", "bz2", "xz"]))
def test_archive_bytes_raise_only_archive_refused(data: bytes, compression: str) -> None:
    """Arbitrary bytes, as they are or compressed (a valid gzip, bzip2 or xz
    stream of garbage): files within the limits, or a 400 or 413."""
    match compression:
        case "gz":
            data = gzip.compress(data, mtime=0)
        case "bz2":
            data = bz2.compress(data)
        case "xz":
            data = lzma.compress(data)
    _read_archive(data)


@HALF
@pytest.mark.filterwarnings("ignore:Duplicate name")
@given(zips() | tars(), st.data())
def test_hostile_archives_give_files_within_limits_or_a_refusal(
    archive: bytes, data: st.DataObject
) -> None:
    """Well-formed archives of hostile shapes, mangled or not: what comes out
    is within the limits, safe names only, or a 400 or 413."""
    if data.draw(st.booleans()):
        archive = mutate(archive, data.draw)
    _read_archive(archive)


def test_the_fuzzed_shapes_are_refused_for_what_they_are() -> None:
    """The shapes the fuzzers draw, one by one, get the refusal they call for."""
    import zipfile

    def tar(*members: tarfile.TarInfo, data: bytes = b"") -> bytes:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as archive:
            for member in members:
                archive.addfile(member, io.BytesIO(data) if member.isreg() else None)
        return gzip.compress(raw.getvalue(), mtime=0)

    big = tarfile.TarInfo("big.png")
    big.size = 10**12
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        archive.fileobj.write(big.tobuf())
    assert _read_archive(raw.getvalue()) == 413
    many = [tarfile.TarInfo(f".{i}") for i in range(ARCHIVE_LIMITS[0] * 4 + 65)]
    assert _read_archive(tar(*many)) == 413
    hidden = [tarfile.TarInfo(f".{i}") for i in range(3)]
    for member in hidden:
        member.size = 25_000
    assert _read_archive(tar(*hidden, data=bytes(25_000))) == 413  # 75 KB inflated
    link = tarfile.TarInfo("a.png")
    link.type = tarfile.SYMTYPE
    assert _read_archive(tar(link)) == 400
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("a.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    assert _read_archive(buffer.getvalue()) == 400
    pax = tarfile.TarInfo("a" * (2 << 20) + ".png")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(pax, io.BytesIO())
    assert _read_archive(raw.getvalue()) == 413  # a 2 MB pax header


# -- a job's body (web/uploads.py read_job_body) -----------------------------------

job_parts = st.lists(
    st.tuples(st.sampled_from(["image", "archive", "model", "other"]), safe_text,
              st.binary(max_size=64), st.booleans()),
    max_size=5,
)  # fmt: skip


def job_body(parts: list[tuple[str, str, bytes, bool]]) -> bytes:
    chunks = []
    for name, filename, data, is_file in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if is_file else "")
        chunks.append(f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
                      + data + b"\r\n")  # fmt: skip
    return b"".join(chunks) + f"--{BOUNDARY}--\r\n".encode()


def _read_job(body: bytes, content_type: str, max_body: int = 1 << 20) -> uploads.JobBody:
    return uploads.read_job_body(io.BytesIO(body), content_type, len(body), max_body=max_body,
                                 max_image=48, fields=("model",))  # fmt: skip


@given(job_parts)
def test_a_job_body_round_trips(parts: list[tuple[str, str, bytes, bool]]) -> None:
    """Images, the archive and the plain field asked for come back as sent;
    an image over its limit, or a second archive, is refused."""
    kind = f"multipart/form-data; boundary={BOUNDARY}"
    files = [(n, f, d) for n, f, d, is_file in parts if is_file]
    if (
        any(n == "image" and len(d) > 48 for n, _, d in files)
        or [n for n, _, _ in files].count("archive") > 1
    ):
        with pytest.raises(uploads.UploadRefused):
            _read_job(job_body(parts), kind)
        return
    with _read_job(job_body(parts), kind) as body:
        assert list(body.image_files()) == [(f, d) for n, f, d in files if n == "image"]
        archived = [(f, d) for n, f, d in files if n == "archive"]
        if archived:
            assert body.archive is not None
            body.archive.seek(0)
            assert (body.archive_name, body.archive.read()) == archived[0]
        else:
            assert body.archive is None
        fields = [d.decode("utf-8", "replace") for n, _, d, f in parts if n == "model" and not f]
        assert body.fields == ({"model": fields[0]} if fields else {})


@given(st.data(), job_parts, header_text)
def test_a_job_body_raises_only_upload_refused(
    data: st.DataObject, parts: list[tuple[str, str, bytes, bool]], content_type: str
) -> None:
    body = mutate(job_body(parts), data.draw)
    for kind in (f"multipart/form-data; boundary={BOUNDARY}", content_type):
        status = 0
        try:
            _read_job(body, kind, max_body=data.draw(st.sampled_from([1 << 20, 100]))).close()
        except uploads.UploadRefused as exc:
            status = exc.status
        assert status in (0, 400, 413)
