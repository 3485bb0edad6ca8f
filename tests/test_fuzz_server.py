"""Server-level fuzz: a real server process (`--model sim`, started as
conftest does) takes valid requests mutated into bad ones (Hypothesis,
deterministic; as many as the profile says): never a 500, never a traceback
in its log, every error in the route's own JSON shape, and it still serves
afterwards."""

from __future__ import annotations

import base64
import http.client
import json
import struct
import urllib.parse

import pytest
from conftest import CHELSEA, start_serving, stop
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_parsers import hostile, mutate

from keras_server.settings import Settings

HEADER = "Inference-Header-Content-Length"
INFER = "/v2/models/sim/infer"  # --model sim serves a model named sim
BOUNDARY = "fuzz"


def predict_request() -> tuple[str, bytes, dict[str, str]]:
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="c.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + CHELSEA
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    return "/predict", body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def v2_message(binary: bool, pixels: bool) -> tuple[dict, bytes]:
    if pixels:
        data = bytes(224 * 224 * 3)
        tensor = {"name": "pixels", "datatype": "UINT8", "shape": [1, 224, 224, 3]}
    else:
        data = struct.pack("<I", len(CHELSEA)) + CHELSEA
        tensor = {"name": "image", "datatype": "BYTES", "shape": [1]}
    if binary:
        tensor["parameters"] = {"binary_data_size": len(data)}
    else:
        tensor["data"] = [base64.b64encode(CHELSEA).decode()]
        data = b""
    outputs = [{"name": "probabilities", "parameters": {"classification": 3}}]
    return {"id": "f", "inputs": [tensor], "outputs": outputs}, data


@st.composite
def hostile_requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """A valid request to /predict or v2 infer, then: a field of its JSON
    replaced, its bytes mutated, or a header changed."""
    if draw(st.integers(0, 3)) == 0:
        path, body, headers = predict_request()
    else:
        path = INFER
        message, data = v2_message(binary=draw(st.booleans()), pixels=draw(st.booleans()))
        where = draw(st.sampled_from([message, message["inputs"][0], message["outputs"][0]]))
        if draw(st.booleans()):
            key = draw(st.sampled_from([*where, "parameters"]))
            where[key] = draw(hostile)
        try:
            header = json.dumps(message).encode()
        except RecursionError:
            header = b'{"inputs": ' + b"[" * 50_000
        body = header + data
        headers = {"Content-Type": "application/json"}
        if data or draw(st.booleans()):
            headers[HEADER] = str(len(header))
    if draw(st.booleans()):
        body = mutate(body, draw)
    if draw(st.integers(0, 5)) == 0:
        name = draw(st.sampled_from(["Content-Type", HEADER, "Content-Encoding"]))
        # Visible ASCII and spaces: what HTTP allows in a field value. A control
        # character (DEL included) makes the message itself invalid: granian's
        # parser answers 400 with no body before any route runs (checked below).
        value = st.characters(codec="ascii", min_codepoint=32, max_codepoint=126)
        headers[name] = draw(st.text(value, max_size=40))
    return path, body, headers


def send(base: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    address = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.slow
def test_hostile_requests_never_500_and_the_server_stays_up(settings: Settings) -> None:
    process, base = start_serving(
        settings, "--model", "sim", "--max-images", "4", "--sim-batch-ms", "1"
    )
    statuses: dict[int, int] = {}
    try:

        @given(hostile_requests())
        def one(request: tuple[str, bytes, dict[str, str]]) -> None:
            path, body, headers = request
            status, answer = send(base, path, body, headers)
            statuses[status] = statuses.get(status, 0) + 1
            assert status < 500 or status == 503, answer[:500]
            if status >= 400:
                error = json.loads(answer)["error"]
                assert isinstance(error, str) and "Traceback" not in error

        one()
        path, body, headers = predict_request()
        assert send(base, path, body, {**headers, "Content-Type": "\x7f"})[0] == 400
        status, answer = send(base, path, body, headers)
        assert status == 200, answer[:500]
    finally:
        log = stop(process)
    assert "Traceback" not in log, log[-3000:]
    assert len(statuses) > 1, f"the mutations reach more than one answer: {statuses}"
