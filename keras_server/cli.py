"""`python run_keras_server.py`: build the settings once, then run a role.

- all:    a private Redis if needed, the model thread, then Flask's own server
          (one process: the demo and single-machine setup)
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

from . import metrics, protocol
from .catalog import SIM, CatalogError, ModelSpec, find
from .logs import configure_logging
from .metrics import MULTIPROCESS_DIR_ENV
from .predictor import ModelLoadError, Predictor, timed_warm_up
from .queue import RequestQueue, connect
from .redis_launcher import RedisUnavailable, ensure_redis
from .settings import Settings, SettingsError, load_settings, to_environment
from .shards import label
from .worker import CLAIM_WAIT_S, FairLock, ModelThread, Worker, serve

log = logging.getLogger("keras_server")

GUNICORN_CONFIG = Path(__file__).with_name("gunicorn_conf.py")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        settings.model_specs()  # a bad models file or spec stops us here
    except (SettingsError, CatalogError) as exc:
        print(f"run_keras_server.py: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        if settings.role == "web":
            exec_gunicorn(settings)
        elif settings.role == "worker":
            run_worker(settings)
        else:
            run_all(settings)
    except (RedisUnavailable, ModelLoadError, CatalogError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


def served_specs(settings: Settings) -> tuple[list[ModelSpec], str]:
    """The models this process loads (`--serve`), and the deployment's default."""
    specs, default = settings.model_specs()
    if settings.serve == "all":
        return specs, default
    chosen = []
    for name in (n.strip() for n in settings.serve.split(",")):
        spec = find(specs, name)
        if spec is None:
            known = ", ".join(s.name for s in specs)
            raise CatalogError(f"--serve {name}: no such model (known: {known})")
        chosen.append(spec)
    return chosen, default


def loader(settings: Settings, spec: ModelSpec) -> Callable[[], Predictor]:
    """How to build a model: the engines are imported only for a real model, so
    the web role and `--model sim` never load TensorFlow (nor does a model
    served from the conversion cache)."""
    if spec.source == SIM:
        from .simulated import SimulatedModel

        return lambda: SimulatedModel(settings.sim_batch_ms, settings.sim_image_ms, spec.top_k)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from .engines import EngineOptions, load_predictor

    options = EngineOptions(
        cache_dir=settings.cache_dir,
        min_agreement=settings.min_agreement,
        max_image_pixels=settings.max_image_pixels,
    )
    return lambda: load_predictor(spec, options)


def make_workers(
    settings: Settings, predictor: Predictor, model: str | None = None
) -> list[Worker]:
    """The claim loops of one model (default: the default model): one per Redis
    shard, all sharing the model, taking turns."""
    specs, default = settings.model_specs()
    name = model or default
    spec = find(specs, name)
    version = spec.version if spec else ""
    keys = protocol.Keys.for_model(settings.queue_name, name, default)
    turn = FairLock() if len(settings.redis_urls) > 1 else None
    block = CLAIM_WAIT_S + settings.max_batch_delay_ms / 1000
    workers = []
    for url in settings.redis_urls:
        worker = Worker(
            RequestQueue(connect(url, block_seconds=block), keys),
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


def build_workers(settings: Settings) -> list[Worker]:
    """Load and warm up every model this process serves; their claim loops."""
    specs, _ = served_specs(settings)
    workers = []
    for spec in specs:
        predictor = loader(settings, spec)()
        timed_warm_up(predictor, settings.batch_size)
        metrics.record_engine(spec.name, predictor)
        workers += make_workers(settings, predictor, spec.name)
    return workers


def run_worker(settings: Settings) -> None:
    workers = build_workers(settings)
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


def run_all(settings: Settings) -> None:
    """Web and worker in one process, with a private Redis when none runs."""

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # SIGTERM unwinds like Ctrl-C, so the cleanups below (the private Redis) run.
    signal.signal(signal.SIGTERM, on_sigterm)
    with contextlib.ExitStack() as cleanup:
        settings, private_redis = ensure_redis(settings)
        if private_redis:
            cleanup.callback(private_redis.close)
        thread = ModelThread(prepare=lambda: build_workers(settings))
        thread.start()
        thread.wait_until_ready()
        try:
            from .web import create_app

            app = create_app(settings)
            log.info("listening on http://%s:%d/predict", settings.host, settings.port)
            # Flask's development server: fine for one machine and demos;
            # --role web runs gunicorn.
            app.run(host=settings.host, port=settings.port, threaded=True, use_reloader=False)
        finally:
            thread.stop.set()
            thread.join(timeout=settings.result_timeout)


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
        "keras_server.web:wsgi_app()",
    ]  # fmt: skip
    log.info("starting gunicorn on %s:%d", settings.host, settings.port)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, env)
