"""Why the model said it, over HTTP: `POST /explain` (the default model),
`POST /models/<name>/explain` and `POST /models/<name>/versions/<v>/explain`.

The upload is `/predict`'s, one `image` field; the options come as form
fields or query parameters:

    method   occlusion (the default, any engine) or gradcam (the keras engine)
    class    the class to explain: an index or a label (default: the most likely)
    grid     occlusion's N x N grid (default --explain-grid; 2 to 16)
    format   json (the default) or png; `Accept: image/png` asks for png too

The answer is `/predict`'s body (`{"success": true, "predictions": [...],
"model"}`) with `"explanation"`: the method, the class explained, its
probability, the heat map (`rows` x `columns` importances in [0, 1]) and how
many images the model was shown for it; or the PNG overlay of the heat map
on the image at the model's input size (`X-Explained-Class` names the class's
index). The serving core does the work (serving/explain.py), at the lowest
priority level within the request's `X-Request-Timeout`. Errors are
`/predict`'s. TensorFlow-free.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify, request

from keras_server.serving import explain as core
from keras_server.serving.admission import Urgency
from keras_server.serving.failures import BadInput
from keras_server.serving.pipeline import Image
from keras_server.web import auth, state
from keras_server.web.uploads import request_files

log = logging.getLogger(__name__)

PNG, JSON = "image/png", "application/json"
FORMATS = ("json", "png")
CLASS_HEADER = "X-Explained-Class"

blueprint = Blueprint("explain", __name__)


@blueprint.post("/explain")
@blueprint.post("/models/<name>/explain")
@blueprint.post("/models/<name>/versions/<version>/explain")
def explain(name: str | None = None, version: str | None = None) -> Response:
    """The default model, or `name`; pinned to `version`: explained by that
    version's workers alone."""
    pipeline = state().pipeline
    settings = pipeline.settings
    # Its level is always the lowest; X-Priority is still checked, as everywhere.
    timeout = Urgency.from_headers(request.headers, settings).timeout
    target = pipeline.target(name, version)
    model = target[0]
    fields: dict[str, str] = {}
    uploads = request_files(fields).get("image", [])
    options = {**request.args.to_dict(), **fields}
    ask = core.Ask(
        core.method_of(options.get("method")),
        core.target_of(options.get("class")),
        core.grid_of(options.get("grid"), settings.explain_grid),
    )
    png = _wants_png(options.get("format"))
    if len(uploads) != 1:
        raise BadInput(
            f"{len(uploads)} files in the 'image' field: /explain takes one, as "
            "multipart/form-data with image=@FILE"
        )
    found = core.explain(
        pipeline, target, Image(data=uploads[0].data), ask, timeout, caller=auth.caller()
    )
    if png:
        response = Response(core.overlay_png(found.pixels, found.heatmap), mimetype=PNG)
        response.headers[CLASS_HEADER] = str(found.index)
        return response
    body = {"success": True, "predictions": found.predictions(model.spec.top_k)}
    if found.model:
        body["model"] = found.model
    body["explanation"] = found.as_dict()
    return jsonify(body)


def _wants_png(format_: str | None) -> bool:
    """`format=png`, or an Accept that prefers a PNG to JSON."""
    if format_:
        if format_ not in FORMATS:
            raise BadInput(f"format must be one of {', '.join(FORMATS)}, not {format_!r}")
        return format_ == "png"
    return request.accept_mimetypes.best_match([JSON, PNG], default=JSON) == PNG
