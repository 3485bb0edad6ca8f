"""`python run_keras_server.py`: build the settings once, then run a role.

- all:    a private Redis if needed, the model thread, then the HTTP server
- web:    the HTTP server alone (never imports TensorFlow)
- worker: the model loop alone
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from . import protocol
from .logs import configure_logging
from .queue import RequestQueue, connect
from .redis_launcher import RedisUnavailable, ensure_redis
from .settings import Settings, SettingsError, load_settings
from .worker import CLAIM_WAIT_S, ModelLoadError, ModelThread, Predictor, Worker, load_and_warm_up

log = logging.getLogger("keras_server")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"run_keras_server.py: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    _exit_on_sigterm()
    try:
        with contextlib.ExitStack() as cleanup:
            if settings.role == "all":
                settings, private_redis = ensure_redis(settings)
                if private_redis:
                    cleanup.callback(private_redis.close)
            if settings.role == "web":
                serve_http(settings)
            elif settings.role == "worker":
                run_worker(settings)
            else:
                run_all(settings)
    except (RedisUnavailable, ModelLoadError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so cleanups (the private Redis) still run."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _loader(settings: Settings) -> functools.partial[Predictor]:
    # Keras is imported only here, so `--role web` never loads TensorFlow.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from .model import load_classifier

    return functools.partial(load_classifier, settings.weights, settings.engine)


def _make_worker(settings: Settings, predictor: Predictor) -> Worker:
    client = connect(settings.redis_url, block_seconds=CLAIM_WAIT_S)
    queue = RequestQueue(client, protocol.Keys(settings.queue_name))
    return Worker(queue, predictor, settings.batch_size, result_ttl=settings.result_timeout)


def run_worker(settings: Settings) -> None:
    predictor = load_and_warm_up(_loader(settings), settings.batch_size)
    stop = threading.Event()
    log.info("worker serving queue %r at %s", settings.queue_name, settings.redis_url)
    try:
        _make_worker(settings, predictor).run(stop)
    finally:
        stop.set()


def run_all(settings: Settings) -> None:
    thread = ModelThread(
        load=_loader(settings),
        make_worker=functools.partial(_make_worker, settings),
        batch_size=settings.batch_size,
    )
    thread.start()
    thread.wait_until_ready()
    try:
        serve_http(settings)
    finally:
        thread.stop.set()
        thread.join(timeout=CLAIM_WAIT_S * 4)


def serve_http(settings: Settings) -> None:
    from .web import create_app

    app = create_app(settings)
    log.info("listening on http://%s:%d/predict", settings.host, settings.port)
    # The Flask development server: fine for one machine and demos.
    app.run(host=settings.host, port=settings.port, threaded=True, use_reloader=False)
