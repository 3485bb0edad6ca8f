"""Several Redis shards: power-of-two-choices routing, skipping dead shards,
answers on the shard that took the request, one worker serving several."""

import dataclasses
import random
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from conftest import CHELSEA, post_images, wait_until
from prometheus_client.parser import text_string_to_metric_families

from keras_server.broker import messages
from keras_server.broker.placement import NoShardUp, ShardSet
from keras_server.broker.redis_server import RedisServer
from keras_server.broker.request_queue import RequestQueue
from keras_server.broker.shards import label
from keras_server.catalog import model_specs
from keras_server.engines.simulated import SimulatedModel
from keras_server.serving.traffic import Policy, Router, store_policy
from keras_server.settings import Settings
from keras_server.web.app import create_app
from keras_server.worker.loop import FairLock, serve
from keras_server.worker.main import make_workers

KEYS = messages.Keys("sharded")


@pytest.fixture
def two_servers() -> Iterator[list[RedisServer]]:
    servers = [RedisServer().start(), RedisServer().start()]
    yield servers
    for server in servers:
        server.close()


def shard_set(servers: list[RedisServer], seed: int = 0) -> ShardSet:
    queues = [RequestQueue.open(s.url, KEYS, timeout=1) for s in servers]
    return ShardSet(queues, rng=random.Random(seed))


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
    assert shards.up() == [alive]


def test_all_shards_dead_raises(two_servers: list[RedisServer]) -> None:
    shards = shard_set(two_servers)
    for server in two_servers:
        server.stop()
    with pytest.raises(redis.ConnectionError):
        shards.push(b"x", max_depth=100)
    assert shards.up() == []
    with pytest.raises(NoShardUp):  # both marked down: nothing is asked of them
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

    def post(_: int) -> int:
        return post_images(client, CHELSEA).status_code

    try:
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(post, range(40))) == [200] * 40
        ready = client.get("/readyz").get_json()
        assert ready["ready"] is True
        assert (ready["workers"], ready["claim_loops"]) == (1, 2)  # one process, 2 shards
        metrics = client.get("/metrics").get_data(as_text=True)
        for server in two_servers:
            shard = label(server.url)
            assert f'queued_requests_total{{model="resnet50",shard="{shard}"}}' in metrics

        two_servers[0].stop()
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(post, range(16))) == [200] * 16
        # The process's survey shows the stopped shard within REFRESH_S.
        degraded = wait_until(
            lambda: (found := client.get("/readyz").get_json()).get("unreachable") and found,
            what="the stopped shard in the survey",
        )
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


def test_readyz_models_and_metrics_agree_model_by_shard(
    two_servers: list[RedisServer], tmp_path: Path
) -> None:
    """/readyz, /models and /metrics read one survey: each model's workers and
    depth on each shard, with one shard going down."""
    (tmp_path / "m.toml").write_text('[models.a]\nmodel = "sim"\n[models.b]\nmodel = "sim"\n')
    urls = [s.url for s in two_servers]
    shard0, shard1 = (label(url) for url in urls)
    settings = Settings(
        redis_url=",".join(urls),
        redis_url_given=True,
        queue_name="survey",
        models_file=str(tmp_path / "m.toml"),
    )
    models = model_specs(settings)
    model = SimulatedModel(0, 0)
    only_shard0 = dataclasses.replace(settings, redis_url=urls[0])
    workers = [
        *make_workers(settings, model, "a", models),
        *make_workers(only_shard0, model, "b", models),
    ]
    for worker in workers:
        worker.queue.beat(worker.id, worker.info(), ttl=60)
    b_on_shard1 = RequestQueue.open(urls[1], workers[-1].queue.keys, timeout=1)
    for _ in range(3):
        b_on_shard1.push(b"waiting")
    client = create_app(settings).test_client()

    def live_in_metrics() -> dict[tuple[str, str], float]:
        text = client.get("/metrics").get_data(as_text=True)
        return {
            (s.labels["model"], s.labels["shard"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "keras_server_workers_live"
        }

    def live_in_models() -> dict[str, int]:
        listed = client.get("/models").get_json()["models"]
        return {m["name"]: m["live_workers"] for m in listed}

    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["reason"] == f"no live worker for model 'b' at {shard1}"
    assert live_in_models() == {"a": 2, "b": 1}
    by_shard = {("a", shard0): 1, ("a", shard1): 1, ("b", shard0): 1, ("b", shard1): 0}
    assert live_in_metrics() == by_shard
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'keras_server_queue_depth{{level="1",model="b",shard="{shard1}"}} 3.0' in metrics
    assert f'keras_server_queue_depth{{level="2",model="b",shard="{shard1}"}} 0.0' in metrics

    (late,) = make_workers(dataclasses.replace(settings, redis_url=urls[1]), model, "b", models)
    late.queue.beat(late.id, late.info(), ttl=60)
    # The process's survey is read again within REFRESH_S (serving/workers.py).
    wait_until(
        lambda: client.get("/readyz").get_json().get("claim_loops") == 4, what="the late worker"
    )
    assert sum(live_in_models().values()) == sum(live_in_metrics().values()) == 4

    two_servers[1].stop()
    ready = wait_until(
        lambda: (found := client.get("/readyz").get_json()).get("unreachable") and found,
        what="the stopped shard in the survey",
    )
    assert ready["ready"] is True
    assert ready["unreachable"] == [ready["unreachable"][0]]
    assert ready["unreachable"][0].startswith(f"Redis at {shard1} is unreachable")
    assert ready["claim_loops"] == 2
    assert live_in_models() == {"a": 1, "b": 1}
    assert live_in_metrics() == {("a", shard0): 1, ("b", shard0): 1}
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'keras_server_redis_up{{shard="{shard1}"}} 0.0' in metrics


def test_every_web_process_routes_by_the_newest_traffic_policy(
    two_servers: list[RedisServer],
) -> None:
    """A policy written while a shard was hung, then while it was down, is
    the one every process reads afterwards, whichever shard it asks first;
    the shard that missed it is brought up to date."""
    keys = messages.Keys("traffic")
    first, second = two_servers

    def router(servers: list[RedisServer], timeout: float) -> Router:
        # Each timeout is a Shard of its own: a web process's own view of
        # which shards are down.
        queues = [RequestQueue.open(s.url, keys, timeout=timeout) for s in servers]
        return Router("m", ShardSet(queues), live_workers=lambda fresh=False: [])

    def stored(server: RedisServer) -> bytes | None:
        with redis.Redis.from_url(server.url) as client:
            return client.get(keys.traffic)

    writer = router([first, second], 0.3)
    assert len(store_policy(writer, Policy.from_weights({"1": 1}))) == 2
    second.process.send_signal(signal.SIGSTOP)  # hung: it keeps the old policy
    try:
        written = store_policy(writer, Policy.from_weights({"2": 1}))
        assert written == [writer.shards.queues[0].shard.name]
    finally:
        second.process.send_signal(signal.SIGCONT)
    # Another process, asking the shard that missed the write first.
    reader = router([second, first], 0.31)
    assert reader.read(0.0).policy.weights == {"2": 1.0}
    assert stored(second) == stored(first)

    second.stop()
    assert store_policy(writer, Policy()) == [writer.shards.queues[0].shard.name]
    second.start()  # empty: restarted without the policy
    assert stored(second) is None
    assert reader.read(0.0).policy.weights is None
    assert stored(second) == stored(first)
    assert Policy.decode(stored(second)).weights is None
