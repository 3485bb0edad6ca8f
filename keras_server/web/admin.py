"""The admin API: each model's versions and its traffic policy, changed while
serving (serving/traffic.py), guarded by admin keys (`--admin-keys FILE`).

    GET    /admin/models                   every model: its live versions
                                           (workers of each) and its policy
    PUT    /admin/models/{name}/traffic    {"weights": {"1": 90, "2": 10}}
    DELETE /admin/models/{name}/traffic    back to `latest`

The admin keys are not the API keys: a file of `NAME KEY` lines (blank lines
and `#` comments skipped; a key as serving/keys.py's, 16 characters at least), shown
as `Authorization: Bearer KEY` or `X-Admin-Key: KEY`, checked in constant
time against every key. Without `--admin-keys` the routes are not there
(404), and the API-key check (auth.py) never applies under /admin/: one
kind of key per route. Weights are validated: an object of version ->
number, with a positive sum (else 400), each weighted version with live
workers now (else 409). Every change is logged with the admin key's name
(never the key). Errors are `{"error": "..."}`. TensorFlow-free.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from keras_server.serving.failures import BadInput, Conflict, NotFound
from keras_server.serving.keys import (
    KEY,
    MIN_KEY_LENGTH,
    ApiKeys,
    KeyEntry,
    KeysFileError,
    Rejected,
    key_from,
    read_keys_file,
)
from keras_server.serving.models import ServedModel
from keras_server.serving.traffic import Policy, PolicyError, latest, store_policy
from keras_server.web import auth, state

log = logging.getLogger(__name__)

HEADER = "X-Admin-Key"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

blueprint = Blueprint("admin", __name__, url_prefix="/admin")


def load_admin_keys(path: str) -> ApiKeys:
    """The `NAME KEY` lines of `path`, held as the API keys are (SHA-256
    digests, each compared in constant time: serving/keys.py), each entry
    named; KeysFileError (naming the line, never a key) when the file is
    unusable."""
    keys: dict[str, tuple[str, int]] = {}  # name -> (key, line)
    for number, raw in enumerate(read_keys_file("--admin-keys", path).splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, key = line.partition(" ")
        key = key.strip()
        where = f"--admin-keys {path}, line {number}"
        if not NAME.match(name) or not key:
            raise KeysFileError(
                f"{where}: write NAME KEY (a name of letters, digits and . _ @ -, a space, the key)"
            )
        if not KEY.match(key) or len(key) < MIN_KEY_LENGTH:
            raise KeysFileError(
                f"{where}: a key is at least {MIN_KEY_LENGTH} letters, digits "
                "and . _ ~ + / - (then = padding)"
            )
        if name in keys:
            raise KeysFileError(f"{where}: the name {name!r} is used twice")
        keys[name] = (key, number)
    if not keys:
        raise KeysFileError(f"--admin-keys {path}: no keys in it (NAME KEY per line)")
    return ApiKeys([(key, KeyEntry(name, None, line)) for name, (key, line) in keys.items()])


def owns(path: str) -> bool:
    """Whether `path` is the admin API's: its errors take its shape."""
    return path == "/admin" or path.startswith("/admin/")


def install(app: Flask, keys_file: str) -> None:
    """Serve the admin API on `app` when `keys_file` is given (else 404)."""
    if not keys_file:
        return
    keys = load_admin_keys(keys_file)
    app.extensions["keras_server.admin"] = keys
    app.register_blueprint(blueprint)
    log.info("admin API on (%d admin keys)", len(keys))


@blueprint.before_request
def require_admin_key() -> None:
    keys: ApiKeys = current_app.extensions["keras_server.admin"]
    try:
        key = key_from(request.headers.get("Authorization"), request.headers.get(HEADER))
    except Rejected as rejected:
        log.warning("admin: refused %s %s: no key", request.method, request.path)
        raise auth.unauthorized(
            "an admin key is required: send 'Authorization: Bearer <key>' or 'X-Admin-Key: <key>'",
            rejected.error,
        ) from None
    entry = keys.identify(key)
    if entry is None:
        log.warning("admin: refused %s %s: unknown key", request.method, request.path)
        raise auth.unauthorized("the admin key is not valid", "invalid_token")
    g.admin = entry.name


def _model(name: str) -> ServedModel:
    model = state().pipeline.deployment.get(name)
    if model is None:
        raise NotFound(f"no model named {name!r}; GET /admin/models lists them")
    return model


def describe(model: ServedModel) -> dict[str, Any]:
    """A model's live versions (workers of each), its policy, and the
    version `latest` names now (read from Redis now, not the cached view)."""
    view = model.router.read(0.0)
    counts: dict[str, int] = {}
    for info in model.live_workers():
        version = info.version or model.spec.version
        counts[version] = counts.get(version, 0) + 1
    return {
        "name": model.name,
        "default": model.name == state().pipeline.deployment.default,
        "versions": [
            {"version": v, "live_workers": n} for v, n in sorted(counts.items(), key=lambda c: c[0])
        ],
        "latest": latest(frozenset(view.live)) if view.live else None,
        "traffic": view.policy.as_dict(),
    }


@blueprint.get("/models")
def list_models() -> Response:
    deployment = state().pipeline.deployment
    deployment.discover()
    models = deployment.models.values()
    return jsonify(models=[describe(m) for m in models])


@blueprint.put("/models/<name>/traffic")
def put_traffic(name: str) -> Response:
    model = _model(name)
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or "weights" not in body:
        raise BadInput('send JSON {"weights": {"VERSION": WEIGHT, ...}}')
    try:
        policy = Policy.from_weights(body["weights"])
    except PolicyError as exc:
        raise BadInput(str(exc)) from None
    live = model.router.read(0.0, fresh=True).live
    missing = sorted(v for v, w in (policy.weights or {}).items() if w > 0 and v not in live)
    if missing:
        raise Conflict(
            f"model {name!r}: no live worker for version(s) {', '.join(missing)}; "
            f"live: {', '.join(sorted(live)) or 'none'}"
        )
    store_policy(model.router, policy)
    log.warning("admin %s: model %r traffic set to %s", g.admin, name, policy.as_dict())
    return jsonify(describe(model))


@blueprint.delete("/models/<name>/traffic")
def delete_traffic(name: str) -> Response:
    model = _model(name)
    store_policy(model.router, Policy())
    log.warning("admin %s: model %r traffic back to latest", g.admin, name)
    return jsonify(describe(model))
