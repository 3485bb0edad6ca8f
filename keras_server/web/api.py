"""The JSON API's routes, as a module-level Flask blueprint that
`web.create_app` registers: `POST /predict`, `POST /models/<name>/predict`,
`GET /models`, and the operations routes `/healthz`, `/readyz`, `/metrics`.

What a route needs of its app (the settings, the deployment it routes to, the
decoder shared by every route that decodes) is one `AppState`, stored once by
`create_app` and read with `state()`: the routes themselves are plain
functions, like page.py's and v2.py's. A request is decoded and resized here,
queued in Redis, and answered from its own result key; several `image`
fields are handed to dispatch.py. With the response cache on for the model
(web/response_cache.py), an upload is looked up before it is decoded, and
`X-Cache` says whether the answer came from it. Errors are errors.HttpError
(or left to errors.py to classify), answered `{"success": false, "error":
"..."}`: the blueprint's handlers, and the app's for what no blueprint
routes. The predict routes take `X-Priority` and `X-Request-Timeout`
(dispatch.Urgency). TensorFlow-free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from keras_server import metrics
from keras_server.broker import messages
from keras_server.settings import Settings
from keras_server.web import dispatch, errors
from keras_server.web.deployment import Deployment, ServedModel
from keras_server.web.response_cache import HEADER, ResponseCache, top_k_form
from keras_server.web.routing import Route, version_order
from keras_server.web.uploads import request_files

log = logging.getLogger(__name__)

EXTENSION = "keras_server"

blueprint = Blueprint("api", __name__)


@dataclass(frozen=True)
class AppState:
    """Everything the routes of one app read: made once, by `web.create_app`."""

    settings: Settings
    deployment: Deployment
    # One per process, shared by every route that decodes uploads and by all
    # their threads (each web process has its own).
    decoder: dispatch.Decoder
    # The shared response cache; None when it is off for every model.
    cache: ResponseCache | None = None

    def install(self, app: Flask) -> None:
        app.extensions[EXTENSION] = self


def state() -> AppState:
    """The state of the app handling the current request."""
    found: AppState = current_app.extensions[EXTENSION]
    return found


def render(error: errors.HttpError) -> Response:
    """This API's error shape."""
    return jsonify(success=False, error=error.message)


errors.install(blueprint, render)


@blueprint.post("/predict")
def predict() -> Response | tuple[Any, int]:
    """The default model."""
    deployment = state().deployment
    return classify(deployment.models[deployment.default])


@blueprint.post("/models/<name>/predict")
def predict_with(name: str) -> Response | tuple[Any, int]:
    return classify(_model(name))


@blueprint.post("/models/<name>/versions/<version>/predict")
def predict_with_version(name: str, version: str) -> Response | tuple[Any, int]:
    """Pinned: answered by that version's workers alone (web/routing.py)."""
    return classify(_model(name), version)


def _model(name: str) -> ServedModel:
    model = state().deployment.get(name)
    if model is None:
        raise errors.HttpError(404, f"no model named {name!r}; GET /models lists them")
    return model


@blueprint.get("/models")
def list_models() -> Response:
    deployment = state().deployment
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
                "versions": sorted(
                    {w.version or model.spec.version for w in workers}, key=version_order
                ),
                "description": workers[0].description if workers else None,
                "engine": (workers[0].engine or None) if workers else None,
                "precision": (workers[0].precision or None) if workers else None,
                "fidelity": workers[0].fidelity if workers else None,
            }
        )
    return jsonify(default=deployment.default, models=described)


def classify(model: ServedModel, version: str | None = None) -> Response | tuple[Any, int]:
    """`version`: the version pinned (None: the model's traffic policy's)."""
    settings, decode = state().settings, state().decoder
    # Checked before the upload is read: a bad header costs no decoding.
    urgency = dispatch.Urgency.from_headers(request.headers, settings)
    route = model.router.route(version)
    uploads = request_files().get("image", [])
    cache = state().cache
    if cache and not cache.on_for(model):
        cache = None
    if len(uploads) > 1:
        return dispatch.predict_many(
            model, uploads, settings, decode, urgency=urgency, route=route, cache=cache
        )
    if not uploads:
        raise errors.HttpError(
            400, "no file in the 'image' field: send multipart/form-data with image=@FILE"
        )
    data = uploads[0].data
    if not data:
        raise errors.HttpError(400, "the uploaded image file is empty")
    looked = cache.lookup(model, top_k_form(model), [data], route.answered_by) if cache else None
    raw = looked.hits.get(0) if looked else None
    if raw is None:
        raw = _predict_one(model, data, urgency, route)
        if cache and looked:
            cache.store(looked, {0: raw})
    result = messages.decode_result(raw)
    response = jsonify(result)
    if looked:
        response.headers[HEADER] = looked.header
    return response, 200 if result["success"] else 500


def _predict_one(model: ServedModel, data: bytes, urgency: dispatch.Urgency, route: Route) -> bytes:
    """The worker's answer to one upload: decoded, queued as `route` says, awaited."""
    settings, decode = state().settings, state().decoder
    size = model.input_size()
    if size is None:
        raise errors.no_live_worker(model.name)
    image = decode(data, size)  # an ImageError is answered by errors.py
    job = messages.ImageRequest.create(
        image, urgency.timeout, priority=urgency.priority, version=dispatch.pinned(route)
    )
    raw = dispatch.submit(model, [job], settings, route).get(job.id)
    if raw is None:
        raise errors.HttpError(504, dispatch.timed_out(urgency.timeout))
    return raw


@blueprint.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers. Nothing else is checked."""
    return jsonify(status="ok")


@blueprint.get("/readyz")
def readyz() -> Response | tuple[Response, int]:
    """Ready when, for every model, a worker beats on every reachable shard.

    A shard that is down does not make the server unready while another
    serves (/predict skips it too), but it is reported.
    """
    deployment = state().deployment
    survey = deployment.survey()
    down = {f"Redis at {s.shard} is unreachable: {s.error}" for s in survey if not s.reachable}
    missing = deployment.unready(survey)
    if missing:
        return jsonify(ready=False, reason="; ".join([*sorted(down), *missing])), 503
    loops = survey.live_workers()  # one heartbeat per claim loop, per shard
    body: dict[str, Any] = {
        "ready": True,
        "workers": len({(w.host, w.pid) for w in loops}),  # processes
        "claim_loops": len(loops),
        "models": sorted({w.description for w in loops}),
    }
    if down:
        body["unreachable"] = sorted(down)
    return jsonify(body)


@blueprint.get("/metrics")
def metrics_endpoint() -> Response:
    body, content_type = metrics.exposition(state().deployment)
    return Response(body, content_type=content_type)
