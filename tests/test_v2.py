"""The v2 routes' every refusal, by raw HTTP (Flask test client, real Redis):
the protocol's error shape, the right status, and nothing left queued. The
successes, with a real client against a real server: test_v2_tritonclient.py."""

import base64
import dataclasses
import json
import struct
import threading

import pytest
import redis
from conftest import CHELSEA, CountingPredictor, WorkerThread, make_worker, wait_until
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from keras_server.broker.messages import Keys
from keras_server.engines.simulated import SimulatedModel
from keras_server.settings import Settings
from keras_server.web.app import create_app

INFER = "/v2/models/resnet50/infer"
HEADER = "Inference-Header-Content-Length"


@pytest.fixture
def small(settings: Settings) -> Settings:
    return dataclasses.replace(settings, max_images=3)


@pytest.fixture
def client(small: Settings) -> FlaskClient:
    return create_app(small).test_client()


def files_input(*files: bytes) -> dict[str, object]:
    data = [base64.b64encode(f).decode() for f in files]
    return {"name": "image", "datatype": "BYTES", "shape": [len(files)], "data": data}


def binary_request(tensor: dict[str, object], data: bytes, **extra: object) -> tuple[bytes, int]:
    header = json.dumps(
        {"inputs": [{**tensor, "parameters": {"binary_data_size": len(data)}}], **extra}
    ).encode()
    return header + data, len(header)


def refused(response: TestResponse, status: int, text: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"}, body
    assert text in body["error"]


@pytest.fixture
def nothing_queued(redis_client: redis.Redis, small: Settings):
    yield
    assert redis_client.llen(small.queue_name) == 0, "a rejected request queued something"


def test_refusals_by_status(client: FlaskClient, nothing_queued: None) -> None:
    def infer(body: object, path: str = INFER, **kwargs: object) -> TestResponse:
        return client.post(path, json=body, **kwargs)

    refused(infer({"inputs": [files_input(*[CHELSEA] * 4)]}), 413, "4 images in one request")
    pixels = {"name": "pixels", "datatype": "UINT8", "shape": [4, 224, 224, 3], "data": [0]}
    refused(infer({"inputs": [pixels]}), 413, "the limit is 3")
    refused(infer({"inputs": [files_input(CHELSEA)]}, "/v2/models/x/infer"), 404, "unknown model")
    versioned = "/v2/models/resnet50/versions/2/infer"
    refused(infer({"inputs": [files_input(CHELSEA)]}, versioned), 404, "no version '2'")

    bad_b64 = {**files_input(CHELSEA), "data": ["not base64!"]}
    refused(infer({"inputs": [bad_b64]}), 400, "element 0 is not valid base64")
    refused(infer({"inputs": [{**files_input(CHELSEA), "datatype": "UINT8"}]}), 400, "BYTES")
    refused(infer({"inputs": [{**files_input(CHELSEA), "name": "x"}]}), 400, "unknown input 'x'")
    refused(infer({"inputs": [{**files_input(CHELSEA), "shape": [2]}]}), 400, "holds 2 images")
    wrong = {**pixels, "shape": [1, 32, 32, 3], "data": [0] * 3072}
    refused(infer({"inputs": [wrong]}), 400, "shape must be [N, 224, 224, 3]")
    refused(infer({"inputs": [{**pixels, "datatype": "INT64"}]}), 400, "UINT8 or FP32")
    refused(
        infer({"inputs": [{**pixels, "shape": [1, 224, 224, 3], "data": [300] * 150528}]}),
        400,
        "whole numbers 0..255",
    )
    outputs = [{"name": "logits"}]
    refused(infer({"inputs": [files_input(CHELSEA)], "outputs": outputs}), 400, "unknown output")
    refused(infer({"inputs": []}), 400, "non-empty list")
    refused(infer({"inputs": [files_input(CHELSEA)] * 2}), 400, "one input per request")
    refused(client.post(INFER, data=b"{not json"), 400, "not valid JSON")
    not_an_image = files_input(b"plain text, not an image")
    refused(infer({"inputs": [not_an_image]}), 400, "element 0: the file is not an image")


def test_binary_lengths_must_match_the_body(client: FlaskClient, nothing_queued: None) -> None:
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1]}
    element = struct.pack("<I", len(CHELSEA)) + CHELSEA
    body, length = binary_request(tensor, element)

    def infer(data: bytes, header_length: object) -> TestResponse:
        return client.post(INFER, data=data, headers={HEADER: str(header_length)})

    refused(infer(body, len(body) + 1), 400, "but the body has")
    refused(infer(body, "ten"), 400, "not a whole number")
    refused(infer(body + b"extra", length), 400, "5 bytes after the JSON header belong to no input")
    refused(infer(body[:-10], length), 400, "runs past")
    short, length = binary_request(tensor, struct.pack("<I", 99) + b"abc")
    refused(infer(short, length), 400, "its length says 99 bytes, 3 are left")
    pixels = {"name": "pixels", "datatype": "UINT8", "shape": [1, 224, 224, 3]}
    odd, length = binary_request(pixels, b"\0" * 100)
    refused(infer(odd, length), 400, "100 bytes of binary data do not fit")


def test_a_full_queue_refuses_all_of_the_images(small: Settings, redis_client: redis.Redis) -> None:
    client = create_app(dataclasses.replace(small, max_queue=2)).test_client()
    response = client.post(INFER, json={"inputs": [files_input(CHELSEA, CHELSEA, CHELSEA)]})
    refused(response, 503, "queue is full")
    assert response.headers["Retry-After"] == "1"
    assert redis_client.llen(small.queue_name) == 0, "all or none"


def test_health_before_and_after_a_worker(client: FlaskClient, small: Settings) -> None:
    assert client.get("/v2/health/live").get_json() == {"live": True}
    not_ready = client.get("/v2/health/ready")
    assert (not_ready.status_code, not_ready.get_json()) == (400, {"ready": False})
    assert client.get("/v2/models/resnet50/ready").status_code == 400
    with WorkerThread(make_worker(small, SimulatedModel(0, 0))):
        wait_until(lambda: client.get("/v2/health/ready").status_code == 200)
        assert client.get("/v2/models/resnet50/versions/1/ready").get_json() == {
            "name": "resnet50",
            "ready": True,
        }


def test_n_images_are_n_queue_entries_batched_together(
    client: FlaskClient, small: Settings
) -> None:
    model = CountingPredictor(SimulatedModel(0, 0))
    answers: list[TestResponse] = []
    body = {"inputs": [files_input(CHELSEA, CHELSEA, CHELSEA)]}
    request = threading.Thread(target=lambda: answers.append(client.post(INFER, json=body)))
    request.start()
    # The worker starts once all three wait in the queue: one batch takes them.
    wait_until(lambda: _depth(small) == 3, what="three queue entries")
    with WorkerThread(make_worker(small, model)):
        request.join(20)
    assert answers[0].get_json()["outputs"][0]["shape"] == [3, 1000]
    assert model.batches == [3]


def _depth(settings: Settings) -> int:
    return redis.Redis.from_url(settings.redis_url).llen(Keys(settings.queue_name).queue)


def test_a_body_over_the_upload_limit_is_a_413(small: Settings, nothing_queued: None) -> None:
    client = create_app(dataclasses.replace(small, max_upload_mb=0.05)).test_client()
    refused(client.post(INFER, json={"inputs": [files_input(CHELSEA)]}), 413, "0.05 MB limit")


def test_other_methods_are_405(client: FlaskClient) -> None:
    response = client.get(INFER)
    assert response.status_code == 405
    assert "GET is not allowed" in response.get_json()["error"]
