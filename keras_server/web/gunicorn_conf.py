"""gunicorn configuration for `run_keras_server.py --role web`.

Everything comes from the server's own settings (KERAS_SERVER_* variables,
handed down by the launcher), so the timeouts always agree with
--result-timeout: a request may wait result_timeout seconds for its
prediction, so a worker is not killed for silence before that, and SIGTERM
gives in-flight requests that long to finish (graceful_timeout).

Usable directly too:
    KERAS_SERVER_PORT=5000 PROMETHEUS_MULTIPROC_DIR=$(mktemp -d) \\
        gunicorn -c keras_server/web/gunicorn_conf.py 'keras_server.web.app:wsgi_app()'
"""

from __future__ import annotations

import os
import shutil

from prometheus_client import multiprocess

from keras_server.metrics import MULTIPROCESS_DIR_ENV
from keras_server.settings import load_settings

_settings = load_settings([])

_host = f"[{_settings.host}]" if ":" in _settings.host else _settings.host
bind = [f"{_host}:{_settings.port}"]
workers = _settings.web_workers
# Each request holds a thread while it blocks in Redis for its answer.
worker_class = "gthread"
threads = _settings.web_threads
timeout = int(_settings.result_timeout) + 30
graceful_timeout = int(_settings.result_timeout) + 5
keepalive = 5
# The app logs one line per request, with its request id.
accesslog = None
limit_request_line = 8190
proc_name = "keras-server-web"


def child_exit(server: object, worker: object) -> None:
    """A dead worker's live gauges must not be summed forever."""
    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]


def on_exit(server: object) -> None:
    directory = os.environ.get(MULTIPROCESS_DIR_ENV)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
