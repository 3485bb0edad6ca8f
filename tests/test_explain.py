"""Explanations (`/explain`, serving/explain.py): a small Keras model whose
answer depends only on the image's top-left quadrant, served by real workers
on a real Redis; occlusion's map (keras and OpenVINO workers) and Grad-CAM's
(keras) must both point there. Also: the masked copies wait at the lowest
level and skip the response cache, the PNG overlay, and hostile inputs."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from conftest import (
    REGION_SIZE,
    WorkerThread,
    make_worker,
    png_bytes,
    post_images,
    region_spec,
    wait_until,
)
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from werkzeug.test import TestResponse

from keras_server.broker import messages
from keras_server.broker.request_queue import RequestQueue
from keras_server.serving import explain
from keras_server.serving.failures import BadInput
from keras_server.settings import Settings, SettingsError, load_settings
from keras_server.web.app import create_app

SIZE = REGION_SIZE


def seen_by(client: FlaskClient, headers: dict[str, str] | None = None) -> None:
    """Until the app's view of the workers holds the one a test started: the
    region model's input size (32 x 32) is known from then on."""
    models = lambda: client.get("/models", headers=headers).get_json()["models"]  # noqa: E731
    wait_until(lambda: models()[0]["live_workers"], what="the worker in GET /models")


@pytest.fixture(scope="module")
def keras_region(region_model: Path) -> object:
    from keras_server.engines.keras_engine import load_classifier

    return load_classifier(region_spec(region_model))


