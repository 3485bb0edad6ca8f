"""Hostile uploads: each gets the right 4xx, nothing bad reaches the queue,
and good requests around them still succeed."""

import base64
import dataclasses
import io
import json
import random
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import CHELSEA, ROCKET, CountingPredictor, WorkerThread, make_worker, png_bytes
from flask.testing import FlaskClient
from PIL import Image
from test_images import _png_header_only

from keras_server.broker.messages import Keys
from keras_server.engines.simulated import SimulatedModel
from keras_server.settings import Settings
from keras_server.web.app import create_app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BOMB = _png_header_only(70_000, 70_000)
SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9000" height="9000">'
    b'<script>alert(1)</script><rect width="100%" height="100%"/></svg>'
)


def html_png_polyglot() -> bytes:
    """A real PNG that is also an HTML page and a ZIP archive."""
    data = png_bytes(Image.new("RGB", (32, 32), (10, 200, 10)), "PNG")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("payload.sh", "rm -rf /\n")
    return data + b"<html><script>alert(1)</script></html>" + buffer.getvalue()


def multipart(field: str, data: bytes, name: str = "x.png") -> dict:
    return {"data": {field: (io.BytesIO(data), name)}, "content_type": "multipart/form-data"}


def multipart_bad() -> dict:
    return {"data": b"--x\r\nnonsense", "content_type": "multipart/form-data; boundary=x"}


# (what, request keyword arguments (made fresh: the client closes the streams),
#  expected status, text in the error)
BAD_REQUESTS: list[tuple[str, Callable[[], dict], int, str]] = [
    ("json body", lambda: {"json": {"image": "aGVsbG8="}}, 400, "no file"),
    ("raw image bytes", lambda: {"data": CHELSEA, "content_type": "image/png"}, 400, "no file"),
    ("text body", lambda: {"data": b"hello", "content_type": "text/plain"}, 400, "no file"),
    ("urlencoded form", lambda: {"data": {"image": "not a file"}}, 400, "no file"),
    ("broken multipart", multipart_bad, 400, "no file"),
    ("wrong field", lambda: multipart("file", CHELSEA), 400, "no file"),
    ("empty file", lambda: multipart("image", b""), 400, "empty"),
    ("svg", lambda: multipart("image", SVG, "x.svg"), 400, "not an image"),
    ("html", lambda: multipart("image", b"<html>hi</html>", "x.html"), 400, "not an image"),
    ("png magic, junk", lambda: multipart("image", PNG_MAGIC + bytes(200)), 400, "not an image"),
    ("zip file", lambda: multipart("image", b"PK\x03\x04" + bytes(60)), 400, "not an image"),
    ("truncated png", lambda: multipart("image", CHELSEA[:3000]), 400, "truncated or corrupt"),
    ("bomb header", lambda: multipart("image", BOMB), 413, "too many pixels"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_each_bad_request_gets_the_right_4xx(
    client: FlaskClient, redis_client, settings: Settings, case: tuple
) -> None:
    _, kwargs, status, text = case
    response = client.post("/predict", **kwargs())
    assert response.status_code == status, response.get_data(as_text=True)
    body = json.loads(response.get_data())
    assert body["success"] is False
    assert text in body["error"]
    assert redis_client.llen(Keys(settings.queue_name).queue) == 0, "nothing bad reaches the queue"


def test_a_polyglot_is_classified_as_the_image_it_is(
    client: FlaskClient, settings: Settings, predictor: CountingPredictor
) -> None:
    with WorkerThread(make_worker(settings, predictor)):
        response = client.post("/predict", **multipart("image", html_png_polyglot()))
    assert response.status_code == 200
    assert predictor.batches == [1]


def test_bad_uploads_mixed_with_good_ones(
    client: FlaskClient, settings: Settings, predictor: CountingPredictor
) -> None:
    photos = [CHELSEA, ROCKET]
    good = [("good", lambda d=d: multipart("image", d), 200, "") for d in photos]
    cases = BAD_REQUESTS * 3 + good * 12
    random.Random(7).shuffle(cases)

    def send(case: tuple) -> tuple[str, int, int, str]:
        what, kwargs, status, _ = case
        response = client.post("/predict", **kwargs())
        return what, status, response.status_code, response.get_data(as_text=True)

    with WorkerThread(make_worker(settings, predictor)), ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(send, cases))
    for what, expected, got, body in outcomes:
        assert got == expected, f"{what}: {got} {body}"
    assert sum(predictor.batches) == 24, "exactly the good requests reached the model"


# -- v2: what used to be a 500 with a traceback --------------------------------

V2_INFER = "/v2/models/resnet50/infer"


def v2_bad_bodies() -> list[tuple[str, bytes, str]]:
    pixels = {"name": "pixels", "datatype": "UINT8", "shape": [1, 224, 224, 3]}
    image = {"name": "image", "datatype": "BYTES", "shape": [1]}
    image["data"] = [base64.b64encode(CHELSEA).decode()]
    deep = "[" * 100_000
    deep_data = '{"inputs": [' + json.dumps(pixels)[:-1] + ', "data": ' + deep
    not_a_list = "'outputs' must be a list"
    return [
        ("100 KB of [", deep.encode(), "nested too deeply"),
        ("deep data", deep_data.encode(), "nested too deeply"),
        ("outputs 5", json.dumps({"inputs": [image], "outputs": 5}).encode(), not_a_list),
        ("outputs text", json.dumps({"inputs": [image], "outputs": "x"}).encode(), not_a_list),
    ]


@pytest.mark.parametrize("case", v2_bad_bodies(), ids=[case[0] for case in v2_bad_bodies()])
def test_v2_hostile_bodies_are_400_without_a_traceback(
    client: FlaskClient, case: tuple[str, bytes, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, body, text = case
    response = client.post(V2_INFER, data=body, content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)
    assert text in response.get_json()["error"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the log"


def test_v2_json_pixels_count_against_the_decode_memory(settings: Settings) -> None:
    # Parsed, 150,528 JSON numbers take ~5 MB of Python objects (a 16 MB body
    # ~250 MB): the same budget as decoding an image bounds them.
    tight = create_app(dataclasses.replace(settings, decode_memory_mb=2)).test_client()
    pixels = {"name": "pixels", "datatype": "FP32", "shape": [1, 224, 224, 3]}
    response = tight.post(V2_INFER, json={"inputs": [{**pixels, "data": [0.5] * 150_528}]})
    assert response.status_code == 413, response.get_data(as_text=True)
    assert "decode memory" in response.get_json()["error"]
    # The same pixels as binary data hold no Python objects: served within it.
    raw = np.full(150_528, 0.5, "<f4").tobytes()
    header = json.dumps(
        {"inputs": [{**pixels, "parameters": {"binary_data_size": len(raw)}}]}
    ).encode()
    with WorkerThread(make_worker(settings, SimulatedModel(0, 0))):
        answer = tight.post(
            V2_INFER,
            data=header + raw,
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
    assert answer.status_code == 200, answer.get_data(as_text=True)
