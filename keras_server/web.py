"""The HTTP tier: a Flask app factory with `POST /predict`, health and metrics,
and the v2 protocol's blueprint (v2.py).

A request is decoded and resized here, queued in Redis, and answered from its
own result key. Every answer, errors included, is JSON; no traceback ever
reaches a client. Several `image` fields are handed to fanout.py. This module
never imports Keras or TensorFlow.
"""

from __future__ import annotations

import io
import logging
import time
from typing import IO, Any

from flask import Flask, Request, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from . import auth, fanout, logs, metrics, protocol, v2
from .images import ImageError, return_freed_pixels_to_the_system
from .routing import Deployment, ServedModel
from .settings import Settings, load_settings
from .ui import blueprint as ui_blueprint
from .uploads import request_files

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


def error(status: int, message: str, **headers: str) -> Response:
    response = jsonify(success=False, error=message)
    response.status_code = status
    response.headers.update(headers)
    return response


def unavailable(message: str) -> Response:
    # Retry-After: a second is about one batch on a CPU; clients back off from there.
    return error(503, message, **{"Retry-After": "1"})


def wsgi_app() -> Flask:
    """The app for gunicorn (`keras_server.web:wsgi_app()`), configured from the
    KERAS_SERVER_* variables that `--role web` hands down."""
    settings = load_settings([])
    logs.configure_logging(settings.log_level)
    return create_app(settings)


def create_app(settings: Settings, deployment: Deployment | None = None) -> Flask:
    """The WSGI app. `deployment` defaults to the models and Redis shards that
    `settings` name."""
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.json.sort_keys = False  # keep an answer's keys in the order it is built: "success" first
    if deployment is None:
        deployment = Deployment.from_settings(settings)
    _add_request_log(app)
    auth.install(app, settings)  # before every route, those of blueprints too
    # One per process, shared by every route that decodes uploads and by all
    # their threads (gunicorn workers each have their own).
    decode = fanout.Decoder(settings)
    return_freed_pixels_to_the_system()
    _add_predict(app, settings, deployment, decode)
    _add_operations(app, settings, deployment)
    _add_error_handlers(app, settings)
    app.register_blueprint(ui_blueprint)
    app.register_blueprint(v2.blueprint(settings, deployment, decode))
    return app


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


def _add_predict(
    app: Flask, settings: Settings, deployment: Deployment, decode: fanout.Decoder
) -> None:
    @app.post("/predict")
    def predict() -> Response | tuple[Any, int]:
        """The default model."""
        return classify(deployment.models[deployment.default])

    @app.post("/models/<name>/predict")
    def predict_with(name: str) -> Response | tuple[Any, int]:
        model = deployment.get(name)
        if model is None:
            return error(404, f"no model named {name!r}; GET /models lists them")
        return classify(model)

    @app.get("/models")
    def list_models() -> Response:
        described = []
        survey = deployment.survey()
        for model in deployment.models.values():
            workers = survey.live_workers(model.name)
            size = model.input_size(workers)
            described.append(
                {
                    "name": model.name,
                    "default": model.name == deployment.default,
                    "input_size": list(size) if size else None,
                    "labels": max((w.labels for w in workers), default=0) or None,
                    "live_workers": len(workers),
                    "description": workers[0].model if workers else None,
                    "engine": (workers[0].engine or None) if workers else None,
                    "precision": (workers[0].precision or None) if workers else None,
                    "fidelity": workers[0].fidelity if workers else None,
                }
            )
        return jsonify(default=deployment.default, models=described)

    def classify(model: ServedModel) -> Response | tuple[Any, int]:
        uploads = request_files().get("image", [])
        if len(uploads) > 1:
            return fanout.predict_many(model, uploads, settings, decode)
        if not uploads:
            return error(
                400, "no file in the 'image' field: send multipart/form-data with image=@FILE"
            )
        data = uploads[0].data
        if not data:
            return error(400, "the uploaded image file is empty")
        size = model.input_size()
        if size is None:
            return unavailable(f"model {model.name!r} has no live worker yet; retry shortly")
        try:
            image = decode(data, size)
        except ImageError as exc:
            return error(exc.status, str(exc), **exc.headers)

        job = protocol.ImageRequest.create(image, settings.result_timeout)
        try:
            raw = fanout.submit(model, [job], settings).get(job.id)
        except fanout.Refused as exc:
            return error(exc.status, exc.message, **exc.headers)
        if raw is None:
            return error(504, fanout.timed_out(settings))
        result = protocol.decode_result(raw)
        return jsonify(result), 200 if result["success"] else 500


def _add_operations(app: Flask, settings: Settings, deployment: Deployment) -> None:
    @app.get("/healthz")
    def healthz() -> Response:
        """Liveness: the process answers. Nothing else is checked."""
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> Response | tuple[Response, int]:
        """Ready when, for every model, a worker beats on every reachable shard.

        A shard that is down does not make the server unready while another
        serves (/predict skips it too), but it is reported.
        """
        survey = deployment.survey()
        down = {f"Redis at {s.shard} is unreachable: {s.error}" for s in survey if not s.reachable}
        missing = []
        for model in deployment.models:
            reachable = [s for s in survey.of(model) if s.reachable]
            missing += [
                f"no live worker for model {model!r} at {s.shard}"
                for s in reachable
                if not s.workers
            ]
            if not reachable:
                missing.append(f"no reachable Redis shard for model {model!r}")
        if missing:
            return jsonify(ready=False, reason="; ".join([*sorted(down), *missing])), 503
        workers = survey.live_workers()
        body: dict[str, Any] = {
            "ready": True,
            "workers": len(workers),
            "models": sorted({w.model for w in workers}),
        }
        if down:
            body["unreachable"] = sorted(down)
        return jsonify(body)

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        body, content_type = metrics.exposition(deployment)
        return Response(body, content_type=content_type)


def _add_error_handlers(app: Flask, settings: Settings) -> None:
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        response = exc.get_response()
        allowed = response.headers.get("Allow", "POST")
        messages = {
            405: f"{request.method} is not allowed here; use {allowed}",
            413: f"the upload is larger than the {settings.max_upload_mb:g} MB limit",
        }
        body = error(exc.code or 500, messages.get(exc.code or 0, exc.description or exc.name))
        for name in ("Allow", "Retry-After"):
            if name in response.headers:
                body.headers[name] = response.headers[name]
        return body

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error(500, "internal server error; the server log has the details")
