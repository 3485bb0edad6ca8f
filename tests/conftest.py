"""Shared fixtures: a real redis-server per test session, a small Keras model,
and a worker thread serving it."""

from __future__ import annotations

import atexit
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_server import protocol
from keras_server.predictor import warm_up
from keras_server.queue import RequestQueue, connect
from keras_server.redis_launcher import RedisServer, free_port
from keras_server.settings import Settings
from keras_server.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"


# One conversion cache for the session's servers (never the user's own): a
# model converted by one test's server is a cache hit for the next.
CACHE_DIR = tempfile.mkdtemp(prefix="keras-server-test-cache-")
atexit.register(shutil.rmtree, CACHE_DIR, ignore_errors=True)
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "KERAS_SERVER_CACHE_DIR": CACHE_DIR,
}


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """run_keras_server.py with `args`; its output goes to a file (a pipe
    nobody reads would fill up and block it), read back by `output`."""
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the process)
    process = subprocess.Popen(
        [sys.executable, "run_keras_server.py", *args],
        cwd=ROOT,
        env=env or ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    process.log = log  # type: ignore[attr-defined]
    return process


def output(process: subprocess.Popen[str]) -> str:
    process.log.seek(0)  # type: ignore[attr-defined]
    return process.log.read()  # type: ignore[attr-defined]


def wait_for_http(url: str, process: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited early:\n{output(process)}")
        try:
            requests.get(url, timeout=1)
            return
        except (requests.ConnectionError, requests.Timeout):  # busy machine: slow to answer
            time.sleep(0.2)
    pytest.fail("server did not start listening")


def start_web(settings: Settings, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """`--role web` (gunicorn) on a free port for `settings`' Redis and queue,
    listening; returns the process and its base URL."""
    return start_serving(settings, "--role", "web", *extra)


def start_serving(
    settings: Settings, *args: str, timeout: float = 90
) -> tuple[subprocess.Popen[str], str]:
    """run_keras_server.py with `args` on a free port for `settings`' Redis and
    queue, once it listens; returns the process and its base URL."""
    port = free_port()
    process = start(
        *args, "--port", str(port),
        "--redis-url", settings.redis_url, "--queue-name", settings.queue_name,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    wait_for_http(base + "/healthz", process, timeout)
    return process, base


def stop(process: subprocess.Popen[str], timeout: float = 20) -> str:
    """SIGTERM, wait for the exit, and return everything it printed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"did not stop on SIGTERM:\n{output(process)}")
    return output(process)


def wait_until(condition: Callable[[], object], timeout: float = 30, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what or condition}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """Our own redis-server on a free port: never the shared 6379."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def settings(redis_server: RedisServer, redis_client: redis.Redis) -> Settings:
    return Settings(
        redis_url=redis_server.url,
        redis_url_given=True,
        queue_name=f"test-{uuid.uuid4().hex[:8]}",
        result_timeout=20.0,
        batch_size=8,
    )


@pytest.fixture
def queue(settings: Settings) -> Iterator[RequestQueue]:
    client = connect(settings.redis_url, block_seconds=settings.result_timeout)
    yield RequestQueue(client, protocol.Keys(settings.queue_name))
    client.close()


class CountingPredictor:
    """Wraps a real predictor and records the size of every forward pass."""

    def __init__(self, inner: object, fail: bool = False) -> None:
        self.inner = inner
        self.labels = inner.labels
        self.input_shape = inner.input_shape
        self.top_k = inner.top_k
        self.description = inner.description
        self.engine = inner.engine
        self.precision = inner.precision
        self.fidelity = inner.fidelity
        self.batches: list[int] = []
        self.fail = fail

    def predict(self, images: np.ndarray) -> np.ndarray:
        self.batches.append(len(images))
        if self.fail:
            raise RuntimeError("simulated model failure")
        return self.inner.predict(images)


@pytest.fixture(scope="session")
def small_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageNet-shaped Keras classifier (224x224x3 -> 1000), saved as .keras."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((224, 224, 3)),
            keras.layers.Conv2D(8, 7, strides=8, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1000, activation="softmax"),
        ]
    )
    path = tmp_path_factory.mktemp("models") / "small.keras"
    model.save(path)
    return path


@pytest.fixture(scope="session")
def resnet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ResNet50 with random initial weights, saved the way a user saves theirs."""
    import keras

    keras.utils.set_random_seed(42)
    path = tmp_path_factory.mktemp("resnet") / "resnet50.weights.h5"
    keras.applications.ResNet50(weights=None).save_weights(path)
    return path


@pytest.fixture(scope="session")
def small_classifier(small_model_path: Path) -> object:
    from keras_server.catalog import ModelSpec
    from keras_server.model import load_classifier

    classifier = load_classifier(ModelSpec(name="small", source=str(small_model_path)))
    warm_up(classifier, 8)
    return classifier


@pytest.fixture
def predictor(small_classifier: object) -> CountingPredictor:
    return CountingPredictor(small_classifier)


class WorkerThread:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.stop = threading.Event()
        self.thread = threading.Thread(target=worker.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> WorkerThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()


def make_worker(
    settings: Settings, predictor: object, batch_size: int | None = None, **options: float
) -> Worker:
    client = connect(settings.redis_url, block_seconds=1)
    return Worker(
        RequestQueue(client, protocol.Keys(settings.queue_name)),
        predictor,
        batch_size or settings.batch_size,
        result_ttl=settings.result_timeout,
        name=settings.model,
        version=settings.model_version,
        **options,
    )


def png_bytes(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()
