"""The OpenAPI description served at /openapi.json is valid, and true: real
requests and responses of the real app (real Redis, a worker thread with the
simulated model) are validated against it, the success and every error."""

import base64
import dataclasses
import io
import json
import re
import struct
from pathlib import Path

import pytest
from conftest import CHELSEA, ROOT, CountingPredictor, WorkerThread, make_worker, wait_until
from flask.testing import FlaskClient
from openapi_core import OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest, WerkzeugOpenAPIResponse
from openapi_core.validation.request.exceptions import RequestValidationError
from openapi_core.validation.response.exceptions import ResponseValidationError
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec
from test_images import _png_header_only
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import EnvironBuilder, TestResponse, encode_multipart

from keras_server.engines.simulated import SimulatedModel
from keras_server.settings import Settings
from keras_server.web.app import create_app
from keras_server.web.page import openapi_document

SPEC = json.loads(openapi_document())
DOWN = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.fixture(scope="module")
def openapi() -> OpenAPI:
    # Our server URL is "." (relative to the document, so it holds behind a
    # proxy's sub-path); openapi-core matches servers literally, and the test
    # client serves the document at http://localhost/.
    return OpenAPI.from_dict({**SPEC, "servers": [{"url": "http://localhost/"}]})


@dataclasses.dataclass
class Call:
    request: WerkzeugOpenAPIRequest
    response: TestResponse


def call(
    client: FlaskClient,
    method: str,
    path: str,
    body: bytes = b"",
    content_type: str | None = None,
    *,
    headers: dict[str, str] | None = None,
) -> Call:
    def build() -> EnvironBuilder:
        return EnvironBuilder(
            path=path, method=method, data=body, content_type=content_type, headers=headers
        )

    response = client.open(build())
    # The app consumed the first request's body; the validator reads a twin.
    return Call(WerkzeugOpenAPIRequest(build().get_request()), response)


def upload(
    client: FlaskClient,
    data: bytes,
    field: str = "image",
    path: str = "/predict",
    *,
    headers: dict[str, str] | None = None,
) -> Call:
    part = FileStorage(io.BytesIO(data), "upload.png", content_type="image/png")
    boundary, body = encode_multipart({field: part})
    content_type = f"multipart/form-data; boundary={boundary}"
    return call(client, "POST", path, body, content_type, headers=headers)


def conforms(openapi: OpenAPI, done: Call, status: int, request_valid: bool = True) -> object:
    """Assert the status, then that the request and the response are what the
    description says; return the body."""
    assert done.response.status_code == status, done.response.get_data(as_text=True)
    if request_valid:
        openapi.validate_request(done.request)
    else:
        with pytest.raises(RequestValidationError):
            openapi.validate_request(done.request)
    openapi.validate_response(done.request, WerkzeugOpenAPIResponse(done.response))
    return done.response.get_json() if done.response.is_json else done.response.get_data()


class SeenAsPost(WerkzeugOpenAPIRequest):
    """A 405 answers a method the path does not take, so no operation matches
    it; the description documents it under the path's one operation, POST."""

    @property
    def method(self) -> str:
        return "post"


def test_the_description_is_valid_openapi() -> None:
    validate_spec(SPEC)
    assert SPEC["openapi"].startswith("3.")


def test_its_version_is_the_package_version() -> None:
    # A regex, not tomllib: Python 3.10 is supported.
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version
    assert SPEC["info"]["version"] == version.group(1)


def test_every_route_is_documented_and_nothing_else(settings: Settings, tmp_path: Path) -> None:
    # With admin keys, so that the admin API's routes are served too.
    keys = tmp_path / "admin-keys"
    keys.write_text("ops admin-key-0123456789\n")
    app = create_app(dataclasses.replace(settings, admin_keys=str(keys)))
    served = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        # Assets are files for the page, not API.
        if not rule.endpoint.endswith("static")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    documented = {
        (path, method)
        for path, item in SPEC["paths"].items()
        for method in item
        if method != "options"
    }
    assert served == documented
    # Flask answers OPTIONS on every route; with --cors-origins, preflights.
    assert all("options" in item for item in SPEC["paths"].values())


