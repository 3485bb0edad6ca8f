"""The Redis queue, against a real redis-server."""

import json
import logging
import threading
import time

import pytest
import redis
from conftest import wait_until
from prometheus_client import REGISTRY

from keras_server.broker.messages import WorkerInfo
from keras_server.broker.request_queue import QueueFull, RequestQueue
from keras_server.broker.scripts import SWEEP_CHUNK
from keras_server.settings import Settings


def take(
    queue: RequestQueue, worker_id: str, n: int, wait: float = 1, fill_for: float = 0
) -> list[bytes]:
    """Claim a batch of up to `n` the way Worker.run_once does: block for the
    first request, then fill the batch."""
    first = queue.claim_first(worker_id, wait)
    if first is None:
        return []
    return [first, *queue.claim_more(worker_id, n - 1, time.monotonic() + fill_for)]


def test_claim_takes_oldest_first_up_to_the_batch_size(queue: RequestQueue) -> None:
    for i in range(5):
        queue.push(f"m{i}".encode())
    assert take(queue, "w", 3) == [b"m0", b"m1", b"m2"]
    assert queue.depth() == 2
    assert take(queue, "w", 3) == [b"m3", b"m4"]
    assert queue.depth() == 0


def test_claim_first_takes_one_and_claim_more_the_rest(queue: RequestQueue) -> None:
    for item in (b"a", b"b", b"c"):
        queue.push(item)
    assert queue.claim_first("w", wait=1) == b"a"
    assert queue.depth() == 2
    assert queue.claim_more("w", 5, until=0) == [b"b", b"c"], "what is queued, without waiting"
    assert queue.claim_more("w", 5, until=0) == []


@pytest.mark.timeout(60)
def test_claim_blocks_until_work_arrives(queue: RequestQueue) -> None:
    """The claim waits for the late push and returns with it: were it to
    sleep out its wait instead, the test's timeout (60 s) fails it."""
    timer = threading.Timer(0.3, queue.push, args=(b"late",))
    timer.start()
    started = time.monotonic()
    assert queue.claim_first("w", wait=3600) == b"late"
    assert time.monotonic() - started > 0.2, "it waited for the push"
    timer.join()


def test_claim_on_an_empty_queue_gives_up_after_wait(queue: RequestQueue) -> None:
    started = time.monotonic()
    assert queue.claim_first("w", wait=0.2) is None
    assert time.monotonic() - started >= 0.15


def test_two_concurrent_consumers_take_each_item_exactly_once(
    queue: RequestQueue, redis_client: redis.Redis, settings: Settings
) -> None:
    total = 2000
    taken: list[list[bytes]] = [[], []]
    producing = threading.Event()

    def consume(worker_id: str, into: list[bytes]) -> None:
        own = RequestQueue.open(settings.redis_url, queue.keys, timeout=1)
        while producing.is_set() or own.depth():
            into.extend(take(own, worker_id, 7, wait=0.05))
            own.finish(worker_id, {}, ttl=1)

    producing.set()
    consumers = [threading.Thread(target=consume, args=(f"w{i}", t)) for i, t in enumerate(taken)]
    for c in consumers:
        c.start()
    with redis_client.pipeline(transaction=False) as pipe:
        for i in range(total):
            pipe.rpush(queue.keys.queue, str(i))
            if i % 100 == 99:
                pipe.execute()
    producing.clear()
    for c in consumers:
        c.join(30)
    everything = taken[0] + taken[1]
    assert len(everything) == total, "an item was lost or taken twice"
    assert sorted(int(x) for x in everything) == list(range(total))
    assert taken[0] and taken[1], "both consumers should have had work"
    # Each consumer sees the items in queue order.
    for t in taken:
        assert [int(x) for x in t] == sorted(int(x) for x in t)


def test_results_wait_and_expire(queue: RequestQueue, redis_client: redis.Redis) -> None:
    queue.finish("w", {"r1": b"one", "r2": b"two"}, ttl=30)
    ttl = redis_client.pttl(queue.keys.result("r2"))
    assert 0 < ttl <= 30_000
    assert queue.wait_result("r1", timeout=1) == b"one"
    assert not redis_client.exists(queue.keys.result("r1")), "BLPOP leaves nothing behind"
    queue.finish("w", {"r3": b"three"}, ttl=0.2)
    wait_until(lambda: not redis_client.exists(queue.keys.result("r3")), what="r3 expired")
    assert queue.wait_result("r3", timeout=0.1) is None


