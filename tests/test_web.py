"""POST /predict end to end: Flask test client -> real Redis -> worker thread
with a small Keras model; and every error the API promises."""

import dataclasses
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import (
    CHELSEA,
    COFFEE,
    ROCKET,
    CountingPredictor,
    WorkerThread,
    make_worker,
    png_bytes,
    post_images,
)
from flask.testing import FlaskClient
from PIL import Image
from test_images import _png_header_only

from keras_server.broker import messages
from keras_server.settings import Settings
from keras_server.web.app import create_app


@pytest.fixture
def served(settings: Settings, predictor: CountingPredictor):
    with WorkerThread(make_worker(settings, predictor)):
        yield predictor


def assert_error(response, status: int, text: str) -> None:
    assert response.status_code == status
    assert response.is_json
    body = response.get_json()
    assert body["success"] is False
    assert text in body["error"]
    assert "Traceback" not in response.get_data(as_text=True)


def test_predict_returns_top5_in_the_seed_shape(
    client: FlaskClient, served: CountingPredictor
) -> None:
    response = post_images(client, CHELSEA)
    assert response.status_code == 200
    body = response.get_json()
    assert list(body)[:2] == ["success", "predictions"]
    assert body["model"] == {"name": "resnet50", "version": "1"}
    assert body["success"] is True
    predictions = body["predictions"]
    assert len(predictions) == 5
    assert all(set(p) == {"label", "probability"} for p in predictions)
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1.0001
    assert all(p["label"] in served.labels for p in predictions)
    assert served.batches == [1]


def test_concurrent_requests_share_forward_passes(
    client: FlaskClient, served: CountingPredictor
) -> None:
    images = [CHELSEA, COFFEE, ROCKET]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: post_images(client, images[i % 3]), range(48)))
    assert all(r.status_code == 200 for r in responses)
    # Answers reach the right requests: the same image always gets the same top
    # class, whatever batch it was in (scores may differ in the last digits).
    for image in range(3):
        tops = {r.get_json()["predictions"][0]["label"] for r in responses[image::3]}
        assert len(tops) == 1
    assert sum(served.batches) == 48
    assert len(served.batches) < 48, "concurrent requests should be batched"


def test_missing_field(client: FlaskClient) -> None:
    assert_error(post_images(client, CHELSEA, field="file"), 400, "no file in the 'image' field")
    assert_error(client.post("/predict"), 400, "no file in the 'image' field")


def test_empty_file(client: FlaskClient) -> None:
    assert_error(post_images(client, b""), 400, "empty")


def test_not_an_image(client: FlaskClient) -> None:
    assert_error(post_images(client, ("x.txt", b"hello, I am text")), 400, "not an image")


def test_truncated_image(client: FlaskClient) -> None:
    assert_error(post_images(client, CHELSEA[:20_000]), 400, "truncated or corrupt")


def test_decompression_bomb(client: FlaskClient, redis_client, settings: Settings) -> None:
    assert_error(post_images(client, _png_header_only(60_000, 60_000)), 413, "too many pixels")
    queue = messages.Keys(settings.queue_name).queue
    assert redis_client.llen(queue) == 0, "nothing bad reaches the queue"


def test_body_over_the_upload_limit(settings: Settings) -> None:
    small = dataclasses.replace(settings, max_upload_mb=0.05)
    client = create_app(small).test_client()
    assert_error(post_images(client, CHELSEA), 413, "larger than the 0.05 MB limit")


def test_get_is_405_json(client: FlaskClient) -> None:
    response = client.get("/predict")
    assert_error(response, 405, "GET is not allowed")
    assert "POST" in response.headers["Allow"]


def test_unknown_path_is_404_json(client: FlaskClient) -> None:
    assert_error(client.get("/nope"), 404, "The requested URL was not found on the server")


def test_no_worker_means_504_after_the_timeout(settings: Settings) -> None:
    client = create_app(dataclasses.replace(settings, result_timeout=0.5)).test_client()
    assert_error(post_images(client, CHELSEA), 504, "no prediction within 0.5 s")


def test_redis_unreachable_is_503(settings: Settings) -> None:
    down = dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0")
    response = post_images(create_app(down).test_client(), CHELSEA)
    assert_error(response, 503, "Redis")
    assert response.headers["Retry-After"] == "1"


def test_a_model_failure_is_500_json(
    client: FlaskClient, settings: Settings, small_classifier: object
) -> None:
    with WorkerThread(make_worker(settings, CountingPredictor(small_classifier, fail=True))):
        assert_error(post_images(client, CHELSEA), 500, "model failed")


def test_an_answer_in_another_message_format_is_a_500_naming_it(
    client: FlaskClient,
    settings: Settings,
    predictor: CountingPredictor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker of a later format (its answers written by a stand-in here)."""

    def newer(predictions: list[dict], model: str = "", version: str = "") -> bytes:
        body = {"format": messages.FORMAT + 1, "success": True, "predictions": predictions}
        return json.dumps(body).encode()

    monkeypatch.setattr(messages, "success_result", newer)
    with WorkerThread(make_worker(settings, predictor)):
        response = post_images(client, CHELSEA)
    assert_error(response, 500, f"a worker answered in message format {messages.FORMAT + 1}")


def test_server_stays_up_after_errors(client: FlaskClient, served: CountingPredictor) -> None:
    for data in (b"", b"junk", CHELSEA[:5000], _png_header_only(60_000, 60_000)):
        post_images(client, data)
    transparent = png_bytes(Image.new("RGBA", (64, 64), (0, 0, 0, 0)))
    assert post_images(client, transparent).status_code == 200
    assert post_images(client, CHELSEA).status_code == 200


def test_uploads_are_never_spooled_to_disk(settings: Settings) -> None:
    app = create_app(settings)
    big = CHELSEA * 5  # over werkzeug's 500 KB in-memory threshold
    with app.test_request_context(
        "/predict", method="POST", data={"image": (io.BytesIO(big), "x.png")}
    ):
        from flask import request

        assert isinstance(request.files["image"].stream, io.BytesIO)