def test_served_description_is_the_package_file(openapi: OpenAPI, client: FlaskClient) -> None:
    assert conforms(openapi, call(client, "GET", "/openapi.json"), 200) == SPEC


def test_a_prediction(openapi: OpenAPI, client: FlaskClient, settings: Settings) -> None:
    with WorkerThread(make_worker(settings, SimulatedModel(0, 0))):
        body = conforms(openapi, upload(client, CHELSEA), 200)
    probabilities = [p["probability"] for p in body["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True), "most likely first"


def test_priority_and_timeout_headers(
    openapi: OpenAPI, client: FlaskClient, settings: Settings
) -> None:
    urgent = {"X-Priority": "2", "X-Request-Timeout": "10"}
    with WorkerThread(make_worker(settings, SimulatedModel(0, 0))):
        assert conforms(openapi, upload(client, CHELSEA, headers=urgent), 200)["success"]
    body = conforms(openapi, upload(client, CHELSEA, headers={"X-Priority": "9"}), 400)
    assert "from 1 (the highest) to 2" in body["error"]
    late = {"X-Request-Timeout": "0"}
    body = conforms(openapi, upload(client, CHELSEA, headers=late), 400, request_valid=False)
    assert "greater than 0" in body["error"]


def test_models_list(openapi: OpenAPI, client: FlaskClient, settings: Settings) -> None:
    with WorkerThread(make_worker(settings, SimulatedModel(0, 0))) as running:
        wait_until(lambda: client.get("/models").get_json()["models"][0]["live_workers"])
        body = conforms(openapi, call(client, "GET", "/models"), 200)
    assert body["default"] == "resnet50"
    (model,) = body["models"]
    assert model["input_size"] == [224, 224]
    assert model["labels"] == 1000
    assert model["description"] == running.worker.description


def test_a_prediction_by_model_name(
    openapi: OpenAPI, client: FlaskClient, settings: Settings
) -> None:
    with WorkerThread(make_worker(settings, SimulatedModel(0, 0))):
        done = upload(client, CHELSEA, path="/models/resnet50/predict")
        assert len(conforms(openapi, done, 200)["predictions"]) == 5


def test_404_unknown_model(openapi: OpenAPI, client: FlaskClient) -> None:
    done = upload(client, CHELSEA, path="/models/alexnet/predict")
    assert "unknown model 'alexnet'" in conforms(openapi, done, 404)["error"]


def test_400_missing_field(openapi: OpenAPI, client: FlaskClient) -> None:
    body = conforms(openapi, upload(client, CHELSEA, field="file"), 400, request_valid=False)
    assert "no file in the 'image' field" in body["error"]


def test_400_empty_file(openapi: OpenAPI, client: FlaskClient) -> None:
    assert "empty" in conforms(openapi, upload(client, b""), 400)["error"]


def test_400_not_an_image(openapi: OpenAPI, client: FlaskClient) -> None:
    body = conforms(openapi, upload(client, (ROOT / "pyproject.toml").read_bytes()), 400)
    assert "not an image" in body["error"]


def test_405(openapi: OpenAPI, client: FlaskClient) -> None:
    done = call(client, "GET", "/predict")
    assert done.response.status_code == 405
    request = SeenAsPost(done.request.request)
    openapi.validate_response(request, WerkzeugOpenAPIResponse(done.response))
    assert "GET is not allowed" in done.response.get_json()["error"]


def test_413_body_too_large(openapi: OpenAPI, settings: Settings) -> None:
    client = create_app(dataclasses.replace(settings, max_upload_mb=0.05)).test_client()
    assert "larger than" in conforms(openapi, upload(client, CHELSEA), 413)["error"]


def test_413_too_many_pixels(openapi: OpenAPI, client: FlaskClient) -> None:
    body = conforms(openapi, upload(client, _png_header_only(60_000, 60_000)), 413)
    assert "too many pixels" in body["error"]


def test_500_model_failure(openapi: OpenAPI, client: FlaskClient, settings: Settings) -> None:
    failing = CountingPredictor(SimulatedModel(0, 0), fail=True)
    with WorkerThread(make_worker(settings, failing)):
        assert "model failed" in conforms(openapi, upload(client, CHELSEA), 500)["error"]


def test_503_redis_unreachable(openapi: OpenAPI, settings: Settings) -> None:
    client = create_app(dataclasses.replace(settings, redis_url=DOWN)).test_client()
    done = upload(client, CHELSEA)
    assert "Redis" in conforms(openapi, done, 503)["error"]
    assert done.response.headers["Retry-After"] == "1"


def test_504_no_worker(openapi: OpenAPI, settings: Settings) -> None:
    client = create_app(dataclasses.replace(settings, result_timeout=0.5)).test_client()
    assert "no prediction within" in conforms(openapi, upload(client, CHELSEA), 504)["error"]


def test_unknown_path_answers_the_error_shape(client: FlaskClient) -> None:
    # No path to validate against: the description promises the Error body.
    response = client.get("/nowhere")
    assert response.status_code == 404
    OAS31Validator(SPEC["components"]["schemas"]["Error"]).validate(response.get_json())


def test_healthz(openapi: OpenAPI, settings: Settings) -> None:
    client = create_app(dataclasses.replace(settings, redis_url=DOWN)).test_client()
    assert conforms(openapi, call(client, "GET", "/healthz"), 200) == {"status": "ok"}


def test_readyz_both_ways(openapi: OpenAPI, client: FlaskClient, settings: Settings) -> None:
    assert conforms(openapi, call(client, "GET", "/readyz"), 503)["ready"] is False
    with WorkerThread(make_worker(settings, SimulatedModel(0, 0), description="sim")):
        wait_until(lambda: client.get("/readyz").status_code == 200, what="a ready worker")
        body = conforms(openapi, call(client, "GET", "/readyz"), 200)
    assert body == {"ready": True, "workers": 1, "claim_loops": 1, "models": ["sim"]}


def test_readyz_without_redis(openapi: OpenAPI, settings: Settings) -> None:
    client = create_app(dataclasses.replace(settings, redis_url=DOWN)).test_client()
    assert "unreachable" in conforms(openapi, call(client, "GET", "/readyz"), 503)["reason"]


def test_readyz_with_a_shard_down(openapi: OpenAPI, settings: Settings) -> None:
    two = dataclasses.replace(settings, redis_url=f"{settings.redis_url},{DOWN}")
    client = create_app(two).test_client()
    with WorkerThread(make_worker(settings, SimulatedModel(0, 0))):
        wait_until(lambda: client.get("/readyz").status_code == 200, what="a ready worker")
        body = conforms(openapi, call(client, "GET", "/readyz"), 200)
    assert len(body["unreachable"]) == 1


def test_metrics(openapi: OpenAPI, client: FlaskClient) -> None:
    done = call(client, "GET", "/metrics")
    assert b"keras_server_http_requests_total" in conforms(openapi, done, 200)
    assert done.response.mimetype == "text/plain"


def test_page(openapi: OpenAPI, client: FlaskClient) -> None:
    assert b"<form" in conforms(openapi, call(client, "GET", "/"), 200)


def test_the_checks_have_teeth(openapi: OpenAPI, settings: Settings) -> None:
    """Real responses that break the description are caught."""
    client = create_app(dataclasses.replace(settings, redis_url=DOWN)).test_client()
    refused = upload(client, CHELSEA)
    del refused.response.headers["Retry-After"]
    with pytest.raises(ResponseValidationError):
        openapi.validate_response(refused.request, WerkzeugOpenAPIResponse(refused.response))

    not_ready = call(client, "GET", "/readyz")
    not_ready.response.status_code = 200  # a 503 body, claimed as ready
    with pytest.raises(ResponseValidationError):
        openapi.validate_response(not_ready.request, WerkzeugOpenAPIResponse(not_ready.response))


def several(client: FlaskClient, *files: bytes, path: str = "/predict") -> Call:
    parts = [
        FileStorage(io.BytesIO(data), f"f{i}.png", "image/png") for i, data in enumerate(files)
    ]
    boundary, body = encode_multipart(MultiDict([("image", part) for part in parts]))
    return call(client, "POST", path, body, f"multipart/form-data; boundary={boundary}")


def test_several_images(openapi: OpenAPI, client: FlaskClient, settings: Settings) -> None:
    not_an_image = (ROOT / "pyproject.toml").read_bytes()
    with WorkerThread(make_worker(settings, SimulatedModel(0, 0))):
        body = conforms(openapi, several(client, CHELSEA, not_an_image, CHELSEA), 200)
    assert [r["status"] for r in body["results"]] == [200, 400, 200]


def test_several_images_too_many(openapi: OpenAPI, settings: Settings) -> None:
    client = create_app(dataclasses.replace(settings, max_images=2)).test_client()
    assert "the limit is 2" in conforms(openapi, several(client, *[CHELSEA] * 3), 413)["error"]


# -- the v2 protocol ----------------------------------------------------------

INFER = "/v2/models/resnet50/infer"


def infer_json(*files: bytes, **extra: object) -> bytes:
    data = [base64.b64encode(f).decode() for f in files]
    tensor = {"name": "image", "datatype": "BYTES", "shape": [len(files)], "data": data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def test_v2_metadata_and_health(openapi: OpenAPI, client: FlaskClient, settings: Settings) -> None:
    assert conforms(openapi, call(client, "GET", "/v2"), 200)["name"] == "keras-server"
    assert conforms(openapi, call(client, "GET", "/v2/health/live"), 200) == {"live": True}
    assert conforms(openapi, call(client, "GET", "/v2/health/ready"), 400) == {"ready": False}
    conforms(openapi, call(client, "GET", "/v2/models/resnet50/ready"), 400)
    with WorkerThread(make_worker(settings, SimulatedModel(0, 0))):
        wait_until(lambda: client.get("/v2/health/ready").status_code == 200, what="ready")
        conforms(openapi, call(client, "GET", "/v2/health/ready"), 200)
        conforms(openapi, call(client, "GET", "/v2/models/resnet50/versions/1/ready"), 200)
        body = conforms(openapi, call(client, "GET", "/v2/models/resnet50"), 200)
        assert body["outputs"][0]["shape"] == [-1, 1000]
        conforms(openapi, call(client, "GET", "/v2/models/resnet50/versions/1"), 200)
    assert "unknown model" in conforms(openapi, call(client, "GET", "/v2/models/x"), 404)["error"]
    done = call(client, "GET", "/v2/models/resnet50/versions/9/ready")
    assert "no version '9'" in conforms(openapi, done, 404)["error"]


def test_v2_infer(openapi: OpenAPI, client: FlaskClient, settings: Settings) -> None:
    top3 = [{"name": "probabilities", "parameters": {"classification": 3}}]
    with WorkerThread(make_worker(settings, SimulatedModel(0, 0))):
        done = call(client, "POST", INFER, infer_json(CHELSEA, CHELSEA), "application/json")
        body = conforms(openapi, done, 200)
        assert body["outputs"][0]["shape"] == [2, 1000]
        # A pinned version is routed by the survey of live workers, which
        # may predate the worker's first beat by up to its freshness.
        wait_until(lambda: client.get("/v2/models/resnet50/versions/1/ready").status_code == 200)
        done = call(client, "POST", "/v2/models/resnet50/versions/1/infer",
                    infer_json(CHELSEA, outputs=top3, id="a"), "application/json")  # fmt: skip
        body = conforms(openapi, done, 200)
        assert (body["id"], body["outputs"][0]["datatype"]) == ("a", "BYTES")

        # The binary extension, both ways.
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "image", "datatype": "BYTES", "shape": [1],
                        "parameters": {"binary_data_size": len(CHELSEA) + 4},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()  # fmt: skip
        body = header + struct.pack("<I", len(CHELSEA)) + CHELSEA

        def build() -> EnvironBuilder:
            return EnvironBuilder(
                path=INFER, method="POST", data=body, content_type="application/octet-stream",
                headers={"Inference-Header-Content-Length": str(len(header))},
            )  # fmt: skip

        response = client.open(build())
        done = Call(WerkzeugOpenAPIRequest(build().get_request()), response)
        conforms(openapi, done, 200)
    length = int(response.headers["Inference-Header-Content-Length"])
    answer = json.loads(response.data[:length])
    assert answer["outputs"][0]["parameters"]["binary_data_size"] == 4000
    assert len(response.data) == length + 4000


def test_v2_errors(openapi: OpenAPI, settings: Settings) -> None:
    client = create_app(dataclasses.replace(settings, max_images=2)).test_client()

    def infer(body: bytes, path: str = INFER) -> Call:
        return call(client, "POST", path, body, "application/json")

    bad = conforms(openapi, infer(infer_json(b"not an image")), 400)
    assert "not an image" in bad["error"]
    assert set(bad) == {"error"}
    assert (
        "unknown model"
        in conforms(openapi, infer(infer_json(CHELSEA), "/v2/models/x/infer"), 404)["error"]
    )
    assert "the limit is 2" in conforms(openapi, infer(infer_json(*[CHELSEA] * 3)), 413)["error"]
    full = create_app(dataclasses.replace(settings, max_queue=1)).test_client()
    done = call(full, "POST", INFER, infer_json(CHELSEA, CHELSEA), "application/json")
    assert "queue is full" in conforms(openapi, done, 503)["error"]
    slow = create_app(dataclasses.replace(settings, result_timeout=0.5)).test_client()
    done = call(slow, "POST", INFER, infer_json(CHELSEA), "application/json")
    assert "no prediction within" in conforms(openapi, done, 504)["error"]


def test_v2_model_failure(openapi: OpenAPI, client: FlaskClient, settings: Settings) -> None:
    failing = CountingPredictor(SimulatedModel(0, 0), fail=True)
    with WorkerThread(make_worker(settings, failing)):
        done = call(client, "POST", INFER, infer_json(CHELSEA), "application/json")
        assert "model failed" in conforms(openapi, done, 500)["error"]


def test_the_v2_checks_have_teeth(openapi: OpenAPI, settings: Settings) -> None:
    """A v2 error claimed as a success, and a success in /predict's error
    shape, are caught."""
    client = create_app(settings).test_client()
    refused = call(client, "POST", INFER, infer_json(b"not an image"), "application/json")
    refused.response.status_code = 200
    with pytest.raises(ResponseValidationError):
        openapi.validate_response(refused.request, WerkzeugOpenAPIResponse(refused.response))
    refused.response.status_code = 400
    refused.response.set_data(json.dumps({"success": False, "error": "x"}))
    with pytest.raises(ResponseValidationError):
        openapi.validate_response(refused.request, WerkzeugOpenAPIResponse(refused.response))


def test_jobs(openapi: OpenAPI, client: FlaskClient, settings: Settings) -> None:
    """POST /jobs (202, and its refusals), GET /jobs/<id> while queued and
    once done, paged, DELETE; 404 for a job that does not exist."""
    accepted = conforms(openapi, upload(client, CHELSEA, path="/jobs"), 202)
    location = accepted["status_url"]
    conforms(openapi, call(client, "GET", location), 200)
    conforms(openapi, call(client, "GET", location + "?offset=x"), 400, request_valid=False)
    conforms(openapi, upload(client, b"not an archive", "archive", "/jobs"), 400)
    conforms(openapi, call(client, "GET", "/jobs/" + "0" * 32), 404)
    with WorkerThread(make_worker(settings, SimulatedModel(0, 0))):
        wait_until(lambda: client.get(location).get_json()["state"] == "done", 30, "the job")
    done = conforms(openapi, call(client, "GET", location + "?limit=1"), 200)
    assert done["results"][0]["success"] is True
    cancelled = conforms(openapi, call(client, "DELETE", location), 200)
    assert cancelled == {"id": accepted["id"], "state": "done", "cancelled": False}
    many = dataclasses.replace(settings, max_job_images=1)
    # Two parts, two streams: werkzeug encodes a drained one as an empty part
    # with no line break before the boundary, which /jobs' streaming parser refuses.
    parts = [FileStorage(io.BytesIO(CHELSEA), "a.png", content_type="image/png") for _ in "ab"]
    boundary, body = encode_multipart(MultiDict([("image", part) for part in parts]))
    too_many = call(create_app(many).test_client(), "POST", "/jobs", body,
                    f"multipart/form-data; boundary={boundary}")  # fmt: skip
    conforms(openapi, too_many, 413)


def test_versions_admin_and_repository_index(
    openapi: OpenAPI, settings: Settings, tmp_path: Path
) -> None:
    """The pinned predict route's 503 and 404, the repository index, and the
    admin API's answers (issue 22) are what the description says."""
    keys = tmp_path / "admin-keys"
    keys.write_text("ops admin-key-0123456789\n")
    client = create_app(dataclasses.replace(settings, admin_keys=str(keys))).test_client()
    admin = {"X-Admin-Key": "admin-key-0123456789"}
    done = upload(client, CHELSEA, path="/models/resnet50/versions/1/predict")
    assert "no live worker" in conforms(openapi, done, 503)["error"]
    done = upload(client, CHELSEA, path="/models/resnet50/versions/2/predict")
    assert "has no version '2'" in conforms(openapi, done, 404)["error"]
    index = call(client, "POST", "/v2/repository/index", b"{}", "application/json")
    assert conforms(openapi, index, 200)[0]["state"] == "UNAVAILABLE"
    conforms(openapi, call(client, "GET", "/admin/models"), 401, request_valid=False)
    listed = conforms(openapi, call(client, "GET", "/admin/models", headers=admin), 200)
    assert listed["models"][0]["traffic"] == {"policy": "latest"}
    traffic = "/admin/models/resnet50/traffic"
    body = json.dumps({"weights": {"1": 100}}).encode()
    conforms(openapi, call(client, "PUT", traffic, body, "application/json", headers=admin), 409)
    zero = json.dumps({"weights": {"1": 0}}).encode()
    conforms(openapi, call(client, "PUT", traffic, zero, "application/json", headers=admin), 400)
    conforms(openapi, call(client, "DELETE", traffic, headers=admin), 200)
    conforms(openapi, call(client, "DELETE", "/admin/models/x/traffic", headers=admin), 404)


def test_explain(openapi: OpenAPI, client: FlaskClient, settings: Settings) -> None:
    with WorkerThread(make_worker(settings, SimulatedModel(0, 0))):
        body = conforms(openapi, upload(client, CHELSEA, path="/explain?grid=2"), 200)
        assert body["explanation"]["images"] == 5
        named = upload(client, CHELSEA, path="/models/resnet50/explain?class=tabby&grid=2")
        assert conforms(openapi, named, 200)["explanation"]["class"]["index"] == 281
        png = upload(client, CHELSEA, path="/explain?grid=2", headers={"Accept": "image/png"})
        assert conforms(openapi, png, 200)[:8] == b"\x89PNG\r\n\x1a\n"
        gradcam = upload(client, CHELSEA, path="/explain?method=gradcam")
        assert "runs on sim" in conforms(openapi, gradcam, 400)["error"]
        wide = upload(client, CHELSEA, path="/explain?class=1000")
        assert "out of range" in conforms(openapi, wide, 400, request_valid=True)["error"]
    body = conforms(openapi, upload(client, CHELSEA, path="/explain?grid=1"), 400, False)
    assert "grid must be" in body["error"]


def test_v2_explain(openapi: OpenAPI, client: FlaskClient, settings: Settings) -> None:
    asked = {"explain": "occlusion", "explain_grid": 2, "explain_class": 281}
    with WorkerThread(make_worker(settings, SimulatedModel(0, 0))):
        request = infer_json(CHELSEA, parameters=asked)
        done = call(client, "POST", INFER, request, "application/json")
        body = conforms(openapi, done, 200)
    assert [(o["name"], o["shape"]) for o in body["outputs"]] == [
        ("probabilities", [1, 1000]),
        ("heatmap", [1, 2, 2]),
    ]
    wrong = infer_json(CHELSEA, outputs=[{"name": "heatmap"}])
    body = conforms(openapi, call(client, "POST", INFER, wrong, "application/json"), 400)
    assert "needs parameters.explain" in body["error"]
