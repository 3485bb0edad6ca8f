"""Shared fixtures: a real redis-server per test session, a small Keras model,
a worker thread serving it, the sample images, a test client of the app and a
multipart upload to it.

Also the run's hygiene: Hypothesis profiles (`ci`, the default, and `deep`
for `make fuzz`), every process a test started stopped with its children
when the test ends (passed or not), and a check at the end of the session
that fails the run if any process we started is still alive."""

from __future__ import annotations

import atexit
import contextlib
import io
import itertools
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import preflight
import psutil
import pytest
import redis
from flask.testing import FlaskClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from PIL import Image
from werkzeug.test import TestResponse

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Every process this run starts inherits a mark (unless a test hands it a
# whole new environment), so the checks below find the ones that outlived
# their parent as well as our children. The run's mark is made once, by
# pytest (or by xdist's controller, whose workers inherit it); each worker
# adds its own name, so that a test stops only what its own worker started.
os.environ.setdefault("KERAS_SERVER_TEST_RUN_BASE", f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
# Each xdist worker (gw0, gw1...) picks free ports of its own class, it and
# the servers it starts (keras_server.broker.redis_server.PORTS_ENV).
os.environ["KERAS_SERVER_PORTS"] = f"{int(os.environ.get('PYTEST_XDIST_WORKER', 'gw0')[2:]) % 8}/8"
os.environ["KERAS_SERVER_TEST_RUN"] = (
    f"{os.environ['KERAS_SERVER_TEST_RUN_BASE']}/{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
)

from keras_server.broker import messages
from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.broker.request_queue import RequestQueue
from keras_server.engines.predictor import warm_up
from keras_server.processes import Child, ChildFailed
from keras_server.settings import Settings
from keras_server.web.app import create_app
from keras_server.worker.loop import Worker
from run_cluster import http_answers

RUN_MARK, RUN_BASE = "KERAS_SERVER_TEST_RUN", "KERAS_SERVER_TEST_RUN_BASE"

# Hypothesis: deterministic runs (derandomize, no example database) at two
# depths. `ci`, the default, keeps `make test` short; `deep` is `make fuzz`
# (pytest --hypothesis-profile deep). A test sets no max_examples of its own;
# one that needs fewer scales the profile's (test_fuzz_parsers.py).
_FUZZ_DEFAULTS = {
    "derandomize": True,
    "database": None,
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
hypothesis_settings.register_profile("ci", max_examples=60, **_FUZZ_DEFAULTS)
hypothesis_settings.register_profile("deep", max_examples=2000, **_FUZZ_DEFAULTS)
hypothesis_settings.load_profile("ci")

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
# The sample images, as uploaded.
CHELSEA = (IMAGES / "chelsea.png").read_bytes()
COFFEE = (IMAGES / "coffee.png").read_bytes()
ROCKET = (IMAGES / "rocket.jpg").read_bytes()


# A test that uses one of these (directly or through another fixture) loads
# a model: it is slow, whether or not it says so.
MODEL_FIXTURES = frozenset({"small_model_path", "resnet_model", "squares_model", "region_model"})
# Session fixtures that take a core tens of seconds to build: the tests that
# use one run in one xdist group, so that it is built once a run, not once
# in each pytest process.
SHARED_BUILDS = frozenset({"resnet_model"})


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark `slow` every test that loads a model (MODEL_FIXTURES), so that
    `make test-quick` (-m "not slow") starts none. Container tests take
    minutes: they run only when the -m expression names their marker (`make
    container-test`), never in a plain `make test`."""
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if built := sorted(SHARED_BUILDS & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.xdist_group(built[0]))
        elif _shares_module_fixtures(item):
            # xdist (`make test`: --dist loadgroup) runs a group in one
            # worker, so the module's server starts once; other tests go to
            # whichever worker is free.
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    # The longest modules first, so that xdist does not hand one out last to
    # run alone while the other processes idle (sorted: stable within each).
    items.sort(key=lambda item: LONGEST_FIRST.get(item.path.name, len(LONGEST_FIRST)))
    if "container" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("container") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


# By their time in `make test` (--durations), the longest first.
LONGEST_FIRST = {
    name: rank
    for rank, name in enumerate(
        [
            "test_engines.py",
            "test_onnx_engine.py",
            "test_soak.py",
            "test_monitoring.py",
            "test_faults.py",
            "test_bench.py",
            "test_versions.py",
            "test_cli.py",
            "test_reliability.py",
            "test_redis_cluster.py",
            "test_availability.py",
            "test_models.py",
        ]
    )
}


def _shares_module_fixtures(item: pytest.Item) -> bool:
    """Whether `item` uses a module-scoped fixture (directly or through
    another): one its module's other tests share."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(
        definition.scope in ("module", "package", "class")
        for definitions in info.name2fixturedefs.values()
        for definition in definitions
    )


# One conversion cache for the run's servers (never the user's own): a model
# converted by one test's server is a cache hit for the next, in any xdist
# worker (the cache takes turns on a lock). Made and removed by the process
# that started the run; workers inherit its path.
CACHE_ENV = "KERAS_SERVER_TEST_CACHE"
if CACHE_ENV not in os.environ:
    os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="keras-server-test-cache-")
    atexit.register(shutil.rmtree, os.environ[CACHE_ENV], ignore_errors=True)
CACHE_DIR = os.environ[CACHE_ENV]
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
    # Tied: SIGTERM if pytest itself dies (killed by a timeout, say), so no
    # server outlives the run even when the tests' own clean-up cannot run.
    return Child("run_keras_server.py", command, cwd=ROOT, env=env or ENV, tied=True).start()


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


# Databases 1-15 of the session's Redis, in turn, for the modules' shared
# servers: database 0 is flushed before every test (redis_client).
_module_databases = itertools.count()


@pytest.fixture(scope="module")
def module_settings(redis_server: RedisServer) -> Settings:
    """Like `settings`, for servers a whole module shares (started once, by a
    module-scoped fixture): a Redis database of the module's own, emptied
    now, which no test's flush touches; tests keep apart by what they send
    (a queue name, a key, a version), not by a fresh server each."""
    database = 1 + next(_module_databases) % 15
    url = f"{redis_server.url.rsplit('/', 1)[0]}/{database}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return Settings(
        redis_url=url,
        redis_url_given=True,
        queue_name=f"module-{uuid.uuid4().hex[:8]}",
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
    # Named: Keras numbers unnamed layers per process (dense_2 after two).
    outputs = keras.layers.Dense(2, activation="softmax", name="decide")(pooled)
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
def resnet_model() -> object:
    """Keras' own ResNet50 with random initial weights (seeded), built once for
    the session: the reference the tests compare our engines with."""
    import keras

    keras.utils.set_random_seed(42)
    return keras.applications.ResNet50(weights=None)


@pytest.fixture(scope="session")
def resnet_weights(resnet_model: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet_model's weights, saved the way a user saves theirs."""
    path = tmp_path_factory.mktemp("resnet") / "resnet50.weights.h5"
    resnet_model.save_weights(path)
    return path


@pytest.fixture(scope="session")
def resnet_classifier(resnet_weights: Path) -> object:
    """Our Keras engine's ResNet50 on resnet_weights (as --weights loads it),
    loaded once for the session's tests that compare with it."""
    from keras_server.catalog import ModelSpec
    from keras_server.engines.keras_engine import load_classifier

    spec = ModelSpec(name="resnet50", source="resnet50", weights=str(resnet_weights))
    return load_classifier(spec)


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


# -- no process outlives its test ---------------------------------------------------


GONE = (psutil.NoSuchProcess, psutil.AccessDenied)


# The interpreter's own helpers, started by the first test that uses
# multiprocessing and kept for the session (they ignore SIGTERM, and leave
# when pytest does): never a test's.
HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _descendants() -> dict[int, psutil.Process]:
    """Our living descendants, but for the interpreter's helpers."""
    found = {}
    with contextlib.suppress(psutil.Error):
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(*GONE):
                command = " ".join(process.cmdline())
                if not any(helper in command for helper in HELPERS):
                    found[process.pid] = process
    return found


def _stop_trees(tops: list[psutil.Process], timeout: float = 10) -> None:
    """SIGTERM each of `tops` (a server stops its own children on it), then
    SIGKILL whatever of them or their descendants is left after `timeout` s."""
    everything: dict[int, psutil.Process] = {}
    for top in tops:
        everything[top.pid] = top
        with contextlib.suppress(*GONE):
            everything.update({p.pid: p for p in top.children(recursive=True)})
    for top in tops:
        with contextlib.suppress(*GONE):
            top.terminate()
    _, alive = psutil.wait_procs(list(everything.values()), timeout=timeout)
    for process in alive:
        with contextlib.suppress(*GONE):
            process.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Stop, with their children, the processes a test (or its function-
    scoped fixtures) started and left running, whether it passed or failed;
    and those of this run that it orphaned (their parent gone).

    Higher-scoped fixtures are set up before this one, so the processes they
    start (a module's server) are in the snapshot and stay; so do the
    children such a server starts during the test (a conversion, a respawned
    worker): only new processes with no older ancestor below us are ours."""
    before = set(_descendants())
    started = time.time()
    yield
    me = os.getpid()
    now = _descendants()
    left = []
    for pid, process in now.items():
        if pid in before:
            continue
        with contextlib.suppress(*GONE):
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            top, parent = process, process.parent()
            while parent is not None and parent.pid != me and parent.pid not in before:
                top, parent = parent, parent.parent()
            if parent is not None and parent.pid == me and top not in left:
                left.append(top)
    for process in psutil.process_iter(["create_time"]):
        # psutil's create_time counts from a boot time in whole seconds.
        new = process.info["create_time"] >= started - 2 and process.pid not in now
        if new and process.pid != me and _marked(process):
            left.append(process)
    if left:
        lines = []
        for process in left:
            with contextlib.suppress(*GONE):
                lines.append(f"{process.pid} {' '.join(process.cmdline())[:160]}")
        _stop_trees(left)
        # A warning, so that the summary lists it (from xdist's workers too).
        message = f"left running, stopped: {'; '.join(lines)}"
        warnings.warn(message, pytest.PytestWarning, stacklevel=1)


def _running(process: psutil.Process) -> bool:
    with contextlib.suppress(*GONE):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False


def _marked(process: psutil.Process, worker_only: bool = True) -> bool:
    """Started by this process's tests (it carries the mark; with not
    `worker_only`, by any xdist worker of the run), and not an interpreter
    helper."""
    with contextlib.suppress(*GONE):
        mark = process.environ().get(RUN_MARK, "")
        if worker_only and mark != os.environ[RUN_MARK]:
            return False
        if not mark.startswith(os.environ[RUN_BASE] + "/"):
            return False
        return not any(helper in " ".join(process.cmdline()) for helper in HELPERS)
    return False


@pytest.hookimpl(trylast=True)  # after xdist has stopped its workers
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process it started is still alive: a child of ours,
    or one that carries this run's mark and outlived its parent (an orphan),
    whichever xdist worker started it."""
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller checks the whole run
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    me = os.getpid()
    left = [p for p in _descendants().values() if _running(p)]
    left += [
        p
        for p in psutil.process_iter()
        if p.pid != me and p.pid not in {q.pid for q in left} and _marked(p, worker_only=False)
    ]
    # A server stopped a moment ago may still be reaping its children.
    _, left = psutil.wait_procs(left, timeout=5)
    left = [p for p in left if _running(p)]
    if not left:
        return
    lines = []
    for process in left:
        with contextlib.suppress(*GONE):
            lines.append(f"  {process.pid}: {' '.join(process.cmdline())[:200]}")
    _stop_trees(left)
    if reporter is not None:
        reporter.write_line("")
        reporter.write_sep("=", "processes left running at the end of the run", red=True)
        reporter.write_line("\n".join(lines))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
