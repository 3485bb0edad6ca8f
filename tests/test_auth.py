"""API keys (`--api-keys FILE`): Bearer or X-API-Key, constant-time, 401 JSON
with WWW-Authenticate for everything else, nothing queued, open paths, keys
never logged, and an unusable keys file stopping the server before it listens."""

from __future__ import annotations

import dataclasses
import hmac
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import (
    CHELSEA,
    CountingPredictor,
    WorkerThread,
    make_worker,
    post_images,
    start,
    start_web,
    stop,
)
from flask import Blueprint, Flask
from flask.testing import FlaskClient
from openapi_core import OpenAPI
from test_openapi import SPEC, call, conforms, upload

from keras_server.broker.redis_server import free_port
from keras_server.engines.simulated import SimulatedModel
from keras_server.serving import keys as auth
from keras_server.settings import Settings, SettingsError, load_settings
from keras_server.web.app import create_app

KEY = "k3y-of-the-first-client-0123456789"
OTHER = "another.client~key/with+signs=="


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text(f"# one key per line\n\n{KEY}\n  {OTHER}  \n")
    return path


@pytest.fixture
def keyed(settings: Settings, keys_file: Path) -> Settings:
    return dataclasses.replace(settings, api_keys=str(keys_file))


@pytest.fixture
def model(settings: Settings) -> Iterator[CountingPredictor]:
    predictor = CountingPredictor(SimulatedModel(1, 0))
    with WorkerThread(make_worker(settings, predictor)):
        yield predictor


def app_for(settings: Settings) -> Flask:
    app = create_app(settings)
    # A route added after ours (as another feature's Blueprint would be):
    # the key check covers it too.
    later = Blueprint("later", __name__)
    later.add_url_rule("/later/ping", "ping", lambda: {"pong": True})
    app.register_blueprint(later)
    return app


@pytest.fixture
def client(keyed: Settings) -> FlaskClient:
    return app_for(keyed).test_client()


def assert_401(response, text: str, error: str | None = None) -> None:
    assert response.status_code == 401
    assert response.is_json
    body = response.get_json()
    assert body["success"] is False
    assert text in body["error"]
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="keras-server"')
    if error:
        assert f'error="{error}"' in challenge


def test_a_key_as_bearer_or_x_api_key(client: FlaskClient, model: CountingPredictor) -> None:
    for headers in (
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": f"bearer   {OTHER}"},
        {"X-API-Key": KEY},
        {"x-api-key": OTHER},
    ):
        response = post_images(client, CHELSEA, headers=headers)
        assert response.status_code == 200, (headers, response.get_json())
        assert response.get_json()["success"] is True
    assert sum(model.batches) == 4


@pytest.mark.parametrize(
    ("headers", "text", "error"),
    [
        ({}, "an API key is required", None),
        ({"X-API-Key": ""}, "an API key is required", None),
        ({"Authorization": f"Bearer {KEY}x"}, "not valid", "invalid_token"),
        ({"X-API-Key": KEY[:-1]}, "not valid", "invalid_token"),
        ({"Authorization": f"Basic {KEY}"}, "malformed Authorization", "invalid_request"),
        ({"Authorization": "Bearer"}, "malformed Authorization", "invalid_request"),
        ({"Authorization": f"Bearer {KEY} {KEY}"}, "malformed Authorization", "invalid_request"),
        ({"Authorization": "Bearer caf\u00e9-key-0123456789"}, "malformed", "invalid_request"),
        ({"Authorization": ""}, "malformed Authorization", "invalid_request"),
        # A wrong Authorization is not rescued by a right X-API-Key.
        ({"Authorization": "Bearer nope", "X-API-Key": KEY}, "not valid", "invalid_token"),
    ],
)
def test_missing_wrong_or_malformed_key_is_401_and_nothing_is_queued(
    client: FlaskClient,
    model: CountingPredictor,
    headers: dict[str, str],
    text: str,
    error: str | None,
) -> None:
    assert_401(post_images(client, CHELSEA, headers=headers), text, error)
    assert_401(client.post("/models/resnet50/predict", headers=headers), text)
    assert model.batches == []


def test_no_key_is_401_before_the_body_is_read(keyed: Settings) -> None:
    # Over the upload limit, still 401 (not 413): the body is never looked at.
    small = dataclasses.replace(keyed, max_upload_mb=0.001)
    response = post_images(app_for(small).test_client(), CHELSEA)
    assert_401(response, "an API key is required")


