"""The serving core (keras_server/serving/) as every transport sees it: one
pipeline, one table of failures, one view of the workers.

- a gRPC ModelInfer goes through the response cache as /predict and v2 REST do;
- the failures table answers the same status over /predict, v2 REST and
  gRPC, each in its protocol's shape;
- quotas count images, whichever transport brought them (a job's too);
- a job's images are decoded within the process's decode budget, on the
  job lane, off the request thread;
- probes and scrapes read the process's one survey of the workers, however
  often they come.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
import tritonclient.grpc as grpcclient
from conftest import CHELSEA, COFFEE, ROCKET, WorkerThread, start_serving, stop, wait_until
from flask.testing import FlaskClient
from test_response_cache import worker

from keras_server.broker import messages
from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.broker.request_queue import RequestQueue
from keras_server.engines.simulated import SimulatedModel
from keras_server.serving import failures
from keras_server.serving.failures import ANSWERS, Failure
from keras_server.serving.models import Deployment
from keras_server.serving.pipeline import read_answer
from keras_server.settings import Settings
from keras_server.web.app import create_app
from keras_server.worker.loop import Worker


def sim(settings: Settings, **changed: object) -> Settings:
    return Settings(**{**settings.__dict__, "model": "sim", **changed})


@contextmanager
def grpc_front(settings: Settings, *flags: str) -> Iterator[grpcclient.InferenceServerClient]:
    """`--role web --model sim` with a gRPC front for `settings`' queue (its
    own process: tritonclient's protobuf modules and ours cannot share one),
    and a tritonclient of it."""
    port = free_port()
    process, _ = start_serving(
        settings, "--role", "web", "--model", "sim", "--grpc-port", str(port), *flags
    )
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:

        def live() -> bool:
            try:
                return bool(client.is_server_live())
            except grpcclient.InferenceServerException:
                return False  # not listening yet: it starts beside the HTTP front

        wait_until(live, timeout=60, what="the gRPC front")
        yield client
    finally:
        client.close()
        stop(process)


def image_input(files: list[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("image", [len(files)], "BYTES")
    return tensor.set_data_from_numpy(np.array(files, dtype=np.object_))


def v2_body(files: list[bytes]) -> dict[str, object]:
    return {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [len(files)],
                "data": [base64.b64encode(f).decode() for f in files],
            }
        ]
    }


@pytest.mark.slow
def test_a_grpc_infer_is_answered_from_the_response_cache(settings: Settings) -> None:
    cached = sim(settings, response_cache_ttl=60.0)
    with worker(settings) as model, grpc_front(settings, "--response-cache-ttl", "60") as client:
        first = client.infer("sim", [image_input([CHELSEA])]).as_numpy("probabilities")
        assert model.images == 1
        second = client.infer("sim", [image_input([CHELSEA])]).as_numpy("probabilities")
        assert model.images == 1  # the second came from the cache
        np.testing.assert_array_equal(first, second)
        # v2 REST shares the entry: same form, same file.
        rest = (
            create_app(cached).test_client().post("/v2/models/sim/infer", json=v2_body([CHELSEA]))
        )
        assert rest.status_code == 200 and rest.headers["X-Cache"] == "hit"
        assert model.images == 1
        client.infer("sim", [image_input([CHELSEA, COFFEE])])
        assert model.images == 2  # only the miss was queued


# -- one table, three transports ---------------------------------------------------


def test_the_table_names_a_status_and_a_grpc_code_for_every_failure() -> None:
    kinds = {k for k in vars(failures).values() if isinstance(k, type) and issubclass(k, Failure)}
    assert kinds - {Failure} == set(ANSWERS)
    for answer in ANSWERS.values():
        assert grpc.StatusCode[answer.grpc]  # a real code
        assert 400 <= answer.http < 600
    assert failures.Unavailable("x").headers == {"Retry-After": "1"}


@pytest.mark.slow
def test_each_failure_is_answered_from_the_table_on_every_transport(settings: Settings) -> None:
    """An unknown model (NotFound), a bad file (BadInput), too many images
    (TooLarge) and, with no worker, more images than the queue holds
    (Unavailable): the table's status over /predict and v2 REST, each in its
    shape, and the table's code over gRPC, with the same message."""
    served = sim(settings, max_images=2, max_queue=1)
    http = create_app(served).test_client()
    cases: list[tuple[type[Failure], str, list[bytes]]] = [
        (failures.NotFound, "nope", [CHELSEA]),
        (failures.BadInput, "sim", [b"not an image"]),
        (failures.TooLarge, "sim", [CHELSEA, COFFEE, ROCKET]),
        (failures.Unavailable, "sim", [CHELSEA, COFFEE]),  # two on a queue of one
    ]
    with grpc_front(settings, "--max-images", "2", "--max-queue", "1") as rpc:
        for kind, model, files in cases:
            status = ANSWERS[kind].http
            predict = upload(http, f"/models/{model}/predict", files)
            assert predict.status_code == status, (kind, predict.get_json())
            assert predict.get_json()["success"] is False
            rest = http.post(f"/v2/models/{model}/infer", json=v2_body(files))
            assert rest.status_code == status, (kind, rest.get_json())
            assert set(rest.get_json()) == {"error"}
            with pytest.raises(grpcclient.InferenceServerException) as refused:
                rpc.infer(model, [image_input(files)])
            assert refused.value.status() == f"StatusCode.{ANSWERS[kind].grpc}", kind
            assert rest.get_json()["error"] in refused.value.message()
            if kind is failures.Unavailable:
                assert predict.headers["Retry-After"] == rest.headers["Retry-After"] == "1"


