"""Asynchronous jobs (`POST /jobs`, `GET` and `DELETE /jobs/<id>`): the HTTP
shape, archive refusals, paging, ownership and TTL with
Flask's test client and a worker thread on real Redis; crash safety (the web
server killed after the 202, a worker killed mid-job), cancel and the batch
client's --job mode against real server processes."""

from __future__ import annotations

import dataclasses
import io
import json
import signal
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import requests
from conftest import (
    CHELSEA,
    COFFEE,
    ROCKET,
    WorkerThread,
    make_worker,
    png_bytes,
    start,
    start_web,
    stop,
    wait_until,
)
from flask.testing import FlaskClient
from PIL import Image

from keras_server.broker import messages
from keras_server.broker.jobs import JobStore
from keras_server.client.batch import main as batch_client
from keras_server.engines.simulated import SimulatedModel
from keras_server.processes import Child
from keras_server.settings import Settings
from keras_server.web.app import create_app

SMALL = png_bytes(Image.new("RGB", (8, 8), (1, 2, 3)))


def post_job(
    client: FlaskClient,
    images: list[tuple[str, bytes]] = (),  # type: ignore[assignment]
    archive: tuple[str, bytes] | None = None,
    headers: dict[str, str] | None = None,
    **fields: str,
) -> Any:
    data: dict[str, Any] = {"image": [(io.BytesIO(b), n) for n, b in images], **fields}
    if archive:
        data["archive"] = (io.BytesIO(archive[1]), archive[0])
    return client.post("/jobs", data=data, content_type="multipart/form-data", headers=headers)