def test_open_and_closed_paths(keyed: Settings, client: FlaskClient) -> None:
    probes = ("/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")
    for path in ("/healthz", "/", "/assets/app.js", "/openapi.json", *probes):
        assert client.get(path).status_code != 401, path
    for path in ("/models", "/later/ping", "/no/such/path", "/predict"):
        assert_401(client.get(path), "an API key is required")
    assert client.get("/later/ping", headers={"X-API-Key": KEY}).get_json() == {"pong": True}
    assert client.get("/no/such/path", headers={"X-API-Key": KEY}).status_code == 404
    # The inference protocol's routes answer in its own error shape.
    for path in ("/v2", "/v2/models/resnet50"):
        refused = client.get(path)
        assert refused.status_code == 401
        assert refused.get_json() == {
            "error": "an API key is required: send "
            "'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        }
        assert refused.headers["WWW-Authenticate"].startswith('Bearer realm="keras-server"')
        assert client.get(path, headers={"X-API-Key": KEY}).status_code != 401

    guarded = app_for(dataclasses.replace(keyed, auth_probes=True)).test_client()
    assert guarded.get("/healthz").status_code == 200
    for path in probes:
        assert guarded.get(path).status_code == 401, path
        assert guarded.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code != 401


def test_without_a_keys_file_nothing_is_asked(settings: Settings) -> None:
    client = create_app(settings).test_client()
    assert client.get("/models").status_code == 200


def test_every_key_is_compared_whichever_matches(
    keys_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = auth.load_keys(str(keys_file))
    calls = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    assert keys.accepts(KEY)
    assert keys.accepts(OTHER)
    assert not keys.accepts("x" * 40)
    assert len(calls) == 3 * len(keys) == 6
    # Digests of equal length: the comparison never depends on the key's length.
    assert {len(a) for a, _ in calls} == {32}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read it"),
        ("", "no keys in it"),
        ("# only a comment\n\n", "no keys in it"),
        ("short\n", "line 1: a key must be at least 16 characters"),
        (f"{KEY}\nhas:a:colon:in:it:0123456789\n", "line 2: a key may hold only"),
        (b"\xff\xfe not utf-8 0123456789", "cannot read it"),
    ],
)
def test_unusable_keys_files(tmp_path: Path, content: str | bytes | None, message: str) -> None:
    path = tmp_path / "keys.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(auth.KeysFileError, match=message) as caught:
        auth.load_keys(str(path))
    assert KEY not in str(caught.value)


def test_settings_knobs() -> None:
    settings = load_settings(["--api-keys", "/k.txt", "--auth-probes", "yes"], environ={})
    assert (settings.api_keys, settings.auth_probes) == ("/k.txt", True)
    env = {"KERAS_SERVER_API_KEYS": "/e.txt", "KERAS_SERVER_AUTH_PROBES": "false"}
    assert load_settings([], environ=env).api_keys == "/e.txt"
    with pytest.raises(SettingsError, match="--auth-probes='maybe': must be true or false"):
        load_settings(["--auth-probes", "maybe"], environ={})


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("role", ["web", "all"])
@pytest.mark.parametrize("content", [None, "", "# no key\n"])
def test_server_exits_1_before_listening(
    tmp_path: Path, settings: Settings, role: str, content: str | None
) -> None:
    path = tmp_path / "keys.txt"
    if content is not None:
        path.write_text(content)
    port = free_port()
    process = start(
        "--role", role, "--model", "sim", "--port", str(port),
        "--redis-url", settings.redis_url, "--api-keys", str(path),
    )  # fmt: skip
    process.wait(timeout=60)
    out = stop(process)
    assert process.returncode == 1, out
    assert f"--api-keys {path}" in out
    assert "Traceback" not in out
    assert not listening(port)


@pytest.mark.slow
def test_the_web_role_with_keys_never_logs_them(
    keyed: Settings, keys_file: Path, model: CountingPredictor
) -> None:
    process, base = start_web(keyed, "--web-workers", "1", "--api-keys", str(keys_file))
    try:
        url = base + "/predict"
        wrong = KEY[:-2] + "zz"
        assert requests.post(url, files={"image": CHELSEA}, timeout=10).status_code == 401
        refused = requests.post(url, files={"image": CHELSEA}, headers={"X-API-Key": wrong})
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        answer = requests.post(
            url, files={"image": CHELSEA}, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        assert requests.get(base + "/healthz", timeout=5).status_code == 200
    finally:
        out = stop(process)
    assert "POST /predict 401" in out
    assert "POST /predict 200" in out
    for secret in (KEY, wrong, OTHER, KEY[:16]):
        assert secret not in out


def test_401_matches_the_openapi_description(keyed: Settings) -> None:
    # As test_openapi.py does: the test client serves at http://localhost/.
    openapi = OpenAPI.from_dict({**SPEC, "servers": [{"url": "http://localhost/"}]})
    client = create_app(keyed).test_client()
    body = conforms(openapi, upload(client, CHELSEA), 401)
    assert "an API key is required" in body["error"]
    conforms(openapi, call(client, "GET", "/models"), 401)
    guarded = create_app(dataclasses.replace(keyed, auth_probes=True)).test_client()
    for path in ("/readyz", "/metrics"):
        conforms(openapi, call(guarded, "GET", path), 401)
