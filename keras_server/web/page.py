"""The browser face of the API: the upload page at `GET /`, its assets, and the
OpenAPI description at `GET /openapi.json`.

Everything is a package file (`assets/`, `openapi.json`), served as it is: no
templates, no build step, nothing fetched from elsewhere at run time. Every
URL the page uses is relative, so it works from `--role web` directly and
behind a proxy that mounts the service under a sub-path.
"""

from __future__ import annotations

import logging
from importlib import resources

from flask import Blueprint, Response

log = logging.getLogger(__name__)

ASSETS = "assets"

# The page only talks to its own origin; images are previewed from blob: URLs.
# A policy this strict also proves, in the browser test, that nothing is
# loaded from anywhere else.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

blueprint = Blueprint(
    "ui",
    __name__,
    # Not "static": Flask(__name__) in app.py would then serve the same folder
    # a second time under its own implicit /static route.
    static_folder=ASSETS,
    static_url_path=f"/{ASSETS}",
)


def openapi_document() -> bytes:
    """The OpenAPI description, as shipped next to this module."""
    return resources.files(__package__).joinpath("openapi.json").read_bytes()


@blueprint.get("/")
def index() -> Response:
    response = blueprint.send_static_file("index.html")
    response.headers["Content-Security-Policy"] = PAGE_POLICY
    return response


@blueprint.get("/openapi.json")
def openapi() -> Response:
    return Response(openapi_document(), mimetype="application/json")


@blueprint.after_request
def no_sniffing(response: Response) -> Response:
    # Browsers must take our content types as given (an asset is never HTML).
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
