"""The HTTP tier: the Flask app factory. `create_app` only assembles the app:
the per-app state the routes read (api.AppState), the request's span when
tracing is on (tracing.server_span), the request log, CORS (cors.py), the
API-key check and its quotas (auth.py, quotas.py), the blueprints (api.py's
JSON routes, page.py's page, v2.py's protocol) and, for what no blueprint
routes (an unknown path, a method a path does not take), errors.py's
handlers in /predict's shape.

Every answer, errors included, is JSON; no traceback ever reaches a client.
This module never imports Keras or TensorFlow.
"""

from __future__ import annotations

import io
import logging
import time
from typing import IO

from flask import Flask, Request, Response, g, request

from keras_server import logs, metrics, tracing
from keras_server.images import return_freed_pixels_to_the_system, single_threaded_resize
from keras_server.settings import Settings, load_settings
from keras_server.web import admin, api, auth, cors, dispatch, errors, jobs, page, v2
from keras_server.web.deployment import Deployment
from keras_server.web.response_cache import ResponseCache

log = logging.getLogger(__name__)

# Probes and scrapes every few seconds would drown the request log.
QUIET_ENDPOINTS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"}
)


class InMemoryRequest(Request):
    """Uploads stay in memory: they are capped by MAX_CONTENT_LENGTH anyway,
    and an image must never land on disk (werkzeug spools files > 500 KB)."""

    def _get_file_stream(
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
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
    cache = ResponseCache.from_settings(settings, deployment)
    api.AppState(settings, deployment, dispatch.Decoder(settings), cache).install(app)
    return_freed_pixels_to_the_system()
    single_threaded_resize()
    _add_request_log(app)
    cors.install(app, settings)  # on every answer, errors included
    auth.install(app, settings)  # before every route, those of blueprints too
    app.register_blueprint(api.blueprint)
    app.register_blueprint(page.blueprint)
    app.register_blueprint(v2.blueprint)
    app.register_blueprint(jobs.blueprint)
    admin.install(app, settings.admin_keys)  # 404 without --admin-keys
    errors.install(app, _render)
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


def _render(error: errors.HttpError) -> Response:
    """An error no blueprint's handlers took (an unrouted path, a method the
    path does not take, a refused API key): in the shape of the API the path
    belongs to."""
    return (v2.render if v2.owns(request.path) else api.render)(error)


def _add_request_log(app: Flask) -> None:
    @app.before_request
    def start() -> None:
        g.started = time.perf_counter()
        logs.request_id.set("-")

    @app.after_request
    def finish(response: Response) -> Response:
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        # Label by route, not raw path, so scanners cannot blow up the series.
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.REQUESTS.labels(endpoint, str(response.status_code)).inc()
        metrics.REQUEST_SECONDS.labels(endpoint).observe(elapsed)
        if endpoint not in QUIET_ENDPOINTS:
            log.info(
                "%s %s %d in %.0f ms",
                request.method,
                request.path,
                response.status_code,
                elapsed * 1000,
            )
        return response