def test_wait_result_blocks_until_answered(queue: RequestQueue) -> None:
    timer = threading.Timer(0.3, queue.finish, args=("w", {"late": b"ok"}, 10))
    timer.start()
    assert queue.wait_result("late", timeout=5) == b"ok"
    timer.join()


def test_wait_result_times_out(queue: RequestQueue) -> None:
    started = time.monotonic()
    assert queue.wait_result("nobody", timeout=0.3) is None
    assert time.monotonic() - started >= 0.25


def test_writes_join_a_callers_transaction(queue: RequestQueue, redis_client: redis.Redis) -> None:
    info = WorkerInfo(description="m", batch_size=1, host="h", pid=1, at=time.time())
    with redis_client.pipeline(transaction=True) as pipe:
        queue.beat("w", info, ttl=5, pipe=pipe)
        queue.finish("w", {"id": b"y"}, ttl=5, pipe=pipe)
        assert queue.workers() == {}, "nothing is written before EXEC"
        pipe.execute()
    assert queue.workers() == {"w": info}
    assert queue.wait_result("id", timeout=1) == b"y"


def test_push_refuses_beyond_max_depth(queue: RequestQueue) -> None:
    assert queue.push(b"a", max_depth=2) == 1
    assert queue.push(b"b", max_depth=2) == 2
    with pytest.raises(QueueFull):
        queue.push(b"c", max_depth=2)
    assert queue.depth() == 2


def test_claims_sit_in_the_processing_list_until_finished(
    queue: RequestQueue, redis_client: redis.Redis
) -> None:
    for item in (b"a", b"b", b"c"):
        queue.push(item)
    assert take(queue, "w1", 2) == [b"a", b"b"]
    assert redis_client.lrange(queue.keys.processing("w1"), 0, -1) == [b"a", b"b"]
    assert queue.depth() == 1
    queue.finish("w1", {"a": b"done"}, ttl=5)
    assert not redis_client.exists(queue.keys.processing("w1"))


def test_requeue_puts_claims_back_at_the_head_in_order(queue: RequestQueue) -> None:
    for item in (b"a", b"b", b"c", b"d"):
        queue.push(item)
    take(queue, "w1", 3)
    assert queue.requeue("w1") == 3
    assert take(queue, "w2", 10) == [b"a", b"b", b"c", b"d"]


def test_only_dead_workers_are_reaped(queue: RequestQueue, redis_client: redis.Redis) -> None:
    info = WorkerInfo(description="m", batch_size=4, host="h", pid=1, at=time.time())
    for item in (b"a", b"b", b"c", b"d"):
        queue.push(item)
    queue.beat("alive", info, ttl=30)
    queue.beat("doomed", info, ttl=0.2)
    take(queue, "alive", 2)
    take(queue, "doomed", 2)
    assert queue.reap_dead() == {}
    wait_until(lambda: queue.workers().get("doomed", 0) is None, what="doomed's beat expired")
    assert set(queue.workers()) == {"alive", "doomed"}
    assert queue.workers()["doomed"] is None
    assert queue.reap_dead() == {"doomed": 2}
    assert take(queue, "alive", 10) == [b"c", b"d"]
    assert set(queue.workers()) == {"alive"}
    assert queue.reap_dead() == {}, "reaping twice moves nothing twice"


