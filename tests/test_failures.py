"""One place for each kind of failure: Redis errors are classified once (a
silent or unreachable host is marked down, in the web tier and in the worker,
in one health record per Redis URL; a host that refuses is a 503 with its
reason, and stays up; anything else is a 500), and each API answers its
errors in its own shape, bugs included."""

from __future__ import annotations

import base64
import dataclasses
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from conftest import CHELSEA, WorkerThread, post_images, wait_until
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from keras_server.broker import messages
from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.engines.simulated import SimulatedModel
from keras_server.serving.models import Deployment
from keras_server.settings import Settings
from keras_server.web.app import create_app
from keras_server.worker.loop import serve
from keras_server.worker.main import make_workers

INFER = "/v2/models/resnet50/infer"
INTERNAL = "internal server error; the server log has the details"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A Redis of the test's own, to break at will."""
    own = RedisServer().start()
    yield own
    if own.process and own.process.poll() is None:
        own.process.send_signal(signal.SIGCONT)
    own.close()


def settings_for(server: RedisServer, **changes: object) -> Settings:
    return dataclasses.replace(
        Settings(redis_url=server.url, redis_url_given=True, queue_name="failing"), **changes
    )


def infer(client: FlaskClient) -> TestResponse:
    data = base64.b64encode(CHELSEA).decode()
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [data]}
    return client.post(INFER, json={"inputs": [tensor]})


# -- a host that refuses: 503 with its reason, not marked down --------------------


def read_only(server: RedisServer) -> str:
    # A replica of a master that does not answer refuses every write.
    redis.Redis.from_url(server.url).replicaof("127.0.0.1", free_port())
    return "read only replica"


def wrong_type(server: RedisServer) -> str:
    redis.Redis.from_url(server.url).set(messages.Keys("failing").queue, "not a list")
    return "WRONGTYPE"


def no_permission(server: RedisServer) -> str:
    admin = redis.Redis.from_url(server.url)
    admin.acl_setuser("web", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all"])
    admin.execute_command("ACL", "SETUSER", "web", "-rpush")
    # Redis 6.2 and 7 both say this much (a Lua script's RPUSH said "can't run
    # this command" instead; the push is a plain transaction now).
    return "no permissions to run the 'rpush' command"


@pytest.mark.parametrize("refuse", [read_only, wrong_type, no_permission])
def test_a_refusing_host_is_a_503_with_its_reason_and_stays_up(
    server: RedisServer, refuse: Callable[[RedisServer], str]
) -> None:
    reason = refuse(server)
    url = server.url
    if refuse is no_permission:
        url = url.replace("redis://", "redis://web:pw@")
    app = create_app(settings_for(server, redis_url=url))
    model = app.extensions["keras_server"].pipeline.deployment.get()
    client = app.test_client()
    for response, shape in ((post_images(client, CHELSEA), "success"), (infer(client), None)):
        body = response.get_json()
        assert response.status_code == 503, body
        assert response.headers["Retry-After"] == "1"
        assert reason in body["error"], body
        assert ("success" in body) == (shape is not None), body
    assert model.shards.up() == model.shards.queues, "a refusal marked the host down"


# -- a silent host: marked down, by the worker too ----------------------------------


def test_the_worker_marks_a_silent_host_down_for_the_whole_process(server: RedisServer) -> None:
    """--role all: the worker's claim loop finds the hang before any web
    request does, and the web tier skips the host from then on."""
    settings = settings_for(server, redis_timeout=0.3)
    deployment = Deployment.from_settings(settings)
    model = deployment.get()
    assert model is not None
    workers = make_workers(settings, SimulatedModel(0, 0))
    stop = threading.Event()
    serving = threading.Thread(target=serve, args=(workers, stop), daemon=True)
    serving.start()
    try:
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        wait_until(lambda: model.shards.up() == [], timeout=10, what="the host marked down")
        assert serving.is_alive()
        server.process.send_signal(signal.SIGCONT)
        wait_until(lambda: model.shards.up() == model.shards.queues, timeout=10, what="probe")
    finally:
        server.process.send_signal(signal.SIGCONT)
        stop.set()
        serving.join(10)
    assert not serving.is_alive()


def test_a_host_lost_during_the_wait_is_marked_down(server: RedisServer) -> None:
    settings = settings_for(server, result_timeout=10)
    app = create_app(settings)
    model = app.extensions["keras_server"].pipeline.deployment.get()
    watcher = redis.Redis.from_url(server.url)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post_images, app.test_client(), CHELSEA)
        queued = messages.Keys("failing").queue
        wait_until(lambda: watcher.llen(queued) == 1, timeout=10, what="the request queued")
        server.stop()
        response = waiting.result(timeout=15)
    assert response.status_code == 503, response.get_json()
    assert response.headers["Retry-After"] == "1"
    assert model.shards.up() == [], "the lost host was not marked down"


