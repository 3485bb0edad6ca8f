"""The Redis queue, against a real redis-server."""

import threading
import time

import redis

from keras_server.queue import RequestQueue, connect
from keras_server.settings import Settings


def test_claim_takes_oldest_first_up_to_the_batch_size(queue: RequestQueue) -> None:
    for i in range(5):
        queue.push(f"m{i}".encode())
    assert queue.claim(3, wait=1) == [b"m0", b"m1", b"m2"]
    assert queue.depth() == 2
    assert queue.claim(3, wait=1) == [b"m3", b"m4"]
    assert queue.depth() == 0


def test_claim_of_one(queue: RequestQueue) -> None:
    queue.push(b"a")
    queue.push(b"b")
    assert queue.claim(1, wait=1) == [b"a"]


def test_claim_blocks_until_work_arrives(queue: RequestQueue) -> None:
    timer = threading.Timer(0.3, queue.push, args=(b"late",))
    timer.start()
    started = time.monotonic()
    assert queue.claim(4, wait=5) == [b"late"]
    assert 0.2 < time.monotonic() - started < 4
    timer.join()


def test_claim_on_an_empty_queue_gives_up_after_wait(queue: RequestQueue) -> None:
    started = time.monotonic()
    assert queue.claim(4, wait=0.2) == []
    assert time.monotonic() - started >= 0.15


def test_two_concurrent_consumers_take_each_item_exactly_once(
    queue: RequestQueue, redis_client: redis.Redis, settings: Settings
) -> None:
    total = 2000
    taken: list[list[bytes]] = [[], []]
    producing = threading.Event()

    def consume(into: list[bytes]) -> None:
        own = RequestQueue(connect(settings.redis_url, block_seconds=1), queue.keys)
        while producing.is_set() or own.depth():
            into.extend(own.claim(7, wait=0.05))

    producing.set()
    consumers = [threading.Thread(target=consume, args=(t,)) for t in taken]
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
    queue.put_results({"r1": b"one", "r2": b"two"}, ttl=30)
    ttl = redis_client.pttl(queue.keys.result("r2"))
    assert 0 < ttl <= 30_000
    assert queue.wait_result("r1", timeout=1) == b"one"
    assert not redis_client.exists(queue.keys.result("r1")), "BLPOP leaves nothing behind"
    queue.put_results({"r3": b"three"}, ttl=0.2)
    time.sleep(0.4)
    assert queue.wait_result("r3", timeout=0.1) is None


def test_wait_result_blocks_until_answered(queue: RequestQueue) -> None:
    timer = threading.Timer(0.3, queue.put_results, args=({"late": b"ok"}, 10))
    timer.start()
    assert queue.wait_result("late", timeout=5) == b"ok"
    timer.join()


def test_wait_result_times_out(queue: RequestQueue) -> None:
    started = time.monotonic()
    assert queue.wait_result("nobody", timeout=0.3) is None
    assert time.monotonic() - started >= 0.25


def test_writes_join_a_callers_transaction(queue: RequestQueue, redis_client: redis.Redis) -> None:
    with redis_client.pipeline(transaction=True) as pipe:
        queue.push(b"x", pipe=pipe)
        queue.put_results({"id": b"y"}, ttl=5, pipe=pipe)
        assert queue.depth() == 0, "nothing is written before EXEC"
        pipe.execute()
    assert queue.depth() == 1
    assert queue.wait_result("id", timeout=1) == b"y"