@pytest.fixture(scope="module")
def openvino_region(region_model: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    from keras_server.engines.choice import EngineOptions, load_predictor

    options = EngineOptions(
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        min_agreement=0.95,
        max_image_pixels=50_000_000,
    )
    predictor = load_predictor(region_spec(region_model, engine="openvino"), options)
    assert predictor.engine == "openvino"
    return predictor


def photo() -> bytes:
    """Noise as bright in every quadrant (the image itself singles none
    out), larger than the model's input, as uploads are."""
    pixels = np.random.default_rng(7).integers(150, 256, (2 * SIZE, 2 * SIZE, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels))


def post(
    client: FlaskClient, *files: bytes, path: str = "/explain", **options: str
) -> TestResponse:
    """POST `files` to `path` with `options` as query parameters (class_: class)."""
    query = "&".join(f"{k.rstrip('_')}={v}" for k, v in options.items())
    return post_images(client, *files, path=f"{path}?{query}" if query else path)


@pytest.fixture
def keras_served(
    settings: Settings, keras_region: object, client: FlaskClient
) -> Iterator[WorkerThread]:
    """A keras worker of the region model, beating (its engine is known)."""
    with WorkerThread(make_worker(settings, keras_region)) as running:
        seen_by(client)
        yield running


def assert_top_left(heatmap: np.ndarray) -> None:
    """The map's highest cells lie in the top-left quadrant, and nothing
    outside it matters."""
    rows, columns = heatmap.shape
    inside = heatmap[: rows // 2, : columns // 2]
    row, column = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    assert row < rows // 2 and column < columns // 2, heatmap
    assert inside.max() == pytest.approx(1.0)
    outside = heatmap.copy()
    outside[: rows // 2, : columns // 2] = 0
    assert outside.max() <= 0.05, heatmap
    assert np.all((heatmap >= 0) & (heatmap <= 1))


def occlusion_of(client: FlaskClient) -> dict:
    response = post(client, photo())
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_occlusion_points_at_the_region_the_model_reads(
    client: FlaskClient, keras_served: WorkerThread, settings: Settings
) -> None:
    body = occlusion_of(client)
    assert body["success"] is True
    assert [p["label"] for p in body["predictions"]] == ["bright", "dark"]
    found = body["explanation"]
    assert found["method"] == "occlusion"
    assert found["class"] == {"index": 0, "label": "bright"}
    assert found["probability"] == pytest.approx(body["predictions"][0]["probability"], abs=1e-6)
    grid = settings.explain_grid
    assert (found["rows"], found["columns"]) == (grid, grid)
    assert found["images"] == 1 + grid * grid
    assert found["max_drop"] > 0
    assert_top_left(np.array(found["heatmap"]))


def test_the_same_region_through_openvino(
    client: FlaskClient, settings: Settings, openvino_region: object
) -> None:
    with WorkerThread(make_worker(settings, openvino_region)):
        seen_by(client)
        body = occlusion_of(client)
    assert_top_left(np.array(body["explanation"]["heatmap"]))
    assert body["explanation"]["class"]["label"] == "bright"


def test_gradcam_points_at_the_region_on_the_keras_engine(
    client: FlaskClient, keras_served: WorkerThread
) -> None:
    response = post(client, photo(), method="gradcam")
    assert response.status_code == 200, response.get_json()
    found = response.get_json()["explanation"]
    assert found["method"] == "gradcam"
    assert found["images"] == 1
    # The grid is the layer's: `focus`, found as the last 4-D one.
    assert (found["rows"], found["columns"]) == (SIZE, SIZE)
    assert_top_left(np.array(found["heatmap"]))
    # A class named by its label: looked up first, then explained.
    named = post(client, photo(), method="gradcam", class_="dark").get_json()["explanation"]
    assert named["class"] == {"index": 1, "label": "dark"}
    assert named["images"] == 2


def test_gradcam_on_another_engine_is_a_400_naming_keras(
    client: FlaskClient, settings: Settings, openvino_region: object
) -> None:
    # No worker yet: which engine will answer is not known.
    early = post(client, photo(), method="gradcam")
    assert early.status_code == 503
    assert "has no live worker yet" in early.get_json()["error"]
    with WorkerThread(make_worker(settings, openvino_region)):
        seen_by(client)
        response = post(client, photo(), method="gradcam")
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert "needs the keras engine" in error and "runs on openvino" in error


def test_a_class_by_index_or_label_and_the_png_overlay(
    client: FlaskClient, keras_served: WorkerThread
) -> None:
    by_index = post(client, photo(), class_="1").get_json()["explanation"]
    by_label = post(client, photo(), class_="dark").get_json()["explanation"]
    assert by_index["class"] == by_label["class"] == {"index": 1, "label": "dark"}
    # Hiding the bright quadrant makes "dark" likelier: no cell lowers it.
    assert by_index["max_drop"] == 0 and np.max(by_index["heatmap"]) == 0

    for response in (
        post(client, photo(), format="png"),
        post_images(client, photo(), path="/explain", headers={"Accept": "image/png"}),
    ):
        assert response.status_code == 200
        assert response.mimetype == "image/png"
        assert response.headers["X-Explained-Class"] == "0"
        overlay = Image.open(io.BytesIO(response.data))
        assert overlay.size == (SIZE, SIZE) and overlay.mode == "RGB"


def test_masked_images_wait_at_the_lowest_level_and_skip_the_cache(
    settings: Settings, keras_region: object, redis_client: redis.Redis, queue: RequestQueue
) -> None:
    settings = dataclasses.replace(settings, priority_levels=3, response_cache_ttl=60)
    client = create_app(settings).test_client()
    keys = messages.Keys(settings.queue_name)
    # A worker that beats but claims nothing: what is queued stays where it was put.
    info = make_worker(settings, keras_region).info()
    queue.beat("idle", dataclasses.replace(info, pid=0), 30)
    answered: list[TestResponse] = []
    thread = threading.Thread(target=lambda: answered.append(post(client, photo())))
    thread.start()
    wait_until(lambda: redis_client.llen(keys.queue_at(3)) == 1, what="the image, level 3")
    assert redis_client.llen(keys.queue_at(1)) == redis_client.llen(keys.queue_at(2)) == 0
    with WorkerThread(make_worker(settings, keras_region)):
        thread.join(30)
        assert answered and answered[0].status_code == 200, answered[0].get_json()
        cached = keys.cached("*", "*", "*", "*").replace("{", "[{]").replace("}", "[}]")
        assert redis_client.keys(cached) == []
        # /predict's answer is cached: the cache is on, and none of the
        # explanation's 65 answers is in it.
        assert post_images(client, photo()).status_code == 200
    assert len(redis_client.keys(cached)) == 1


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"class_": "2"}, "class 2 is out of range: the model has 2 classes (0..1)"),
        ({"class_": "99999999999999"}, "out of range"),
        ({"class_": "tabby"}, "unknown class 'tabby'"),
        ({"grid": "0"}, "grid must be a whole number from 2 to 16"),
        ({"grid": "1000"}, "grid must be a whole number from 2 to 16"),
        ({"grid": "-3"}, "grid must be a whole number from 2 to 16"),
        ({"method": "lime"}, "unknown explanation method 'lime'; use one of occlusion, gradcam"),
        ({"format": "gif"}, "format must be one of json, png"),
    ],
)
def test_hostile_options_are_400s_saying_why(
    client: FlaskClient, keras_served: WorkerThread, options: dict[str, str], words: str
) -> None:
    response = post(client, photo(), **options)
    assert response.status_code == 400, response.get_json()
    assert words in response.get_json()["error"]


