"""CORS (`--cors-origins`): the flag's values, preflights answered without a
key, the headers on every answer (errors included) for an allowed origin and
none for another, `*` without credentials, and nothing when off. The
browser itself is in tests/test_browser.py."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from conftest import CHELSEA, post_images
from flask.testing import FlaskClient
from test_openapi import SPEC, infer_json

from keras_server.settings import Settings, SettingsError, load_settings
from keras_server.web import cors
from keras_server.web.app import create_app

PAGE = "http://app.example:8080"
OTHER = "http://evil.example:8080"
KEY = "cors-test-key-0123456789abcdef"
DOWN = "redis://127.0.0.1:1/0"  # nothing listens on port 1
EXPOSED = {"Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "X-Cache"}


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("", ""),
        ("*", "*"),
        (" * ", "*"),
        ("http://a.example", "http://a.example"),
        (
            "HTTPS://App.Example:8443 , http://b.example:80",
            "https://app.example:8443,http://b.example",
        ),
        ("https://a.example:443,https://a.example", "https://a.example"),
        ("http://[::1]:5173", "http://[::1]:5173"),
    ],
)
def test_the_flag(given: str, kept: str) -> None:
    settings = load_settings(["--cors-origins", given], environ={})
    assert settings.cors_origins == kept
    env = {"KERAS_SERVER_CORS_ORIGINS": given}
    assert load_settings([], environ=env).cors_origins == kept
    assert load_settings([], environ={}).cors_origins == ""  # off by default


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("*,http://a.example", "* allows every origin: give it alone"),
        ("http://a.example/", "is not an origin"),
        ("http://a.example/app", "is not an origin"),
        ("a.example", "is not an origin"),
        ("null", "is not an origin"),
        ("ftp://a.example", "is not an origin"),
        ("http://user:pw@a.example", "is not an origin"),
        ("http://a.example:99999", "is not an origin"),
        ("http://a.example?x", "is not an origin"),
    ],
)
def test_bad_origins(given: str, message: str) -> None:
    with pytest.raises(SettingsError, match=rf"--cors-origins=.*{re.escape(message)}"):
        load_settings(["--cors-origins", given], environ={})


@pytest.fixture
def keyed(settings: Settings, tmp_path: Path) -> Settings:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY} name=page rate=1/h burst=2\n")
    return dataclasses.replace(
        settings, api_keys=str(keys), cors_origins=f"{PAGE},http://second.example"
    )


def preflight(client: FlaskClient, path: str, origin: str, method: str, headers: str) -> object:
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        },
    )


def test_preflights_need_no_key(keyed: Settings) -> None:
    client = create_app(keyed).test_client()
    asked = "x-api-key,x-priority,x-request-timeout,content-type"
    answer = preflight(client, "/predict", PAGE, "POST", asked)
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == PAGE
    assert set(answer.headers["Access-Control-Allow-Methods"].split(", ")) == {
        "GET", "HEAD", "OPTIONS", "POST",
    }  # fmt: skip
    allowed = answer.headers["Access-Control-Allow-Headers"].lower().split(", ")
    assert sorted(allowed) == sorted(asked.split(","))
    assert answer.headers["Access-Control-Max-Age"] == str(cors.MAX_AGE_S)
    assert "Origin" in answer.headers.get_all("Vary")
    assert "Access-Control-Allow-Credentials" not in answer.headers

    v2 = preflight(
        client,
        "/v2/models/resnet50/infer",
        PAGE,
        "POST",
        "authorization, content-type, inference-header-content-length",
    )
    assert v2.status_code == 200
    assert len(v2.headers["Access-Control-Allow-Headers"].split(", ")) == 3

    # A header the API does not take is not allowed: the browser refuses the call.
    odd = preflight(client, "/predict", PAGE, "POST", "x-api-key, x-something-else")
    assert odd.headers["Access-Control-Allow-Headers"].lower() == "x-api-key"
    # Another origin: answered, without a single CORS header.
    other = preflight(client, "/predict", OTHER, "POST", "x-api-key")
    assert not [h for h, _ in other.headers if h.startswith("Access-Control-")]


def assert_cors(response: object, status: int) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.headers["Access-Control-Allow-Origin"] == PAGE
    assert set(response.headers["Access-Control-Expose-Headers"].split(", ")) >= EXPOSED
    assert "Access-Control-Allow-Credentials" not in response.headers


def test_every_answer_carries_the_headers_errors_included(keyed: Settings) -> None:
    client = create_app(keyed).test_client()
    page = {"Origin": PAGE}
    with_key = {**page, "X-API-Key": KEY}
    assert_cors(post_images(client, CHELSEA, headers=page), 401)
    assert_cors(client.get("/v2", headers=page), 401)
    assert_cors(client.get("/no/such/path", headers=with_key), 404)
    small = create_app(dataclasses.replace(keyed, max_upload_mb=0.001)).test_client()
    assert_cors(post_images(small, CHELSEA, headers=with_key), 413)
    # Over the quota (burst 2, three images), in both shapes.
    over = post_images(client, CHELSEA, CHELSEA, CHELSEA, headers=with_key)
    assert_cors(over, 429)
    assert over.headers["Retry-After"]
    json_with_key = {**with_key, "Content-Type": "application/json"}
    infer = client.post(
        "/v2/models/resnet50/infer",
        data=infer_json(CHELSEA, CHELSEA, CHELSEA),
        headers=json_with_key,
    )
    assert_cors(infer, 429)
    # Redis unreachable: the quota is let go, the queue is a 503.
    down = create_app(dataclasses.replace(keyed, redis_url=DOWN)).test_client()
    assert_cors(post_images(down, CHELSEA, headers=with_key), 503)
    assert_cors(down.get("/healthz", headers=page), 200)
    assert_cors(client.get("/openapi.json", headers=page), 200)
    # Another origin gets the same answers, with no CORS header.
    refused = post_images(client, CHELSEA, headers={"Origin": OTHER})
    assert refused.status_code == 401
    assert "Access-Control-Allow-Origin" not in refused.headers


def test_any_origin_never_with_credentials(settings: Settings) -> None:
    client = create_app(dataclasses.replace(settings, cors_origins="*")).test_client()
    for origin in (PAGE, OTHER, "null"):
        answer = client.get("/models", headers={"Origin": origin})
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in answer.headers
        # The same answer for every origin: nothing for a cache to tell apart.
        assert "Origin" not in answer.headers.get_all("Vary")
    ask = preflight(client, "/predict", OTHER, "POST", "x-api-key")
    assert ask.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in ask.headers


def test_off_by_default(settings: Settings, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY + "\n")
    client = create_app(dataclasses.replace(settings, api_keys=str(keys))).test_client()
    answer = client.get("/models", headers={"Origin": PAGE, "X-API-Key": KEY})
    assert answer.status_code == 200
    assert not [h for h, _ in answer.headers if h.startswith("Access-Control-")]
    # Without CORS, a preflight is a request like any other: it needs a key.
    assert preflight(client, "/predict", PAGE, "POST", "x-api-key").status_code == 401


def test_the_description_documents_the_preflight_headers() -> None:
    documented = SPEC["components"]["responses"]["Preflight"]["headers"]
    allowed = documented["Access-Control-Allow-Headers"]["description"]
    exposed = documented["Access-Control-Expose-Headers"]["description"]
    assert all(f"`{h}`" in allowed for h in cors.ALLOW_HEADERS)
    assert all(f"`{h}`" in exposed for h in cors.EXPOSE_HEADERS)