# -- 504s stay 504s -------------------------------------------------------------------


@pytest.mark.slow
def test_timeouts_under_overload_do_not_mark_a_healthy_host_down(server: RedisServer) -> None:
    """The issue's measurement: one healthy shard, a model at 2 s a batch and
    --result-timeout 1. Every request is a 504, none a 503: a nil reply to
    BLPOP that comes a little late is not a hung host."""
    settings = settings_for(server, result_timeout=1.0, batch_size=8)
    app = create_app(settings)
    model = app.extensions["keras_server"].pipeline.deployment.get()
    client = app.test_client()
    (worker,) = make_workers(settings, SimulatedModel(2000, 0))
    with WorkerThread(worker), ThreadPoolExecutor(8) as pool:
        for _ in range(2):
            statuses = list(pool.map(lambda _: post_images(client, CHELSEA).status_code, range(8)))
            assert statuses == [504] * 8
        assert model.shards.up() == model.shards.queues


# -- one health record per Redis URL ---------------------------------------------------


def test_models_on_one_redis_share_its_connections_and_its_health(
    server: RedisServer, tmp_path: Path
) -> None:
    (tmp_path / "m.toml").write_text('[models.a]\nmodel = "sim"\n[models.b]\nmodel = "sim"\n')
    settings = settings_for(server, models_file=str(tmp_path / "m.toml"), redis_timeout=0.3)
    deployment = Deployment.from_settings(settings)
    a, b = deployment.models["a"].shards, deployment.models["b"].shards
    (queue_a,), (queue_b,) = a.queues, b.queues
    assert queue_a.keys != queue_b.keys
    assert queue_a.client.connection_pool is queue_b.client.connection_pool

    def probes() -> int:
        return sum(t.name == "shard-probe" for t in threading.enumerate())

    before = probes()
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    with pytest.raises(redis.TimeoutError):
        queue_a.depth()
    assert a.up() == [] and b.up() == [], "the other model did not see the host down"
    assert probes() == before + 1
    server.process.send_signal(signal.SIGCONT)
    wait_until(lambda: b.up() == [queue_b], timeout=10, what="the probe")


# -- a bug: a 500 in each API's own shape, no traceback --------------------------------


def answer_garbage(server: RedisServer, count: int) -> threading.Thread:
    """A "worker" that answers each request with bytes no server can read."""
    client = redis.Redis.from_url(server.url)
    keys = messages.Keys("failing")

    def run() -> None:
        for _ in range(count):
            _, raw = client.blpop([keys.queue], timeout=10)
            client.rpush(keys.result(messages.decode_request(raw).id), b"\xff not json")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_bug_is_a_500_in_each_apis_shape(server: RedisServer) -> None:
    client = create_app(settings_for(server, result_timeout=10)).test_client()
    answer_garbage(server, 2)
    v2 = infer(client)
    assert (v2.status_code, v2.get_json()) == (500, {"error": INTERNAL})
    predict = post_images(client, CHELSEA)
    assert (predict.status_code, predict.get_json()) == (500, {"success": False, "error": INTERNAL})
