"""The web process: HTTP adapters over the serving core (keras_server/serving/).
Each parses its transport, calls the core, and renders the core's answer or
failure; none decides anything the gRPC front would decide differently.

    app          the Flask app factory and the app's state (AppState)
    predict      the JSON API: /predict, /models/<name>[/versions/<v>]/predict, GET /models
    explain      why: /explain, /models/<name>[/versions/<v>]/explain (a heat map)
    probes       /healthz, /readyz and /metrics (the queue gauges: RedisCollector)
    v2           the Open Inference Protocol (KServe v2) over REST, under /v2
    jobs         asynchronous jobs: POST /jobs, GET and DELETE /jobs/<id>
    admin        the admin API (--admin-keys): versions and traffic while serving
    errors       failures -> HTTP answers, from the core's one table
    auth         API keys over HTTP: the key check before every route, RateLimit-*
    cors         CORS (--cors-origins): preflights, headers on every answer
    uploads      the files of a multipart upload (python-multipart)
    archives     a job's zip or tar: its files, with the unsafe ones refused
    page         the upload page at / and the OpenAPI description
    front        the HTTP server (granian) for --role web and all, from our settings

`state()` is the state of the app handling the current request (app.AppState).
Never imports an engine, the worker or the gRPC front (import-linter checks it
in `make test`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app

if TYPE_CHECKING:
    from keras_server.web.app import AppState

EXTENSION = "keras_server"


def state() -> AppState:
    """The state of the app handling the current request, stored by create_app."""
    found: AppState = current_app.extensions[EXTENSION]
    return found