def test_hostile_uploads_are_4xx_saying_why(
    client: FlaskClient, keras_served: WorkerThread
) -> None:
    response = post(client, b"this is not an image")
    assert response.status_code == 400
    assert "image" in response.get_json()["error"]
    two = post(client, photo(), photo())
    assert two.status_code == 400
    assert "/explain takes one" in two.get_json()["error"]
    none = client.post("/explain", data={}, content_type="multipart/form-data")
    assert none.status_code == 400
    assert "0 files in the 'image' field" in none.get_json()["error"]
    unknown = post(client, photo(), path="/models/nope/explain")
    assert unknown.status_code == 404


@pytest.mark.parametrize("value", ["0", "1", "17", "1000", "eight"])
def test_explain_grid_out_of_range_is_refused_at_start(value: str) -> None:
    with pytest.raises(SettingsError, match=r"--explain-grid=.*from 2 to 16"):
        load_settings(["--explain-grid", value], environ={})


@given(st.one_of(st.none(), st.text(max_size=30), st.integers()))
def test_the_options_parsers_take_or_refuse_anything(value: object) -> None:
    for parse in (
        lambda v: explain.grid_of(v, 8),
        explain.target_of,
        explain.method_of,
    ):
        refused: BadInput | None = None
        try:
            parsed = parse(value)
        except BadInput as exc:
            refused = exc
        if refused is not None:
            assert refused.status == 400
            assert refused.message
        else:
            assert parsed is None or isinstance(parsed, int | str)


def test_importance_and_the_overlay() -> None:
    heat, top = explain.importance(np.array([[0.2, -0.1], [0.0, 0.4]]))
    np.testing.assert_allclose(heat, [[0.5, 0.0], [0.0, 1.0]])
    assert top == pytest.approx(0.4)
    zeros, none = explain.importance(np.array([[-0.1, 0.0]]))
    assert none == 0 and not zeros.any()
    cells = explain.cells(10, 7, 3)
    covered = np.zeros((10, 7), dtype=int)
    for rows, columns in cells:
        covered[rows, columns] += 1
    assert len(cells) == 9 and np.all(covered == 1)
    pixels = np.zeros((10, 7, 3), dtype=np.uint8)
    overlay = Image.open(io.BytesIO(explain.overlay_png(pixels, heat)))
    assert overlay.size == (7, 10)
    # The hottest corner takes the ramp's top colour, the coldest its bottom.
    rgb = np.asarray(overlay)
    np.testing.assert_allclose(rgb[-1, -1], explain.RAMP[-1] * explain.OPACITY, atol=1)
    np.testing.assert_allclose(rgb[0, -1], explain.RAMP[0] * explain.OPACITY, atol=1)


def v2_infer(client: FlaskClient, parameters: dict, outputs: list | None = None) -> TestResponse:
    body: dict = {
        "parameters": parameters,
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(photo()).decode()],
            }
        ],
    }
    if outputs is not None:
        body["outputs"] = outputs
    return client.post("/v2/models/resnet50/infer", json=body)


def test_v2_parameters_explain_adds_the_heatmap_output(
    client: FlaskClient, keras_served: WorkerThread
) -> None:
    for method, side in (("occlusion", 4), ("gradcam", SIZE)):
        response = v2_infer(client, {"explain": method, "explain_grid": 4})
        assert response.status_code == 200, response.get_json()
        outputs = {o["name"]: o for o in response.get_json()["outputs"]}
        assert outputs["heatmap"]["datatype"] == "FP32"
        assert outputs["heatmap"]["shape"] == [1, side, side]
        assert_top_left(np.array(outputs["heatmap"]["data"]).reshape(side, side))
        assert outputs["probabilities"]["shape"] == [1, 2]
    binary = v2_infer(
        client,
        {"explain": "occlusion", "explain_class": 0, "binary_data_output": True},
        [{"name": "probabilities"}, {"name": "heatmap"}],
    )
    assert binary.status_code == 200
    length = int(binary.headers["Inference-Header-Content-Length"])
    header = json.loads(binary.data[:length])
    assert [o["name"] for o in header["outputs"]] == ["probabilities", "heatmap"]
    assert len(binary.data) - length == 4 * (2 + 8 * 8)


