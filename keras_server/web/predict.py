"""The JSON API, over the serving core: `POST /predict` (the default model),
`POST /models/<name>/predict`, `POST /models/<name>/versions/<v>/predict`
(pinned to that version) and `GET /models`.

A predict route only reads HTTP: the `image` fields of a multipart upload,
`X-Priority` and `X-Request-Timeout` (serving/admission.py), the caller
(web/auth.py); the pipeline (serving/pipeline.py) does the rest. One image
answers the seed's contract, `{"success": true, "predictions": [...]}`;
several `image` fields answer `200 {"success": true, "results": [...]}`,
one item per field, in order: the single-image body plus `"filename"` and
`"status"`, the HTTP status that image alone would have had (a bad file
fails only its own item). Errors are `{"success": false, "error": "..."}`
with the status of the core's table (web/errors.py). With the response cache
on for the model, `X-Cache` says hit, miss or partial (not with --api-keys:
it would tell one key whether another sent the same image). TensorFlow-free.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request

from keras_server.broker import messages
from keras_server.serving.admission import Urgency
from keras_server.serving.failures import BadInput, Failure, too_many
from keras_server.serving.pipeline import Answered, Form, Image
from keras_server.serving.traffic import version_order
from keras_server.web import auth, state
from keras_server.web.uploads import request_files

log = logging.getLogger(__name__)

CACHE_HEADER = "X-Cache"

blueprint = Blueprint("predict", __name__)


def render(failure: Failure) -> Response:
    """This API's error shape."""
    return jsonify(success=False, error=failure.message)


@blueprint.post("/predict")
@blueprint.post("/models/<name>/predict")
@blueprint.post("/models/<name>/versions/<version>/predict")
def predict(name: str | None = None, version: str | None = None) -> Response:
    """The default model, or `name`; pinned to `version`: answered by that
    version's workers alone (serving/traffic.py)."""
    pipeline = state().pipeline
    settings = pipeline.settings
    # Checked before the upload is read: a bad header costs no decoding.
    urgency = Urgency.from_headers(request.headers, settings)
    model, route = pipeline.target(name, version)
    uploads = request_files().get("image", [])
    if not uploads:
        raise BadInput("no file in the 'image' field: send multipart/form-data with image=@FILE")
    if len(uploads) > settings.max_images:
        raise too_many(len(uploads), settings.max_images)
    images = [Image(data=u.data) for u in uploads]
    answered = pipeline.run(model, route, images, Form(), urgency, caller=auth.caller())
    if len(uploads) == 1:
        answer = answered.answers[0]
        if isinstance(answer, Failure):
            raise answer
        response = jsonify(messages.decode_result(answer))
    else:
        items = [
            {"filename": upload.filename, **_item(answer)}
            for upload, answer in zip(uploads, answered.answers, strict=True)
        ]
        response = jsonify(success=True, results=items)
    return _cache_header(response, answered)


def _item(answer: bytes | Failure) -> dict[str, Any]:
    """One image's item of a several-image answer."""
    if isinstance(answer, Failure):
        return {"status": answer.status, "success": False, "error": answer.message}
    return {"status": 200, **messages.decode_result(answer)}


def _cache_header(response: Response, answered: Answered) -> Response:
    if answered.cache and not state().settings.api_keys:
        response.headers[CACHE_HEADER] = answered.cache
    return response


@blueprint.get("/models")
def list_models() -> Response:
    deployment = state().pipeline.deployment
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