def test_a_worker_beating_in_another_format_is_neither_routed_to_nor_reaped(
    queue: RequestQueue, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    info = WorkerInfo(description="m", batch_size=4, host="h", pid=1, at=time.time())
    queue.push(b"a")
    queue.beat("newer", info, ttl=30)
    take(queue, "newer", 1)
    beat = json.loads(redis_client.get(queue.keys.heartbeat("newer")))
    redis_client.set(queue.keys.heartbeat("newer"), json.dumps({**beat, "format": 2}), ex=30)
    with caplog.at_level(logging.WARNING, logger="keras_server.broker.request_queue"):
        assert queue.workers() == {}
        assert queue.reap_dead() == {}
    assert "worker newer left out: a heartbeat in message format 2" in caplog.text
    assert redis_client.llen(queue.keys.processing("newer")) == 1, "its claim stays its own"


@pytest.mark.timeout(60)
def test_claim_fills_a_batch_until_the_delay_runs_out(queue: RequestQueue) -> None:
    """A batch waits up to its delay for more; a full one returns at once
    (its delay is an hour: were it to wait, the test's timeout fails it)."""
    queue.push(b"first")
    timers = [
        threading.Timer(0.1 * (i + 1), queue.push, args=(f"late{i}".encode(),)) for i in range(3)
    ]
    for t in timers:
        t.start()
    started = time.monotonic()
    batch = take(queue, "w", 10, fill_for=0.6)
    elapsed = time.monotonic() - started
    assert batch == [b"first", b"late0", b"late1", b"late2"]
    assert elapsed > 0.3, "it waited for the late ones"
    for i in range(2):
        queue.push(b"x%d" % i)
    assert len(take(queue, "w", 2, fill_for=3600)) == 2, "a full batch does not wait"


def test_a_refused_push_leaves_nothing_behind(queue: RequestQueue) -> None:
    queue.push_all([b"a", b"b"], max_depth=3)
    with pytest.raises(QueueFull):
        queue.push_all([b"c", b"d"], max_depth=3)
    assert queue.depth() == 2
    assert take(queue, "w", 5) == [b"a", b"b"], "the refused ones were taken back, in order"


def test_a_push_claimed_before_it_was_taken_back_is_accepted(
    queue: RequestQueue, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past max_depth the payloads are taken back; any a worker claimed in
    between make the request accepted, and the rest go back on the queue."""
    queue.push(b"old")
    real_pipeline = queue.client.pipeline
    pipelines = []

    def claim_first_then_pipeline(*args: object, **kwargs: object) -> object:
        # The first transaction pushes; before the second (the take-back), a
        # worker claims everything queued.
        pipelines.append(args)
        if len(pipelines) == 2:
            assert take(queue, "w", 2) == [b"old", b"x"]
        return real_pipeline(*args, **kwargs)

    monkeypatch.setattr(queue.client, "pipeline", claim_first_then_pipeline)
    assert queue.push_all([b"x", b"y"], max_depth=2) >= 1
    monkeypatch.undo()
    assert redis_client.lrange(queue.keys.queue, 0, -1) == [b"y"], "y went back on the queue"


def test_a_sweep_moves_a_queue_of_any_length(
    queue: RequestQueue, redis_client: redis.Redis
) -> None:
    """Past Lua's `unpack` limit (about 8,000 items, what one script call
    could move) the sweep still moves everything, in order, and leaves the
    version's queue empty."""
    count = 10_500
    version = queue.of_version("1")
    for start in range(0, count, 1000):
        version.push_all([b"r%d" % i for i in range(start, min(start + 1000, count))], 2**40)
    redis_client.sadd(queue.keys.known_versions, "1")
    # Out of time at once (the heartbeat's budget): one chunk, the rest later.
    assert queue.sweep(live=set(), budget=0.0) == {"1": SWEEP_CHUNK}
    assert queue.sweep(live=set()) == {"1": count - SWEEP_CHUNK}
    assert version.depth() == 0
    assert redis_client.lrange(queue.keys.queue_at(1), 0, -1) == [b"r%d" % i for i in range(count)]


def test_a_failed_sweep_is_logged_and_counted_and_the_others_go_on(
    queue: RequestQueue, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    redis_client.sadd(queue.keys.known_versions, "1", "2")
    # Version 1's queue key holds a string: the script fails on it (WRONGTYPE).
    redis_client.set(queue.keys.for_version("1").queue_at(1), b"not a list")
    queue.of_version("2").push(b"waiting")
    before = REGISTRY.get_sample_value("keras_server_sweep_failures_total") or 0.0
    with caplog.at_level(logging.ERROR, logger="keras_server.broker.request_queue"):
        assert queue.sweep(live=set()) == {"2": 1}
    assert (REGISTRY.get_sample_value("keras_server_sweep_failures_total") or 0.0) == before + 1
    assert any("version 1: sweeping its queue failed" in r.getMessage() for r in caplog.records)