def upload(
    http: FlaskClient, path: str, files: list[bytes], headers: dict[str, str] | None = None
) -> object:
    images = [(io.BytesIO(f), f"{i}.png") for i, f in enumerate(files)]
    return http.post(
        path, data={"image": images}, content_type="multipart/form-data", headers=headers or {}
    )


# -- jobs through the core -----------------------------------------------------------


def post_job(http: FlaskClient, files: list[bytes], key: str = "") -> object:
    images = [(io.BytesIO(f), f"{i}.png") for i, f in enumerate(files)]
    headers = {"X-API-Key": key} if key else {}
    return http.post(
        "/jobs", data={"image": images}, content_type="multipart/form-data", headers=headers
    )


def test_a_job_is_charged_per_image(settings: Settings, tmp_path: Path) -> None:
    """A job of more images than the key has left is refused whole (429),
    before any is decoded; one within it is charged for each of its images."""
    key = "job-client-key-0123456789"
    keys = tmp_path / "keys"
    keys.write_text(f"{key} name=jobber rate=1/h burst=3\n")
    http = create_app(sim(settings, api_keys=str(keys))).test_client()
    over = post_job(http, [CHELSEA] * 4, key)
    assert over.status_code == 429, over.get_json()
    assert "4 images sent, 3 left now" in over.get_json()["error"]
    assert over.headers["RateLimit-Remaining"] == "3"
    done = post_job(http, [CHELSEA, COFFEE], key)
    assert done.status_code == 202, done.get_json()
    assert done.headers["RateLimit-Remaining"] == "1"
    # A status read carries no image: it costs nothing.
    status = http.get(done.headers["Location"], headers={"X-API-Key": key})
    assert status.status_code == 200
    assert post_job(http, [ROCKET] * 2, key).status_code == 429


def test_a_jobs_images_are_decoded_on_the_job_lane_within_the_budget(
    settings: Settings,
) -> None:
    """Each image of a job is decoded by the core's job lane, not the
    request's thread, and counts against the process's decode budget: with
    a budget smaller than one photo, each item fails with the budget's 413,
    and the job is still taken."""
    app = create_app(sim(settings))
    pipeline = app.extensions["keras_server"].pipeline
    threads: list[str] = []
    decode = pipeline.decoder.__call__

    def recording(data: bytes, size: tuple[int, int]) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return decode(data, size)

    pipeline.decoder = recording
    done = post_job(app.test_client(), [CHELSEA, COFFEE])
    assert done.status_code == 202, done.get_json()
    assert len(threads) == 2 and all(t.startswith("job-decode") for t in threads), threads

    tiny = create_app(sim(settings, decode_memory_mb=0.1)).test_client()
    done = post_job(tiny, [CHELSEA])
    assert done.status_code == 202, done.get_json()
    status = tiny.get(done.headers["Location"]).get_json()
    assert status["failed"] == 1
    assert "the server's decode memory is 0 MB" in status["results"][0]["error"]


# -- honest statuses (issue 29) -------------------------------------------------------


