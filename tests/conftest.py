"""Shared fixtures: a real redis-server per test session, a small Keras model,
a worker thread serving it, the sample images, a test client of the app and a
multipart upload to it."""

from __future__ import annotations

import atexit
import io
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import preflight
import pytest
import redis
from flask.testing import FlaskClient
from PIL import Image
from werkzeug.test import TestResponse

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_server.broker import messages
from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.broker.request_queue import RequestQueue
from keras_server.engines.predictor import warm_up
from keras_server.processes import Child, ChildFailed
from keras_server.settings import Settings
from keras_server.web.app import create_app
from keras_server.worker.loop import Worker
from run_cluster import http_answers

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
# The sample images, as uploaded.
CHELSEA = (IMAGES / "chelsea.png").read_bytes()
COFFEE = (IMAGES / "coffee.png").read_bytes()
ROCKET = (IMAGES / "rocket.jpg").read_bytes()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Container tests take minutes: they run only when the -m expression names
    their marker (`make container-test`), never in a plain `make test`."""
    if "container" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("container") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


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


def start(*args: str, env: dict[str, str] | None = None) -> Child:
    """run_keras_server.py with `args`; its output goes to a log file, read
    back by `output`."""
    command = [sys.executable, "run_keras_server.py", *args]
    return Child("run_keras_server.py", command, cwd=ROOT, env=env or ENV).start()


def output(process: Child) -> str:
    return process.output()


def wait_for_http(url: str, process: Child, timeout: float = 90) -> None:
    """Until `url` answers; the process is stopped and the test fails if it
    exits first or does not answer within `timeout` s."""
    try:
        process.wait_until(http_answers(url, timeout=5), timeout, f"answering at {url}")
    except ChildFailed as exc:
        process.stop()
        pytest.fail(str(exc))


def start_web(settings: Settings, *extra: str) -> tuple[Child, str]:
    """`--role web` (granian) on a free port for `settings`' Redis and queue,
    listening; returns the process and its base URL."""
    return start_serving(settings, "--role", "web", *extra)


def start_serving(settings: Settings, *args: str, timeout: float = 90) -> tuple[Child, str]:
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


def stop(process: Child, timeout: float = 20) -> str:
    """SIGTERM, wait for the exit, and return everything it printed."""
    if not process.stop(timeout):
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
def client(settings: Settings) -> FlaskClient:
    """A test client of the app for `settings` (nothing served until a test
    starts a worker)."""
    return create_app(settings).test_client()


def post_images(
    client: FlaskClient,
    *files: bytes | tuple[str, bytes],
    path: str = "/predict",
    field: str = "image",
    headers: dict[str, str] | None = None,
) -> TestResponse:
    """POST `files` as multipart/form-data, each in the `field` field (a file
    given as bare bytes is named x.png)."""
    named = [(f, "x.png") if isinstance(f, bytes) else (f[1], f[0]) for f in files]
    data = {field: [(io.BytesIO(content), name) for content, name in named]}
    return client.post(path, data=data, content_type="multipart/form-data", headers=headers)


@pytest.fixture
def queue(settings: Settings) -> RequestQueue:
    keys = messages.Keys(settings.queue_name)
    queue = RequestQueue.open(settings.redis_url, keys, timeout=1, levels=settings.priority_levels)
    return queue


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


REGION_SIZE = 32


@pytest.fixture(scope="session")
def region_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32x32 RGB -> bright/dark, from the mean grey of the top-left quadrant
    alone: the rest is cropped away before the one convolution (`focus`).
    What an explanation of it must point at is known (tests/test_explain.py)."""
    import keras

    half = REGION_SIZE // 2
    inputs = keras.Input((REGION_SIZE, REGION_SIZE, 3))
    kept = keras.layers.Cropping2D(((0, half), (0, half)))(inputs)
    padded = keras.layers.ZeroPadding2D(((0, half), (0, half)))(kept)
    focus = keras.layers.Conv2D(1, 1, activation="relu", name="focus")(padded)
    pooled = keras.layers.GlobalAveragePooling2D()(focus)
    outputs = keras.layers.Dense(2, activation="softmax")(pooled)
    model = keras.Model(inputs, outputs)
    # grey in 0..1; the pool averages it over the whole image (a quarter).
    model.get_layer("focus").set_weights([np.full((1, 1, 3, 1), 1 / (3 * 255)), np.zeros(1)])
    steep, threshold = 40.0, 0.17
    model.layers[-1].set_weights(
        [np.array([[steep, -steep]]), np.array([-steep * threshold, steep * threshold])]
    )
    directory = tmp_path_factory.mktemp("region")
    path = directory / "region.keras"
    model.save(path)
    (directory / "region.txt").write_text("bright\ndark\n")
    return path


def region_spec(path: Path, **fields: object) -> object:
    """The ModelSpec of `region_model` (`fields`: engine, gradcam_layer...)."""
    from keras_server.catalog import ModelSpec

    return ModelSpec(
        name="region",
        source=str(path),
        labels=str(path.with_suffix(".txt")),
        preprocessing="none",
        **fields,  # type: ignore[arg-type]
    ).validate()


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
    from keras_server.engines.keras_engine import load_classifier

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
    keys = messages.Keys(settings.queue_name)
    return Worker(
        RequestQueue.open(settings.redis_url, keys, timeout=1, levels=settings.priority_levels),
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


def system_tool(binary: str) -> str:
    """`binary`, a program of tests/preflight.py's tables, as the tests run it.
    Nothing is installed while the tests run: `make test` installs what is
    missing before pytest starts (as root), or stops naming the apt-get line."""
    try:
        return preflight.require(binary)
    except LookupError as exc:
        pytest.fail(str(exc))
