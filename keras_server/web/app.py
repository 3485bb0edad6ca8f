"""The HTTP tier: the Flask app factory. `create_app` only assembles the app:
its state (`AppState`: the settings and the serving core, serving/pipeline.py,
that every route reads with `web.state()`), the request's span when tracing
is on (tracing.server_span), the request log and metrics (labelled with the
model and version that answered, as the pipeline names them), CORS
(cors.py), the API-key check (auth.py), the blueprints (predict.py,
explain.py, probes.py, page.py, v2.py, jobs.py, admin.py) and errors.py's
handlers, each failure in the shape of the
API its path belongs to, and what a route left unread of a body drained
(uploads.finish_body).

Every answer, errors included, is JSON; no traceback ever reaches a client.
This module never imports Keras or TensorFlow.
"""

from __future__ import annotations

import functools
import io
import logging
import time
from dataclasses import dataclass
from typing import IO

from flask import Flask, Request, Response, g, jsonify, request

from keras_server import logs, metrics, tracing
from keras_server.images import single_threaded_resize
from keras_server.serving.cache import ResponseCache
from keras_server.serving.failures import Failure
from keras_server.serving.models import Deployment
from keras_server.serving.pipeline import UNKNOWN, Decoder, Pipeline, who_answered
from keras_server.serving.quotas import Limiter
from keras_server.settings import Settings, load_settings
from keras_server.web import (
    EXTENSION,
    admin,
    auth,
    cors,
    errors,
    explain,
    jobs,
    page,
    predict,
    probes,
    uploads,
    v2,
)

log = logging.getLogger(__name__)

# Probes and scrapes every few seconds would drown the request log.
QUIET_ENDPOINTS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"}
)


@dataclass(frozen=True)
class AppState:
    """What every route of one app reads: made once, by `create_app`."""

    settings: Settings
    pipeline: Pipeline


class InMemoryRequest(Request):
    """Uploads stay in memory: they are capped by MAX_CONTENT_LENGTH anyway,
    and an image must never land on disk (werkzeug spools files > 500 KB)."""

    def _get_file_stream(self, *args: object, **kwargs: object) -> IO[bytes]:
        return io.BytesIO()


def wsgi_app() -> Flask:
    """The app for the HTTP front (web/front.py: granian's factory
    `keras_server.web.app:wsgi_app`), configured from the KERAS_SERVER_*
    variables that cli.py hands down."""
    settings = load_settings([])
    logs.configure_logging(settings.log_level)
    tracing.configure(settings, "web")  # here, in each web process: after granian's fork
    return create_app(settings)


def create_app(settings: Settings, deployment: Deployment | None = None) -> Flask:
    """The WSGI app. `deployment` defaults to the models and Redis shards that
    `settings` name."""
    app = Flask(__name__)
    if tracing.enabled():
        _add_request_span(app)  # first, so that its span covers every other hook
    app.request_class = InMemoryRequest
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.json.sort_keys = False  # keep an answer's keys in the order it is built: "success" first
    if deployment is None:
        deployment = Deployment.from_settings(settings)
    limiter = Limiter.from_settings(settings) if settings.api_keys else None
    pipeline = Pipeline(
        settings,
        deployment,
        Decoder(settings),
        ResponseCache.from_settings(settings, deployment),
        limiter,
    )
    app.extensions[EXTENSION] = AppState(settings, pipeline)
    single_threaded_resize()  # several web processes share the cores already
    _add_request_log(app)
    cors.install(app, settings)  # on every answer, errors included
    auth.install(app, settings, limiter)  # before every route, those of blueprints too
    for blueprint in (predict, explain, probes, page, v2, jobs):
        app.register_blueprint(blueprint.blueprint)
    admin.install(app, settings.admin_keys)  # 404 without --admin-keys
    errors.install(app, settings, _render)
    app.after_request(functools.partial(uploads.finish_body, limit=settings.max_upload_bytes))
    return app


def _add_request_span(app: Flask) -> None:
    """The HTTP request's span (tracing.server_span: route, status; an
    incoming W3C traceparent continued), the probes left out as in the log.
    Our own hooks: OpenTelemetry's Flask instrumentation cost 0.5-0.85 ms of
    CPU per request here, this a fifth of that (BENCHMARKS.md#tracing)."""

    @app.before_request
    def start_span() -> None:
        route = request.url_rule.rule if request.url_rule else None
        if route not in QUIET_ENDPOINTS:
            g.span = tracing.server_span(request.method, route, request.path, request.headers)

    @app.after_request
    def status(response: Response) -> Response:
        if span := g.get("span"):
            span.status(response.status_code)
        return response

    @app.teardown_request
    def end_span(error: BaseException | None) -> None:
        if span := g.pop("span", None):
            span.end(error)


def _render(failure: Failure) -> Response:
    """A failure in the shape of the API the path belongs to."""
    if v2.owns(request.path) or admin.owns(request.path):
        return jsonify(error=failure.message)  # their shape: {"error"}
    return predict.render(failure)


def _add_request_log(app: Flask) -> None:
    @app.before_request
    def start() -> None:
        g.started = time.perf_counter()
        logs.request_id.set("-")
        who_answered.set(UNKNOWN)  # the pipeline names who answered (metrics.ANSWERED_BY)

    @app.after_request
    def finish(response: Response) -> Response:
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        # Label by route, not raw path, so scanners cannot blow up the series.
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        by = who_answered.get()
        metrics.REQUESTS.labels(endpoint, str(response.status_code), by.model, by.version).inc()
        metrics.REQUEST_SECONDS.labels(endpoint, by.model, by.version).observe(elapsed)
        if endpoint not in QUIET_ENDPOINTS:
            log.info(
                "%s %s %d in %.0f ms",
                request.method,
                request.path,
                response.status_code,
                elapsed * 1000,
            )
        return response
