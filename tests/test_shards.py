"""Several Redis shards: power-of-two-choices routing, skipping dead shards,
answers on the shard that took the request, one worker serving several."""

import io
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from conftest import IMAGES, wait_until

from keras_server import protocol
from keras_server.cli import make_workers
from keras_server.queue import RequestQueue, connect
from keras_server.redis_launcher import RedisServer
from keras_server.settings import Settings
from keras_server.shards import ShardSet, label
from keras_server.simulated import SimulatedModel
from keras_server.web import create_app
from keras_server.worker import FairLock, serve

KEYS = protocol.Keys("sharded")


@pytest.fixture
def two_servers() -> Iterator[list[RedisServer]]:
    servers = [RedisServer().start(), RedisServer().start()]
    yield servers
    for server in servers:
        server.close()


def shard_set(servers: list[RedisServer], seed: int = 0) -> ShardSet:
    queues = [RequestQueue(connect(s.url, block_seconds=1), KEYS) for s in servers]
    return ShardSet(queues, [label(s.url) for s in servers], rng=random.Random(seed))


def test_label_never_shows_a_password() -> None:
    assert label("redis://:hunter2@cache.internal:6380/3") == "cache.internal:6380/3"
    assert label("rediss://user:pw@h/0") == "h:6379/0"


def test_pick_prefers_the_shorter_queue(two_servers: list[RedisServer]) -> None:
    shards = shard_set(two_servers)
    busy, idle = shards.queues
    for _ in range(5):
        busy.push(b"waiting")
    assert all(shards.pick() is idle for _ in range(20))


def test_requests_spread_over_equal_shards(two_servers: list[RedisServer]) -> None:
    shards = shard_set(two_servers)
    taken = [shards.push(b"x", max_depth=1000) for _ in range(200)]
    counts = [sum(q is t for t in taken) for q in shards.queues]
    assert min(counts) > 60, counts


def test_a_dead_shard_is_skipped(two_servers: list[RedisServer]) -> None:
    shards = shard_set(two_servers)
    alive = shards.queues[1]
    two_servers[0].stop()
    assert all(shards.push(b"x", max_depth=100) is alive for _ in range(20))
    assert alive.depth() == 20
    assert shards.healthy() == [alive]


def test_all_shards_dead_raises(two_servers: list[RedisServer]) -> None:
    shards = shard_set(two_servers)
    for server in two_servers:
        server.stop()
    with pytest.raises(redis.ConnectionError):
        shards.push(b"x", max_depth=100)


def test_end_to_end_over_two_shards_with_one_worker_serving_both(
    two_servers: list[RedisServer],
) -> None:
    urls = ",".join(s.url for s in two_servers)
    settings = Settings(redis_url=urls, redis_url_given=True, queue_name="sharded", batch_size=4)
    workers = make_workers(settings, SimulatedModel(20, 1))
    assert len(workers) == 2
    stop = threading.Event()
    serving = threading.Thread(target=serve, args=(workers, stop), daemon=True)
    serving.start()
    app = create_app(settings)
    client = app.test_client()
    image = (IMAGES / "chelsea.png").read_bytes()

    def post(_: int) -> int:
        response = client.post(
            "/predict",
            data={"image": (io.BytesIO(image), "x.png")},
            content_type="multipart/form-data",
        )
        return response.status_code

    try:
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(post, range(40))) == [200] * 40
        ready = client.get("/readyz").get_json()
        assert ready["ready"] is True
        assert ready["workers"] == 2
        metrics = client.get("/metrics").get_data(as_text=True)
        for server in two_servers:
            shard = label(server.url)
            assert f'queued_requests_total{{model="resnet50",shard="{shard}"}}' in metrics

        two_servers[0].stop()
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(post, range(16))) == [200] * 16
        degraded = client.get("/readyz").get_json()
        assert degraded["ready"] is True
        assert "is unreachable" in degraded["unreachable"][0]
    finally:
        stop.set()
        serving.join(10)
    assert not serving.is_alive()


def test_fair_lock_takes_turns() -> None:
    lock = FairLock()
    order: list[str] = []

    def take(name: str) -> None:
        with lock:
            order.append(name)

    waiting = []
    with lock:
        for name in ("a", "b", "c"):
            thread = threading.Thread(target=take, args=(name,))
            thread.start()
            waiting.append(thread)
            # Let each one queue up before the next arrives.
            wait_until(lambda: lock.asked == len(waiting) + 1, timeout=5, what=f"{name} waiting")
    for thread in waiting:
        thread.join(5)
    assert order == ["a", "b", "c"]
