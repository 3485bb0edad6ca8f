"""`python run_keras_server.py`: build the settings once, then run a role.

- all:    a private Redis if needed, the model thread, then the web tier on
          cheroot, in the same process (the single-machine setup)
- web:    gunicorn serving the Flask app (never imports TensorFlow)
- worker: the model loop alone

SIGTERM is graceful everywhere: gunicorn lets in-flight requests finish, and a
worker finishes and answers the batch it holds before it deregisters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from keras_server import metrics
from keras_server.broker import messages
from keras_server.broker.redis_server import RedisUnavailable, ensure_redis
from keras_server.broker.request_queue import RequestQueue
from keras_server.broker.shards import label
from keras_server.catalog import SIM, CatalogError, Models, ModelSpec
from keras_server.engines.predictor import ModelLoadError, Predictor, timed_warm_up
from keras_server.logs import configure_logging
from keras_server.metrics import MULTIPROCESS_DIR_ENV
from keras_server.settings import Settings, SettingsError, load_settings, to_environment
from keras_server.web.auth import KeysFileError, load_keys
from keras_server.worker.loop import FairLock, ModelThread, Worker, serve

log = logging.getLogger("keras_server")

GUNICORN_CONFIG = Path(__file__).parent / "web" / "gunicorn_conf.py"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        models = settings.model_specs()  # read once; a bad models file or spec stops us here
    except (SettingsError, CatalogError) as exc:
        print(f"run_keras_server.py: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        if settings.api_keys and settings.role != "worker":
            load_keys(settings.api_keys)  # an unusable keys file stops us before the port opens
        if settings.role == "web":
            exec_gunicorn(settings)
        elif settings.role == "worker":
            run_worker(settings, models)
        else:
            run_all(settings, models)
    except (RedisUnavailable, ModelLoadError, CatalogError, KeysFileError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


def loader(settings: Settings, spec: ModelSpec) -> Callable[[], Predictor]:
    """How to build a model: the engines are imported only for a real model, so
    the web role and `--model sim` never load TensorFlow (nor does a model
    served from the conversion cache)."""
    if spec.source == SIM:
        from keras_server.engines.simulated import SimulatedModel

        return lambda: SimulatedModel(settings.sim_batch_ms, settings.sim_image_ms, spec.top_k)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_server.engines.selection import EngineOptions, load_predictor

    options = EngineOptions(
        cache_dir=settings.cache_dir,
        min_agreement=settings.min_agreement,
        max_image_pixels=settings.max_image_pixels,
    )
    return lambda: load_predictor(spec, options)


def make_workers(
    settings: Settings,
    predictor: Predictor,
    model: str | None = None,
    models: Models | None = None,
) -> list[Worker]:
    """The claim loops of one model (default: the default model): one per Redis
    shard, all sharing the model, taking turns. `models`: the entry point's,
    else read from `settings`."""
    specs = models or settings.model_specs()
    name = model or specs.default
    spec = specs.find(name)
    version = spec.version if spec else ""
    keys = messages.Keys.for_model(settings.queue_name, name, specs.default)
    turn = FairLock() if len(settings.redis_urls) > 1 else None
    workers = []
    for url in settings.redis_urls:
        # The process's one Shard for `url`: the web tier of --role all and
        # every model's worker share its connections and its health.
        queue = RequestQueue.open(url, keys, timeout=settings.redis_timeout)
        worker = Worker(
            queue,
            predictor,
            settings.batch_size,
            result_ttl=settings.result_timeout,
            heartbeat_ttl=settings.heartbeat_ttl,
            batch_delay=settings.max_batch_delay_ms / 1000,
            description=predictor.description,
            name=name,
            version=version,
            turn=turn,
        )
        log.info("worker %s: model %r, queue %r at %s", worker.id, name, keys.queue, label(url))
        workers.append(worker)
    return workers


def build_workers(settings: Settings, models: Models) -> list[Worker]:
    """Load and warm up every model this process serves (`--serve`); their claim loops."""
    workers = []
    for spec in models.serving(settings.serve):
        predictor = loader(settings, spec)()
        timed_warm_up(predictor, settings.batch_size)
        metrics.record_engine(spec.name, predictor)
        workers += make_workers(settings, predictor, spec.name, models)
    return workers


def run_worker(settings: Settings, models: Models) -> None:
    workers = build_workers(settings, models)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.host)
        log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    stop = threading.Event()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        log.info("SIGTERM: finishing the current batch, then stopping")
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)  # Ctrl-C: as clean as SIGTERM
    serve(workers, stop)


def run_all(settings: Settings, models: Models) -> None:
    """Web and worker in one process, with a private Redis when none runs."""

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        # Once: a second SIGTERM while the requests in flight finish must not
        # interrupt the shutdown it asked for (SIGKILL still ends it).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    # SIGTERM unwinds like Ctrl-C, so the cleanups below (the private Redis) run.
    signal.signal(signal.SIGTERM, on_sigterm)
    with contextlib.ExitStack() as cleanup:
        settings, private_redis = ensure_redis(settings)
        if private_redis:
            cleanup.callback(private_redis.close)
        thread = ModelThread(prepare=lambda: build_workers(settings, models))
        thread.start()
        thread.wait_until_ready()
        try:
            serve_http(settings, models)
        finally:
            thread.stop.set()
            thread.join(timeout=settings.result_timeout)


def serve_http(settings: Settings, models: Models) -> None:
    """The web tier in this process, on cheroot (CherryPy's production WSGI
    server) until KeyboardInterrupt: a fixed pool of --web-threads threads,
    each holding one request while it waits for its prediction, and request
    bodies streamed to the app (never spooled to disk). On the way out, the
    requests in flight get as long as their deadline to finish."""
    from cheroot.wsgi import Server

    from keras_server.web.app import create_app
    from keras_server.web.deployment import Deployment

    server = Server(
        (settings.host, settings.port),
        create_app(settings, Deployment.from_settings(settings, models)),
        numthreads=settings.web_threads,
        max=settings.web_threads,
        request_queue_size=128,
        shutdown_timeout=int(settings.result_timeout) + 5,
        server_name="keras-server",
    )
    server.prepare()  # binds: the port is open from here on
    log.info("listening on http://%s:%d/predict", settings.host, settings.port)
    try:
        server.serve()
    finally:
        server.stop()


def exec_gunicorn(settings: Settings) -> None:
    """Replace this process with gunicorn serving the web tier.

    The child gets the resolved settings as KERAS_SERVER_* variables (read
    back by gunicorn_conf.py and web.wsgi_app), and a fresh directory for
    prometheus-client's multiprocess metrics, which must be set before the
    library is first imported: hence a new interpreter rather than a fork.
    """
    env = {**os.environ, **to_environment(settings)}
    env[MULTIPROCESS_DIR_ENV] = tempfile.mkdtemp(prefix="keras-server-metrics-")
    args = [
        sys.executable, "-m", "gunicorn",
        "--config", str(GUNICORN_CONFIG),
        "keras_server.web.app:wsgi_app()",
    ]  # fmt: skip
    log.info("starting gunicorn on %s:%d", settings.host, settings.port)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, env)
