"""The HTTP error boundary: whatever a request raised becomes one of the
serving core's failures (serving/failures.py), answered with the HTTP status
of the core's one table (`ANSWERS`), its headers (Retry-After, RateLimit-*,
WWW-Authenticate), and a body in the shape of the API the path belongs to
(`/predict`'s `{"success": false, "error"}`, v2's `{"error"}`): the `render`
create_app gives `install`.

werkzeug's own errors (an unrouted path, a method the path does not take, a
body over the limit) are translated here (`from_http`). No traceback ever
reaches a client: a bug is logged once, with its traceback, where the core
makes its Failure. TensorFlow-free.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from keras_server.serving.failures import (
    BadInput,
    Failure,
    NotAllowed,
    NotFound,
    TooLarge,
    Unavailable,
    from_exception,
)
from keras_server.settings import Settings

log = logging.getLogger(__name__)


def from_http(exc: HTTPException, settings: Settings) -> Failure:
    """werkzeug's error in our words."""
    status = exc.code or 500
    if status == 405:
        allowed = exc.get_response().headers.get("Allow", "POST")
        return NotAllowed(
            f"{request.method} is not allowed here; use {allowed}", {"Allow": allowed}
        )
    if status == 413:
        if request.path == "/jobs":
            limit, flag, body = settings.max_job_upload_mb, "--max-job-upload-mb", "job"
        else:
            limit, flag = settings.max_upload_mb, "--max-upload-mb"
            body = "request" if request.path.startswith("/v2") else "upload"
        return TooLarge(f"the {body} is larger than the {limit:g} MB limit ({flag})")
    message = exc.description or exc.name
    if status == 404:
        return NotFound(message)
    if status == 503:
        return Unavailable(message)
    return BadInput(message)


def install(app: Flask, settings: Settings, render: Callable[[Failure], Response]) -> None:
    """Answer every error raised under `app` with `render` and the table's status."""

    def answer(failure: Failure) -> Response:
        response = render(failure)
        response.status_code = failure.status
        response.headers.update(failure.headers)
        return response

    app.register_error_handler(HTTPException, lambda exc: answer(from_http(exc, settings)))
    app.register_error_handler(Exception, lambda exc: answer(from_exception(exc)))
