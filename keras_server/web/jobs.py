"""Asynchronous jobs over HTTP, a blueprint: `POST /jobs`, `GET /jobs/<id>`,
`DELETE /jobs/<id>` (the record itself: broker/jobs.py).

`POST /jobs` takes several `image` fields and/or one `archive` (zip or tar,
read by archives.py), up to --max-job-images in all, plus the optional form
fields `model` and `callback_url`. The body (up to --max-job-upload-mb) is
streamed to spooled temporary files, never held whole (uploads.py
read_job_body), and the images are read back one at a time, the archive's
too. Each image is charged to the caller's quota (serving/quotas.py; the
image fields all at once, an archive's images one by one) before it is
decoded, decoded by the serving core off the request thread within the
decode budget (serving/pipeline.py, `decode_for_job`), and staged in Redis a
chunk at a time; one that cannot be decoded is a failed item of the job, not
a refusal. Only once all are staged is the job created (one transaction) and
answered 202 with `Location`: from then on the workers drive it, whether or
not this process lives.

A job belongs to the API key that made it (its SHA-256 digest is kept, never
the key): with --api-keys, another key gets 404, as for a job that does not
exist. Errors are the JSON API's, `{"success": false, "error"}`.
TensorFlow-free.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import redis
from flask import Blueprint, Response, jsonify, request
from werkzeug.wsgi import get_input_stream

from keras_server import callbacks, metrics
from keras_server.broker import messages
from keras_server.broker.jobs import Job, JobStore
from keras_server.broker.request_queue import RequestQueue
from keras_server.images import ImageError
from keras_server.serving.failures import (
    BadInput,
    Failure,
    NotFound,
    TooLarge,
    Unavailable,
    from_redis,
    no_live_worker,
)
from keras_server.serving.models import ServedModel
from keras_server.settings import Settings
from keras_server.web import auth, state
from keras_server.web.archives import ArchiveRefused, files
from keras_server.web.uploads import JobBody, UploadRefused, read_job_body

log = logging.getLogger(__name__)

blueprint = Blueprint("jobs", __name__)

# Images staged per Redis call: the web process holds at most this many
# decoded images of a job at once.
STAGE_CHUNK = 16
DEFAULT_PAGE = 100
MAX_PAGE = 1000


@blueprint.post("/jobs")
def submit() -> tuple[Response, int, dict[str, str]]:
    settings = state().settings
    with _read_body(settings) as body:
        return _submit(settings, body)


def _submit(settings: Settings, body: JobBody) -> tuple[Response, int, dict[str, str]]:
    model, callback_url = _check_submission(settings, body)
    size = model.input_size()
    if size is None:
        raise no_live_worker(model.name)
    queue = model.shards.pick()
    if queue.jobs.backlog() >= settings.max_job_backlog:
        raise Unavailable(
            "the server holds as many job images as it may (--max-job-backlog); retry later"
        )
    entries = body.image_files()
    if body.archive is not None:
        room = settings.max_job_images - len(body.images)
        archived = files(body.archive, room, settings.max_archive_bytes, settings.max_upload_bytes)
        entries = itertools.chain(entries, archived)
    caller, limiter = auth.caller(), state().pipeline.limiter
    if caller is not None and limiter is not None:
        limiter.charge(caller, len(body.images))  # counted before any is decoded
    job_id = os.urandom(16).hex()
    try:
        done = _stage(queue, job_id, model.name, size, entries, callback_url=callback_url,
                      settings=settings, prepaid=len(body.images))  # fmt: skip
    except ArchiveRefused as exc:
        queue.jobs.discard(job_id)
        raise (TooLarge if exc.status == 413 else BadInput)(exc.message) from None
    except BaseException:
        queue.jobs.discard(job_id)
        raise
    if not done:
        # Done already (no image decoded): its callback is pending in Redis,
        # for a worker to send (keras_server/callbacks.py).
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
        raise (TooLarge if exc.status == 413 else BadInput)(exc.message) from None


def _check_submission(settings: Settings, body: JobBody) -> tuple[ServedModel, str]:
    """(the model, the callback URL) of a POST /jobs, or the Failure that
    refuses it before anything is decoded."""
    if not body.images and body.archive is None:
        raise BadInput("no files: send 'image' fields and/or one 'archive' (zip or tar)")
    if len(body.images) > settings.max_job_images:
        raise _too_many(settings)
    model = state().pipeline.model(body.fields.get("model") or None)
    callback_url = body.fields.get("callback_url", "")
    if callback_url:
        hosts = callbacks.allowed_hosts(settings.callback_hosts)
        why = callbacks.refusal(callback_url, hosts, settings.callback_secret)
        if why:
            raise BadInput(why)
    return model, callback_url


def _stage(
    queue: RequestQueue,
    job_id: str,
    model: str,
    size: tuple[int, int],
    entries: Iterator[tuple[str, bytes]],
    *,
    callback_url: str,
    settings: Settings,
    prepaid: int = 0,
) -> bool:
    """Charge (past the first `prepaid` entries), decode and stage every
    entry, one file's bytes at a time, then create the job; whether it is
    done already (nothing to run). OverQuota when the caller runs out."""
    pipeline = state().pipeline
    caller = auth.caller()
    limiter = pipeline.limiter if caller is not None else None
    store: JobStore = queue.jobs
    deadline = time.time() + settings.job_ttl
    names: list[str] = []
    failures: dict[int, bytes] = {}
    chunk: list[bytes] = []
    for index, (name, data) in enumerate(entries):
        names.append(name)
        if limiter is not None and caller is not None and index >= prepaid:
            limiter.charge(caller, 1)
        try:
            image = pipeline.decode_for_job(data, size)
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
    done = store.create(
        job_id,
        model=model,
        owner=auth.owner(),
        names=names,
        failures=failures,
        ttl=settings.job_ttl,
        callback_url=callback_url,
    )
    if failures:  # recorded in the job by `create`: the workers never see them
        metrics.JOB_ITEMS.labels(model, "failed").inc(len(failures))
    return done


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
        **job.summary(),
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
    deployment = state().pipeline.deployment
    missing = NotFound(f"no job {job_id!r} (jobs expire after --job-ttl)")
    if not job_id.isalnum() or len(job_id) > 64:
        raise missing
    failed: Failure | None = None
    for model in deployment.models.values():
        for queue in model.shards.queues:
            down = queue.shard.down_reason()
            if down is not None:
                failed = Unavailable(
                    f"the queue (Redis at {queue.shard.name}) is unreachable ({down})"
                )
                continue
            try:
                job = queue.jobs.get(job_id)
            except redis.RedisError as exc:
                failed = from_redis(exc)  # the job may be elsewhere
                continue
            if job is not None:
                if job.owner != auth.owner():
                    raise missing
                return queue.jobs, job
    if failed is not None:
        # Not found where Redis answered; where it did not, the job may be.
        raise failed
    raise missing


def _whole(name: str, default: int) -> int:
    text = request.args.get(name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit():
        raise BadInput(f"{name} must be a whole number, 0 or more")
    return int(text)


def _too_many(settings: Settings) -> TooLarge:
    return TooLarge(
        f"more images than a job may take ({settings.max_job_images}, --max-job-images)"
    )


def _url(job_id: str) -> str:
    return f"{request.script_root}/jobs/{job_id}"