def zipped(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tarred(entries: dict[str, bytes], mode: str = "w:gz", link: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            archive.addfile(info)
    return buffer.getvalue()


def finished(client: FlaskClient, location: str, **headers: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = client.get(location, headers=headers).get_json()
        return body if body["state"] in ("done", "cancelled") else None

    return wait_until(done, 30, "the job to finish")  # type: ignore[return-value]


@pytest.fixture
def served(settings: Settings) -> Iterator[Settings]:
    """A worker thread with the simulated model on `settings`' queue."""
    with WorkerThread(make_worker(settings, SimulatedModel(0, 0))):
        yield settings


def test_a_job_of_images_and_an_archive_runs_in_submission_order(
    served: Settings, client: FlaskClient
) -> None:
    archive = zipped({"a/one.png": COFFEE, "a/broken.png": b"not an image", "two.jpg": ROCKET,
                      "__MACOSX/._two.jpg": b"junk"})  # fmt: skip
    answer = post_job(client, [("cat.png", CHELSEA)], ("photos.zip", archive))
    assert answer.status_code == 202, answer.get_json()
    body = answer.get_json()
    assert answer.headers["Location"] == body["status_url"] == f"/jobs/{body['id']}"
    job = finished(client, body["status_url"])
    assert job["state"] == "done"
    assert (job["total"], job["done"], job["succeeded"], job["failed"]) == (4, 4, 3, 1)
    names = [item["filename"] for item in job["results"]]
    assert names == ["cat.png", "a/one.png", "a/broken.png", "two.jpg"]
    for item in job["results"]:
        if item["filename"] == "a/broken.png":
            assert item["success"] is False
            assert "not an image" in item["error"]
        else:
            assert item["success"] is True
            assert len(item["predictions"]) == 5


def test_results_are_paged(served: Settings, client: FlaskClient) -> None:
    images = [(f"{i}.png", CHELSEA) for i in range(5)]
    location = post_job(client, images).headers["Location"]
    finished(client, location)
    first = client.get(location + "?limit=2").get_json()
    assert [r["filename"] for r in first["results"]] == ["0.png", "1.png"]
    second = client.get(first["next"]).get_json()
    assert [r["filename"] for r in second["results"]] == ["2.png", "3.png"]
    last = client.get(location + "?offset=4&limit=2").get_json()
    assert [r["filename"] for r in last["results"]] == ["4.png"]
    assert "next" not in last
    assert client.get(location + "?limit=0").get_json()["results"] == []
    assert client.get(location + "?offset=-1").status_code == 400


@pytest.mark.parametrize(
    ("archive", "status", "words"),
    [
        (zipped({f"{i}.png": SMALL for i in range(4)}), 413, "more files than the job"),
        (zipped({"/etc/x.png": CHELSEA}), 400, "absolute path"),
        (zipped({"a/../../x.png": CHELSEA}), 400, "'..'"),
        (zipped({"inner.zip": zipped({"x.png": CHELSEA})}), 400, "nested archives"),
        (zipped({"inner.png": tarred({"x.png": CHELSEA})}), 400, "nested archives"),
        (zipped({"bomb.png": b"\0" * (8 << 20)}, zipfile.ZIP_DEFLATED), 413, "zip bomb"),
        (zipped({"a.png": CHELSEA, "b.png": CHELSEA}), 413, "--max-archive-mb"),
        (tarred({f"{i}.png": SMALL for i in range(4)}), 413, "more files than the job"),
        (tarred({"../x.png": CHELSEA}), 400, "'..'"),
        (tarred({"x.png": CHELSEA}, link="y.png"), 400, "a link or a device"),
        (tarred({"a.png": CHELSEA, "b.png": CHELSEA}, "w"), 413, "--max-archive-mb"),
        (b"neither zip nor tar", 400, "neither a zip nor a tar"),
    ],
    ids=[
        "entries",
        "absolute",
        "dotdot",
        "nested-name",
        "nested-magic",
        "bomb",
        "size",
        "tar-entries",
        "tar-dotdot",
        "tar-link",
        "tar-size",
        "garbage",
    ],
)
def test_archives_are_refused_naming_the_problem(
    settings: Settings,
    redis_client: redis.Redis,
    archive: bytes,
    status: int,
    words: str,
) -> None:
    """Nothing is left in Redis by a refused job (its staged items are deleted)."""
    limited = dataclasses.replace(
        settings, max_job_images=3, max_archive_mb=1.5 * len(CHELSEA) / 2**20
    )
    answer = post_job(create_app(limited).test_client(), [], ("a", archive))
    assert answer.status_code == status, answer.get_json()
    assert words in answer.get_json()["error"]
    assert answer.get_json()["success"] is False
    assert not redis_client.keys(messages.Keys(settings.queue_name).tag + ":job*")


def test_too_many_image_fields_or_none(settings: Settings) -> None:
    client = create_app(dataclasses.replace(settings, max_job_images=2)).test_client()
    answer = post_job(client, [("a.png", CHELSEA)] * 3)
    assert answer.status_code == 413
    assert "--max-job-images" in answer.get_json()["error"]
    assert post_job(client).status_code == 400
    unknown = post_job(client, [("a.png", CHELSEA)], model="nope")  # a plain form field
    assert unknown.status_code == 404
    assert "unknown model 'nope'" in unknown.get_json()["error"]


def test_a_job_belongs_to_its_key(settings: Settings, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    mine, theirs = "k" * 20 + "mine", "k" * 20 + "theirs"
    keys.write_text(f"{mine}\n{theirs}\n")
    client = create_app(dataclasses.replace(settings, api_keys=str(keys))).test_client()
    answer = post_job(client, [("a.png", CHELSEA)], headers={"X-API-Key": mine})
    assert answer.status_code == 202
    location = answer.headers["Location"]
    assert client.get(location, headers={"X-API-Key": mine}).status_code == 200
    other = client.get(location, headers={"X-API-Key": theirs})
    assert other.status_code == 404
    assert client.delete(location, headers={"X-API-Key": theirs}).status_code == 404
    assert client.get(location, headers={"X-API-Key": mine}).get_json()["state"] == "queued"
    assert client.get("/jobs/" + "0" * 32, headers={"X-API-Key": mine}).status_code == 404


def test_results_are_kept_job_ttl_after_the_end(
    settings: Settings, redis_client: redis.Redis
) -> None:
    short = dataclasses.replace(settings, job_ttl=60)
    worker = make_worker(short, SimulatedModel(0, 0), job_ttl=5)
    with WorkerThread(worker):
        client = create_app(short).test_client()
        location = post_job(client, [("a.png", CHELSEA)]).headers["Location"]
        finished(client, location)
    job_id = location.rsplit("/", 1)[1]
    keys = messages.Keys(settings.queue_name)
    for key in (keys.job(job_id), keys.job_results(job_id), keys.job_names(job_id)):
        assert 0 < redis_client.pttl(key) <= 5000, key


# -- real servers ------------------------------------------------------------


def start_worker(settings: Settings, *extra: str) -> Child:
    return start(
        "--role", "worker", "--model", "sim", "--sim-image-ms", "0",
        "--redis-url", settings.redis_url, "--queue-name", settings.queue_name,
        "--heartbeat-ttl", "1", "--log-level", "DEBUG", *extra,
    )  # fmt: skip


def store(settings: Settings) -> JobStore:
    return JobStore(redis.Redis.from_url(settings.redis_url), messages.Keys(settings.queue_name))


@pytest.mark.slow
def test_a_web_server_killed_after_the_202_does_not_stop_the_job(settings: Settings) -> None:
    """No worker runs while the job is submitted; the web server is killed
    (SIGKILL) once it answered 202, then a worker starts: the job completes
    with no web server at all, and a new one reads it."""
    web, base = start_web(settings, "--model", "sim")
    images = [("image", (f"{i}.png", CHELSEA)) for i in range(12)]
    answer = requests.post(base + "/jobs", files=images, timeout=30)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    # A crash takes granian's web processes too: killing the parent alone
    # would leave them serving, orphaned.
    assert web.process is not None
    processes = [psutil.Process(web.process.pid)]
    processes += processes[0].children(recursive=True)
    for process in processes:
        process.kill()
    web.kill()
    worker = start_worker(settings, "--sim-batch-ms", "5", "--batch-size", "4")
    try:
        jobs = store(settings)
        wait_until(lambda: (j := jobs.get(job_id)) and j.state == "done", 60, "the job")
        job = jobs.get(job_id)
        assert (job.succeeded, job.failed) == (12, 0)
        again, base = start_web(settings, "--model", "sim")
        body = requests.get(f"{base}/jobs/{job_id}", timeout=10).json()
        stop(again)
    finally:
        stop(worker)
    assert body["state"] == "done"
    assert all(item["success"] for item in body["results"])


@pytest.mark.slow
def test_a_worker_killed_mid_job_loses_nothing(settings: Settings) -> None:
    """A worker with slow batches is SIGKILLed, with a batch in hand, once the
    job has some results; a second worker takes over its claims: every item
    answered, once."""
    web, base = start_web(settings, "--model", "sim")
    first = start_worker(settings, "--sim-batch-ms", "300", "--batch-size", "4")
    second = None
    try:
        wait_until(lambda: requests.get(base + "/readyz", timeout=5).ok, 60, "a worker")
        images = [("image", (f"{i}.png", COFFEE)) for i in range(24)]
        job_id = requests.post(base + "/jobs", files=images, timeout=30).json()["id"]
        jobs = store(settings)
        wait_until(lambda: (j := jobs.get(job_id)) and j.succeeded >= 4, 30, "some results")
        client = redis.Redis.from_url(settings.redis_url)
        keys = messages.Keys(settings.queue_name)
        (first_id,) = [w.decode() for w in client.smembers(keys.workers)]

        def frozen_holding_a_batch() -> bool:
            # Frozen first, so that what it holds is exact when it dies:
            # killed between two batches, it would leave nothing to take over.
            first.send_signal(signal.SIGSTOP)
            if client.llen(keys.processing(first_id)):
                return True
            first.send_signal(signal.SIGCONT)
            return False

        wait_until(frozen_holding_a_batch, 30, "a batch in hand")
        first.kill()
        assert jobs.get(job_id).state == "running"
        second = start_worker(settings, "--sim-batch-ms", "5", "--batch-size", "4")
        wait_until(lambda: jobs.get(job_id).state == "done", 60, "the job")
        body = requests.get(f"{base}/jobs/{job_id}?limit=100", timeout=10).json()
    finally:
        stop(web)
        if second:
            stop(second)
    assert (body["total"], body["succeeded"], body["failed"]) == (24, 24, 0)
    assert [r["filename"] for r in body["results"]] == [f"{i}.png" for i in range(24)]
    assert "requeued" in second.output()


@pytest.mark.slow
def test_a_cancelled_job_runs_nothing_more(settings: Settings) -> None:
    """Cancelled while no worker runs (some items are on the queue already,
    fed at submit): a worker started afterwards runs none of them."""
    web, base = start_web(settings, "--model", "sim")
    worker = None
    try:
        images = [("image", (f"{i}.png", CHELSEA)) for i in range(40)]
        location = base + requests.post(base + "/jobs", files=images, timeout=30).headers[
            "Location"]  # fmt: skip
        cancelled = requests.delete(location, timeout=10).json()
        assert cancelled["state"] == "cancelled"
        assert cancelled["cancelled"] is True
        assert requests.delete(location, timeout=10).json()["cancelled"] is False
        worker = start_worker(settings, "--sim-batch-ms", "5", "--batch-size", "4")
        client = redis.Redis.from_url(settings.redis_url)
        queue = messages.Keys(settings.queue_name).queue
        wait_until(lambda: client.llen(queue) == 0, 30, "the queue drained")
        body = requests.get(location, timeout=10).json()
    finally:
        stop(web)
        if worker:
            out = stop(worker)
    assert body["state"] == "cancelled"
    assert body["done"] == 0
    assert all(r["success"] is False and "cancelled" in r["error"] for r in body["results"])
    assert "items of cancelled jobs" in out
    assert "job." not in "".join(line for line in out.splitlines() if "batch of" in line)


@pytest.mark.slow
def test_the_batch_client_with_job(settings: Settings, tmp_path: Path) -> None:
    web, base = start_web(settings, "--model", "sim")
    worker = start_worker(settings, "--sim-batch-ms", "5", "--batch-size", "8")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(7):
        (folder / f"{i}.png").write_bytes(CHELSEA)
    (folder / "broken.png").write_bytes(CHELSEA[: len(CHELSEA) // 2])
    out = tmp_path / "results.jsonl"
    try:
        status = batch_client([str(folder), "--url", base, "--out", str(out), "--job",
                           "--job-size", "3", "--concurrency", "2"])  # fmt: skip
    finally:
        stop(web)
        stop(worker)
    assert status == 1
    records = {json.loads(line)["path"]: json.loads(line) for line in out.read_text().splitlines()}
    assert len(records) == 8
    assert records[str(folder / "broken.png")]["success"] is False
    assert sum(r["success"] for r in records.values()) == 7
