"""The HTTP front: granian serving the Flask app, for `--role web` and `--role all`.

`python -m keras_server.web.front` (started by cli.py with the resolved
settings as KERAS_SERVER_* variables) runs granian's supervisor, which forks
--web-workers processes; each builds the app with `boot_app()`.

Why granian: connections, request lines, headers and keep-alive are handled in
Rust (hyper on tokio), and a Python thread is taken only once a request's
headers are complete. A client that dribbles its headers (slowloris) therefore
holds no thread of the --web-threads pool, and is cut after --header-timeout
seconds; with cheroot or gunicorn gthread, 100 such connections starved every
other client (issue 23). Bodies are streamed to the app as it reads them, so
the API-key check and the 413 for a declared oversized body still come before
the body is read.

prometheus-client's multiprocess directory (PROMETHEUS_MULTIPROC_DIR) is set by
the launcher before this interpreter starts, as the library reads it at import;
it is removed here when the server stops. The web tier has no live-summed
gauges, so a dead worker's files need no marking.

SIGTERM or SIGINT: granian stops accepting, lets the requests in flight finish
(each has at most --result-timeout to wait for its prediction), then exits.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal

from flask import Flask
from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings
from granian.log import LogLevels
from granian.server import Server

from keras_server.logs import configure_logging
from keras_server.metrics import MULTIPROCESS_DIR_ENV
from keras_server.settings import Settings, load_settings
from keras_server.web.app import wsgi_app

log = logging.getLogger(__name__)

APP = "keras_server.web.front:boot_app"


def boot_app() -> Flask:
    """The app, built in each granian worker before it serves.

    Until granian installs the worker's own signal handlers (after this
    returns), SIGTERM reaches the supervisor's handler, inherited through the
    fork, which does nothing in a worker: a worker still booting when the
    server is stopped would start serving anyway and the stop would hang. It
    holds no request yet, so the default action, exit, is the right one.
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    return wsgi_app()


def build_server(settings: Settings) -> Server:
    """granian for `settings`: --web-workers processes of --web-threads threads."""
    return Server(
        APP,
        factory=True,
        interface=Interfaces.WSGI,
        address=settings.host,
        port=settings.port,
        workers=settings.web_workers,
        # Each request holds a thread while it blocks in Redis for its answer.
        blocking_threads=settings.web_threads,
        http=HTTPModes.http1,
        websockets=False,
        http1_settings=HTTP1Settings(header_read_timeout=int(settings.header_timeout * 1000)),
        # A worker that ignores SIGTERM past its requests' deadline is killed.
        workers_kill_timeout=int(settings.result_timeout) + 5,
        # The app logs one line per request, with its request id.
        log_access=False,
        # granian's own lines go through our handler and format, as one log.
        log_level=LogLevels(settings.log_level.lower()),
        log_dictconfig={"loggers": {"_granian": {"handlers": [], "propagate": True}}},
    )


def main() -> None:
    settings = load_settings([])
    configure_logging(settings.log_level)
    log.info(
        "listening on http://%s:%d/predict (%d web processes of %d threads)",
        settings.host,
        settings.port,
        settings.web_workers,
        settings.web_threads,
    )
    try:
        build_server(settings).serve()
    finally:
        directory = os.environ.get(MULTIPROCESS_DIR_ENV)
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