def test_a_workers_no_live_worker_answer_is_a_503(settings: Settings) -> None:
    """A request pinned to a version whose last worker left is refused by
    the worker that claims it: a 503 with Retry-After, not a 500."""
    keys = messages.Keys(settings.queue_name)
    web_side = RequestQueue.open(settings.redis_url, keys, timeout=2.0)
    image = SimulatedModel(0, 0).input_shape
    pinned = messages.ImageRequest.create(np.zeros(image, "uint8"), 20, version="1")
    web_side.push_all([messages.encode_request(pinned)], 100)
    worker = Worker(web_side, SimulatedModel(0, 0), 8, result_ttl=20, name="sim", version="2")
    with WorkerThread(worker):
        answer = web_side.wait_results([pinned.id], timeout=15)[pinned.id]
    refused, version = read_answer(answer)
    assert version == ""  # a failed answer names no version
    assert isinstance(refused, failures.Unavailable)
    assert (refused.status, refused.headers) == (503, {"Retry-After": "1"})
    assert "version '1' of model 'sim' has no live worker" in refused.message
    # The answer as each transport renders it.
    assert ANSWERS[type(refused)].grpc == "UNAVAILABLE"


def test_learned_models_survive_a_redis_blip(settings: Settings) -> None:
    """A model learned from the workers' registry is not forgotten while the
    registry cannot be read, only --model-grace after the last beat seen."""
    with RedisServer() as own:
        learning = Settings(
            **{**settings.__dict__, "redis_url": own.url, "model": "sim", "model_grace": 30.0}
        )
        deployment = Deployment.from_settings(learning)
        registry = redis.Redis.from_url(own.url)
        beat = {"queue": f"{learning.queue_name}:extra", "version": "3", "at": time.time()}
        registry.hset(messages.Keys(learning.queue_name).models, "extra", json.dumps(beat))
        deployment.discover(now=100.0)
        assert "extra" in deployment.models
        own.stop()
        deployment.discover(now=200.0)  # the registry cannot be read: nothing forgotten
        assert "extra" in deployment.models
        # Past the grace since the last beat seen, it goes.
        deployment._seen["extra"] = dataclasses.replace(
            deployment._seen["extra"], at=time.time() - 31
        )
        deployment.discover(now=300.0)
        assert "extra" not in deployment.models


def test_a_job_lookup_with_redis_down_is_a_503_not_a_404(settings: Settings) -> None:
    with RedisServer() as own:
        served = sim(settings, redis_url=own.url)
        http = create_app(served).test_client()
        done = post_job(http, [CHELSEA])
        assert done.status_code == 202
        own.stop()
        lost = http.get(done.headers["Location"])
        assert lost.status_code == 503, lost.get_json()
        assert lost.headers["Retry-After"] == "1"
        assert http.get("/jobs/" + "0" * 32).status_code == 503


def test_probes_read_the_survey_not_redis(settings: Settings, redis_client: redis.Redis) -> None:
    """However many probes and scrapes come, a process surveys Redis at most
    once per REFRESH_S: a flood of /readyz, /v2/health/ready, /models and
    /metrics costs Redis a handful of reads."""
    http = create_app(sim(settings)).test_client()
    http.get("/readyz")  # the first survey

    def reads() -> int:
        stats = redis_client.info("commandstats")
        return sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_hgetall", "cmdstat_llen"))

    before = reads()
    for _ in range(50):
        for path in ("/readyz", "/v2/health/ready", "/models", "/metrics"):
            http.get(path)
    # 200 probes within a few REFRESH_S: a few surveys, each a few reads.
    assert reads() - before < 50


def test_x_cache_is_silent_with_api_keys(settings: Settings, tmp_path: Path) -> None:
    """With --api-keys, X-Cache would tell one key whether another sent the
    same image: the answer is the same, the header is not sent."""
    keys = tmp_path / "keys"
    keys.write_text("first-client-key-01234\nother-client-key-01234\n")
    http = create_app(sim(settings, api_keys=str(keys), response_cache_ttl=60.0)).test_client()
    with worker(settings):
        first = upload(http, "/predict", [CHELSEA], {"X-API-Key": "first-client-key-01234"})
        other = upload(http, "/predict", [CHELSEA], {"X-API-Key": "other-client-key-01234"})
    assert first.status_code == other.status_code == 200
    assert first.get_json() == other.get_json()
    assert "X-Cache" not in first.headers and "X-Cache" not in other.headers
