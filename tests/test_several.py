"""Several images on /predict (repeated `image` fields): one answer per image,
in order, each its own success or error; the single-image answer unchanged.
Flask test client -> real Redis -> a worker thread with the small Keras model."""

import dataclasses

import pytest
import redis
from conftest import (
    CHELSEA,
    COFFEE,
    ROOT,
    CountingPredictor,
    WorkerThread,
    make_worker,
    post_images,
)
from flask.testing import FlaskClient
from test_images import _png_header_only

from keras_server.broker.messages import Keys
from keras_server.settings import Settings
from keras_server.web.app import create_app

NOT_AN_IMAGE = (ROOT / "pyproject.toml").read_bytes()


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, max_images=4)


@pytest.fixture
def served(settings: Settings, predictor: CountingPredictor):
    with WorkerThread(make_worker(settings, predictor)):
        yield predictor


def test_one_answer_per_image_in_order_bad_files_fail_alone(
    client: FlaskClient, served: CountingPredictor
) -> None:
    response = post_images(
        client,
        ("chelsea.png", CHELSEA),
        ("notes.txt", NOT_AN_IMAGE),
        ("coffee.png", COFFEE),
        ("empty.png", b""),
        # 4 is the limit: a fifth would be a 413 for the whole request.
    )
    assert response.status_code == 200
    body = response.get_json()
    assert body["success"] is True
    results = body["results"]
    assert [r["filename"] for r in results] == [
        "chelsea.png",
        "notes.txt",
        "coffee.png",
        "empty.png",
    ]
    assert [r["status"] for r in results] == [200, 400, 200, 400]
    assert [r["success"] for r in results] == [True, False, True, False]
    assert "not an image" in results[1]["error"]
    assert "empty" in results[3]["error"]
    # Each good image gets what it gets alone, model and version included. The
    # probabilities agree to float32 rounding only: a batch of 2 and a batch of
    # 1 may take different CPU kernels (seen on an AMD EPYC).
    for index, data in ((0, CHELSEA), (2, COFFEE)):
        alone = post_images(client, ("x.png", data)).get_json()
        together = {k: results[index][k] for k in alone}
        assert together.pop("predictions") == [
            {"label": p["label"], "probability": pytest.approx(p["probability"], rel=1e-4)}
            for p in alone.pop("predictions")
        ]
        assert together == alone
    assert results[0]["predictions"] != results[2]["predictions"]
    # Both good images were queued together: one forward pass took them.
    assert 2 in served.batches


def test_a_single_image_answers_exactly_as_before(
    client: FlaskClient, served: CountingPredictor
) -> None:
    body = post_images(client, ("chelsea.png", CHELSEA)).get_json()
    assert list(body) == ["success", "predictions", "model"]


def test_an_oversized_image_is_a_413_item(client: FlaskClient, served: CountingPredictor) -> None:
    response = post_images(
        client, ("bomb.png", _png_header_only(60_000, 60_000)), ("ok.png", CHELSEA)
    )
    results = response.get_json()["results"]
    assert [r["status"] for r in results] == [413, 200]
    assert "too many pixels" in results[0]["error"]


def test_too_many_images_is_a_413_and_nothing_is_queued(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    response = post_images(client, *[("x.png", CHELSEA)] * 5)
    assert response.status_code == 413
    assert response.get_json() == {
        "success": False,
        "error": "5 images in one request; the limit is 4 (--max-images)",
    }
    assert redis_client.llen(Keys(settings.queue_name).queue) == 0


def test_a_full_queue_refuses_the_whole_request(
    settings: Settings, redis_client: redis.Redis
) -> None:
    client = create_app(dataclasses.replace(settings, max_queue=2)).test_client()
    response = post_images(client, *[("x.png", CHELSEA)] * 3)
    assert response.status_code == 503
    assert "queue is full" in response.get_json()["error"]
    assert redis_client.llen(Keys(settings.queue_name).queue) == 0, "all or none"


def test_no_worker_makes_each_image_a_504(settings: Settings) -> None:
    client = create_app(dataclasses.replace(settings, result_timeout=0.5)).test_client()
    results = post_images(client, ("a.png", CHELSEA), ("b.txt", NOT_AN_IMAGE)).get_json()["results"]
    assert [r["status"] for r in results] == [504, 400]
    assert "no prediction within" in results[0]["error"]


def test_a_failed_batch_fails_its_images(settings: Settings, predictor: CountingPredictor) -> None:
    client = create_app(settings).test_client()
    failing = CountingPredictor(predictor.inner, fail=True)
    with WorkerThread(make_worker(settings, failing)):
        results = post_images(client, ("a.png", CHELSEA), ("b.png", COFFEE)).get_json()["results"]
    assert [r["status"] for r in results] == [500, 500]
    assert all("model failed" in r["error"] for r in results)
