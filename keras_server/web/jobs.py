"""Asynchronous jobs over HTTP, a blueprint: `POST /jobs`, `GET /jobs/<id>`,
`DELETE /jobs/<id>` (the record itself: broker/jobs.py).

`POST /jobs` takes several `image` fields and/or one `archive` (zip or tar,
read by archives.py), up to --max-job-images in all, plus the optional form
fields `model` and `callback_url`. The body (up to --max-job-upload-mb) is
streamed to spooled temporary files, never held whole (uploads.py
read_job_body), and the images are read back one at a time, the archive's
too. Every image is decoded here, as for
`/predict`, and staged in Redis a chunk at a time; one that cannot be decoded
is a failed item of the job, not a refusal. Only once all are staged is the
job created (one transaction) and answered 202 with `Location`: from then
on the workers drive it, whether or not this process lives.

A job belongs to the API key that made it (its SHA-256 digest is kept, never
the key): with --api-keys, another key gets 404, as for a job that does not
exist. Errors are the JSON API's, `{"success": false, "error"}`.
TensorFlow-free.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import redis
from flask import Blueprint, Response, jsonify, request
from werkzeug.wsgi import get_input_stream

from keras_server import callbacks
from keras_server.broker import messages
from keras_server.broker.jobs import Job, JobStore
from keras_server.broker.request_queue import RequestQueue
from keras_server.images import DecoderBusy, ImageError
from keras_server.settings import Settings
from keras_server.web import api, auth, errors
from keras_server.web.archives import ArchiveRefused, files
from keras_server.web.deployment import ServedModel
from keras_server.web.uploads import JobBody, UploadRefused, read_job_body

log = logging.getLogger(__name__)

blueprint = Blueprint("jobs", __name__)
errors.install(blueprint, api.render)

# Images staged per Redis call: the web process holds at most this many
# decoded images of a job at once.
STAGE_CHUNK = 16
DEFAULT_PAGE = 100
MAX_PAGE = 1000
# How long one image waits for the decode budget before it counts as failed.
BUSY_TRIES = 100
BUSY_WAIT_S = 0.05


@blueprint.post("/jobs")
def submit() -> tuple[Response, int, dict[str, str]]:
    settings = api.state().settings
    with _read_body(settings) as body:
        return _submit(settings, body)


def _submit(settings: Settings, body: JobBody) -> tuple[Response, int, dict[str, str]]:
    model, callback_url = _check_submission(settings, body)
    size = model.input_size()
    if size is None:
        raise errors.no_live_worker(model.name)
    queue = model.shards.pick()
    if queue.jobs.backlog() >= settings.max_job_backlog:
        raise errors.unavailable(
            "the server holds as many job images as it may (--max-job-backlog); retry later"
        )
    entries = body.image_files()
    if body.archive is not None:
        room = settings.max_job_images - len(body.images)
        archived = files(body.archive, room, settings.max_archive_bytes, settings.max_upload_bytes)
        entries = _chain(entries, archived)
    job_id = os.urandom(16).hex()
    try:
        done = _stage(queue, job_id, model.name, size, entries,
                      callback_url=callback_url, settings=settings)  # fmt: skip
    except ArchiveRefused as exc:
        queue.jobs.discard(job_id)
        raise errors.HttpError(exc.status, exc.message) from None
    except BaseException:
        queue.jobs.discard(job_id)
        raise
    if done and callback_url:
        job = queue.jobs.get(job_id)
        if job is not None:
            _sender(settings).send(callback_url, callbacks.status_of(job, _url(job_id)))
    else:
        queue.jobs.feed(2 * settings.batch_size)  # an idle worker starts at once
    location = _url(job_id)
    return jsonify(id=job_id, status_url=location), 202, {"Location": location}


def _read_body(settings: Settings) -> JobBody:
    """The POST /jobs body, streamed from the WSGI input (uploads.py):
    its images and archive spooled, never held whole."""
    # werkzeug's own limit would be --max-upload-mb's; read_job_body counts.
    stream = get_input_stream(request.environ, max_content_length=None)
    try:
        return read_job_body(
            stream, request.content_type, request.content_length,
            max_body=settings.max_job_upload_bytes, max_image=settings.max_upload_bytes,
            fields=("model", "callback_url"),
        )  # fmt: skip
    except UploadRefused as exc:
        raise errors.HttpError(exc.status, exc.message) from None


def _check_submission(settings: Settings, body: JobBody) -> tuple[ServedModel, str]:
    """(the model, the callback URL) of a POST /jobs, or the HttpError that
    refuses it before anything is decoded."""
    if not body.images and body.archive is None:
        raise errors.HttpError(
            400, "no files: send 'image' fields and/or one 'archive' (zip or tar)"
        )
    if len(body.images) > settings.max_job_images:
        raise _too_many(settings)
    model = _model(body.fields.get("model") or None)
    callback_url = body.fields.get("callback_url", "")
    if callback_url:
        hosts = callbacks.allowed_hosts(settings.callback_hosts)
        why = callbacks.refusal(callback_url, hosts, settings.callback_secret)
        if why:
            raise errors.HttpError(400, why)
    return model, callback_url


def _chain(*parts: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
    for part in parts:
        yield from part


def _stage(
    queue: RequestQueue,
    job_id: str,
    model: str,
    size: tuple[int, int],
    entries: Iterator[tuple[str, bytes]],
    *,
    callback_url: str,
    settings: Settings,
) -> bool:
    """Decode and stage every entry, then create the job; whether it is done
    already (nothing to run)."""
    decode = api.state().decoder
    store: JobStore = queue.jobs
    deadline = time.time() + settings.job_ttl
    names: list[str] = []
    failures: dict[int, bytes] = {}
    chunk: list[bytes] = []
    for index, (name, data) in enumerate(entries):
        names.append(name)
        try:
            image = _decode(decode, data, size)
        except ImageError as exc:
            failures[index] = messages.error_result(str(exc))
            continue
        finally:
            del data  # one file's bytes at a time: not this one while the next is read
        request_id = messages.job_item_id(job_id, index)
        # The lowest level: a dead worker's claim of it goes back there, too.
        item = messages.ImageRequest(request_id, image, deadline, priority=settings.priority_levels)
        chunk.append(messages.encode_request(item))
        if len(chunk) >= STAGE_CHUNK:
            store.stage(job_id, chunk, settings.job_ttl)
            chunk = []
    if len(names) > settings.max_job_images:
        raise _too_many(settings)
    store.stage(job_id, chunk, settings.job_ttl)
    return store.create(
        job_id,
        model=model,
        owner=_owner(settings),
        names=names,
        failures=failures,
        ttl=settings.job_ttl,
        callback_url=callback_url,
    )


def _decode(decode: Any, data: bytes, size: tuple[int, int]) -> Any:
    """The image, waiting a while when the decode budget is spent by others."""
    if not data:
        raise ImageError("the uploaded image file is empty")
    for _ in range(BUSY_TRIES - 1):
        try:
            return decode(data, size)
        except DecoderBusy:
            time.sleep(BUSY_WAIT_S)
    return decode(data, size)


@blueprint.get("/jobs/<id>")
def status(id: str) -> Response:
    job_id = id
    store, job = _find(job_id)
    offset = _whole("offset", 0)
    limit = min(_whole("limit", DEFAULT_PAGE), MAX_PAGE)
    results = []
    for name, raw in store.items(job, offset, limit):
        item: dict[str, Any] = {"filename": name}
        if raw is not None:
            item.update(messages.decode_result(raw))
        elif job.state == "cancelled":
            item.update(success=False, error="the job was cancelled before this image ran")
        else:
            item["success"] = None  # not run yet
        results.append(item)
    body: dict[str, Any] = {
        "id": job.id,
        "state": job.state,
        "model": job.model,
        "total": job.total,
        "done": job.succeeded + job.failed,
        "succeeded": job.succeeded,
        "failed": job.failed,
        "created": job.created,
        "finished": job.finished,
        "offset": offset,
        "limit": limit,
        "results": results,
    }
    if offset + len(results) < job.total and results:
        body["next"] = f"{_url(job_id)}?offset={offset + len(results)}&limit={limit}"
    return jsonify(body)


@blueprint.delete("/jobs/<id>")
def cancel(id: str) -> Response:
    job_id = id
    store, job = _find(job_id)
    cancelled = store.cancel(job_id)
    state = "cancelled" if cancelled else (store.get(job_id) or job).state
    return jsonify(id=job_id, state=state, cancelled=cancelled)


def _find(job_id: str) -> tuple[JobStore, Job]:
    """The job and the store that holds it, on whichever model and shard;
    404 when there is none, or it belongs to another key."""
    settings, deployment = api.state().settings, api.state().deployment
    missing = errors.HttpError(404, f"no job {job_id!r} (jobs expire after --job-ttl)")
    if not job_id.isalnum() or len(job_id) > 64:
        raise missing
    for model in deployment.models.values():
        for queue in model.shards.up():
            try:
                job = queue.jobs.get(job_id)
            except redis.RedisError:
                continue  # marked down if unreachable; the job may be elsewhere
            if job is not None:
                if job.owner != _owner(settings):
                    raise missing
                return queue.jobs, job
    raise missing


def _model(name: str | None) -> ServedModel:
    model = api.state().deployment.get(name)
    if model is None:
        raise errors.HttpError(404, f"no model named {name!r}; GET /models lists them")
    return model


def _owner(settings: Settings) -> str:
    """Whose job this is: the digest of the request's API key ('' without keys)."""
    if not settings.api_keys:
        return ""
    return hashlib.sha256(auth.presented_key().encode()).hexdigest()


def _whole(name: str, default: int) -> int:
    text = request.args.get(name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit():
        raise errors.HttpError(400, f"{name} must be a whole number, 0 or more")
    return int(text)


def _too_many(settings: Settings) -> errors.HttpError:
    return errors.HttpError(
        413, f"more images than a job may take ({settings.max_job_images}, --max-job-images)"
    )


def _url(job_id: str) -> str:
    return f"{request.script_root}/jobs/{job_id}"


_senders: dict[tuple[str, str], callbacks.CallbackSender] = {}


def _sender(settings: Settings) -> callbacks.CallbackSender:
    key = (settings.callback_hosts, settings.callback_secret)
    if key not in _senders:
        _senders[key] = callbacks.CallbackSender(*key)
    return _senders[key]