@pytest.mark.parametrize(
    ("parameters", "outputs", "words"),
    [
        ({}, [{"name": "heatmap"}], "output 'heatmap' needs parameters.explain"),
        ({"explain_class": 1}, None, "parameters.explain_class needs parameters.explain"),
        ({"explain": "shap"}, None, "unknown explanation method 'shap'"),
        ({"explain": "occlusion", "explain_class": 2}, None, "class 2 is out of range"),
        ({"explain": "occlusion", "explain_class": "dark"}, None, "must be a class index"),
        ({"explain": "occlusion", "explain_grid": 1000}, None, "grid must be a whole number"),
    ],
)
def test_v2_hostile_explain_parameters_are_400s(
    client: FlaskClient,
    keras_served: WorkerThread,
    parameters: dict,
    outputs: list | None,
    words: str,
) -> None:
    response = v2_infer(client, parameters, outputs)
    assert response.status_code == 400, response.get_json()
    assert words in response.get_json()["error"]


def test_gradcam_layer_from_the_models_file(region_model: Path, tmp_path: Path) -> None:
    from keras_server.catalog import load_models_file
    from keras_server.engines.keras_engine import load_classifier
    from keras_server.engines.predictor import ModelLoadError

    models = tmp_path / "models.toml"
    labels = region_model.with_suffix(".txt")
    models.write_text(
        f'[models.region]\nmodel = "{region_model}"\nlabels = "{labels}"\n'
        'preprocessing = "none"\ngradcam_layer = "focus"\n'
    )
    (spec,) = load_models_file(models).specs
    assert spec.gradcam_layer == "focus"
    named = load_classifier(spec)
    assert named.gradcam_layer == "focus"
    heat = named.gradcam(np.full((SIZE, SIZE, 3), 200, dtype=np.uint8), 0)
    assert_top_left(heat)
    for layer, words in (("nope", "gradcam_layer 'nope'"), ("decide", "not a 4-D")):
        with pytest.raises(ModelLoadError, match=words):
            load_classifier(region_spec(region_model, gradcam_layer=layer))


def test_an_explanation_is_charged_as_its_images_refused_whole(
    settings: Settings, keras_region: object, tmp_path: Path
) -> None:
    key = "explain-key-0123456789abcdef"
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{key} name=alice rate=10/h burst=10\n")
    client = create_app(dataclasses.replace(settings, api_keys=str(keys))).test_client()
    alice = {"X-API-Key": key}
    with WorkerThread(make_worker(settings, keras_region)):
        # Its input size is the worker's (32 x 32), known once the view sees it.
        seen_by(client, alice)
        done = post_images(client, photo(), path="/explain?grid=2", headers=alice)
        assert done.status_code == 200, done.get_json()
        assert done.get_json()["explanation"]["images"] == 5
        assert done.headers["RateLimit-Remaining"] == "5"
        # 1 + 3 x 3 = 10 images with 5 left: refused whole, nothing counted.
        refused = post_images(client, photo(), path="/explain?grid=3", headers=alice)
        assert refused.status_code == 429
        assert refused.headers["RateLimit-Remaining"] == "5"


def test_the_worker_reads_the_explain_fields_or_refuses_the_entry() -> None:
    pixels = np.zeros((2, 2, 3), dtype=np.uint8)
    asked = messages.ImageRequest.create(
        pixels, 5, probabilities=True, explain="gradcam", explain_class=3
    )
    read = messages.decode_request(messages.encode_request(asked))
    assert (read.explain, read.explain_class) == ("gradcam", 3)
    plain_request = messages.ImageRequest.create(pixels, 5)
    plain = messages.decode_request(messages.encode_request(plain_request))
    assert (plain.explain, plain.explain_class) == ("", -1)
    for bad in (
        {"explain": "lime"},
        {"explain": "gradcam", "probabilities": False},
        {"explain": "gradcam", "explain_class": -2},
        {"explain": ["gradcam"]},
    ):
        raw = messages.encode_request(asked)
        header, _, data = raw.partition(b"\n")
        fields = {**json.loads(header), **bad}
        with pytest.raises(messages.BadMessage):
            messages.decode_request(json.dumps(fields).encode() + b"\n" + data)


def test_a_worker_whose_engine_cannot_explain_answers_400() -> None:
    """Reached when a request meets such a worker all the same (a model whose
    workers run several engines): the web tier's check is the first line."""
    from keras_server.engines.simulated import SimulatedModel
    from keras_server.worker.loop import explained

    model = SimulatedModel(0, 0)
    request = messages.ImageRequest.create(
        np.zeros(model.input_shape, np.uint8), 5, probabilities=True, explain="gradcam"
    )
    answer = json.loads(explained(request, np.full(1000, 1e-3, np.float32), model))
    assert answer == {
        "format": messages.FORMAT,
        "success": False,
        "error": "the sim engine cannot compute gradcam; only the keras engine can",
        "status": 400,
    }
