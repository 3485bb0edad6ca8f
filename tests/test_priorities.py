"""Priorities and per-request deadlines (issue 19, part 2), against a real
redis-server: one queue per level, claims highest level first, a dead
worker's claims back on their own level, the per-level cap, the wake-up list,
entries from before priorities; the web tier's X-Priority / X-Request-Timeout
and v2 parameters (400s, the cap by --result-timeout, 504 for an expired
request, which no worker then runs); and a real server end to end."""

import base64
import dataclasses
import json
import threading
import time

import numpy as np
import pytest
import redis
import requests
from conftest import (
    CHELSEA,
    CountingPredictor,
    WorkerThread,
    make_worker,
    post_images,
    start_web,
    stop,
    wait_until,
)
from hypothesis import given
from hypothesis import strategies as st

from keras_server.broker import messages
from keras_server.broker.request_queue import QueueFull, RequestQueue
from keras_server.broker.scripts import WAKEUP_TOKENS
from keras_server.catalog import SIM_SIZE
from keras_server.engines.simulated import SimulatedModel
from keras_server.serving.admission import Urgency
from keras_server.serving.failures import Failure
from keras_server.settings import Settings
from keras_server.web.app import create_app


def request_at(level: int, timeout: float = 20) -> bytes:
    image = np.zeros((SIM_SIZE, SIM_SIZE, 3), np.uint8)
    return messages.encode_request(messages.ImageRequest.create(image, timeout, priority=level))


def ids(raws: list[bytes]) -> list[str]:
    return [messages.decode_request(r).id for r in raws]


def take(queue: RequestQueue, n: int, max_lower: int | None = None) -> list[bytes]:
    first = queue.claim_first("w", 1)
    assert first is not None
    lower = None if max_lower is None else max_lower - (messages.priority_of(first) > 1)
    return [first, *queue.claim_more("w", n - 1, 0, max_lower=lower)]


def test_keys_keep_level_one_on_the_plain_name() -> None:
    keys = messages.Keys("q")
    # The name in braces: a Redis Cluster hash tag (Keys.tag).
    assert keys.queue_at(1) == keys.queue == "{q}"
    assert keys.queues(3) == ["{q}", "{q}:level:2", "{q}:level:3"]
    with pytest.raises(ValueError, match="collide"):
        messages.Keys.for_model("q", "level", "default")


def test_claims_take_the_highest_level_first(queue: RequestQueue) -> None:
    low = [request_at(2) for _ in range(3)]
    high = [request_at(1) for _ in range(2)]
    for raw in low:
        queue.push(raw, level=2)
    for raw in high:
        queue.push(raw, level=1)
    assert queue.depths() == [2, 3]
    assert queue.depth(up_to=1) == 2
    assert ids(take(queue, 4)) == ids(high + low[:2]), "level 1 first, then level 2, each FIFO"
    assert queue.depths() == [0, 1]


def test_lower_levels_fill_a_batch_only_up_to_max_lower(queue: RequestQueue) -> None:
    for _ in range(5):
        queue.push(request_at(2), level=2)
    queue.push(request_at(1), level=1)
    batch = take(queue, 8, max_lower=2)
    assert [messages.priority_of(r) for r in batch] == [1, 2, 2]
    batch = take(queue, 8, max_lower=2)
    assert [messages.priority_of(r) for r in batch] == [2, 2], "a lower-only batch is capped too"


def test_the_cap_is_per_level(queue: RequestQueue) -> None:
    queue.push_all([b"a", b"b"], max_depth=2, level=2)
    with pytest.raises(QueueFull):
        queue.push_all([b"c"], max_depth=2, level=2)
    assert queue.push_all([b"d", b"e"], max_depth=2, level=1) == 2, (
        "a full level 2 refuses no level 1"
    )
    with pytest.raises(ValueError, match=r"not in 1\.\.2"):
        queue.push(b"x", level=3)


@pytest.mark.timeout(60)
def test_a_push_at_any_level_wakes_a_blocked_claim(queue: RequestQueue) -> None:
    """Woken by the push, not by the wait running out: the wait is an hour,
    and the test's timeout (60 s) fails it if the push does not wake it."""
    raw = request_at(2)
    timer = threading.Timer(0.3, queue.push, args=(raw,), kwargs={"level": 2})
    timer.start()
    assert queue.claim_first("w", wait=3600) == raw
    timer.join()


def test_wake_up_tokens_never_pile_up(queue: RequestQueue, redis_client: redis.Redis) -> None:
    for _ in range(3 * WAKEUP_TOKENS):
        queue.push(b"x", level=2)
    assert redis_client.llen(queue.keys.wakeup) == WAKEUP_TOKENS
    while take(queue, 50):
        if not queue.depth():
            break
    assert not redis_client.exists(queue.keys.wakeup), "emptied queues leave no token"


def test_a_dead_workers_claims_go_back_to_their_own_levels(
    queue: RequestQueue, redis_client: redis.Redis
) -> None:
    old = json.dumps({"id": "old", "shape": [1], "dtype": "uint8", "deadline": 9e9}).encode()
    one, two, far = request_at(1), request_at(2), request_at(7)  # 7: past the last level
    queue.push(b"waiting-2", level=2)
    queue.push(b"waiting-1", level=1)
    for raw in (one, old, two, far):
        redis_client.rpush(queue.keys.processing("dead"), raw)
    queue.beat("dead", messages.WorkerInfo("x", 1, "h", 1, 0.0), ttl=0.05)
    time.sleep(0.1)
    assert queue.reap_dead() == {"dead": 4}
    assert redis_client.lrange(queue.keys.queue_at(1), 0, -1) == [one, old, b"waiting-1"]
    assert redis_client.lrange(queue.keys.queue_at(2), 0, -1) == [two, far, b"waiting-2"]
    assert redis_client.llen(queue.keys.wakeup) >= 1, "blocked workers are woken"
    assert not redis_client.exists(queue.keys.processing("dead"))


def test_the_worker_serves_level_one_first(
    settings: Settings, queue: RequestQueue, redis_client: redis.Redis
) -> None:
    predictor = CountingPredictor(SimulatedModel(0, 0))
    worker = make_worker(settings, predictor, batch_size=2, max_lower=1)
    image = np.zeros((SIM_SIZE, SIM_SIZE, 3), np.uint8)
    # Pushed after the level-2 requests, with no priority in its header: level 1.
    first = messages.ImageRequest(id="first", image=image, deadline=time.time() + 20)
    lows = [request_at(2) for _ in range(3)]
    for raw in lows:
        queue.push(raw, level=2)
    queue.push(messages.encode_request(first), level=1)
    assert worker.run_once(1) == 2
    answered = {
        k.decode().rsplit(":", 1)[1] for k in redis_client.keys(f"{queue.keys.result('*')}")
    }
    assert answered == {"first", ids(lows)[0]}, "the level-1 request, and one level-2 (max_lower)"
    assert worker.run_once(1) == 1, "a batch from below level 1 holds max_lower"
    assert predictor.batches == [2, 1]


# -- the web tier --------------------------------------------------------------


def test_x_priority_and_x_request_timeout_out_of_range_are_400(
    settings: Settings, redis_client: redis.Redis
) -> None:
    client = create_app(settings).test_client()
    for header, value, text in [
        ("X-Priority", "0", "from 1 (the highest) to 2"),
        ("X-Priority", "3", "from 1 (the highest) to 2"),
        ("X-Priority", "high", "X-Priority must be a whole number"),
        ("X-Request-Timeout", "0", "greater than 0"),
        ("X-Request-Timeout", "-1", "greater than 0"),
        ("X-Request-Timeout", "nan", "X-Request-Timeout must be a number of seconds"),
        ("X-Request-Timeout", "1e3", "X-Request-Timeout must be a number of seconds"),
    ]:
        response = post_images(client, CHELSEA, headers={header: value})
        assert response.status_code == 400, (header, value)
        assert text in response.get_json()["error"]
    assert not redis_client.keys(f"{settings.queue_name}*"), "a refused request queues nothing"


def test_v2_parameters_out_of_range_are_400(settings: Settings) -> None:
    client = create_app(settings).test_client()
    data = base64.b64encode(CHELSEA).decode()
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [data]}
    for parameters, text in [
        ({"priority": 3}, "parameters.priority must be a whole number from 1 (the highest) to 2"),
        ({"priority": "1"}, "parameters.priority"),
        ({"priority": True}, "parameters.priority"),
        ({"timeout": -1}, "parameters.timeout must be a number of microseconds"),
        ({"timeout": 1.5}, "parameters.timeout"),
    ]:
        body = {"inputs": [tensor], "parameters": parameters}
        response = client.post("/v2/models/resnet50/infer", json=body)
        assert response.status_code == 400, parameters
        assert text in response.get_json()["error"]


def test_an_expired_request_is_504_and_never_run(
    settings: Settings, queue: RequestQueue, redis_client: redis.Redis
) -> None:
    """No worker yet: the request waits its own timeout (capped by
    --result-timeout) at its level, answers 504, and a worker that comes
    later skips it without running it."""
    capped = dataclasses.replace(settings, result_timeout=0.5)
    client = create_app(capped).test_client()
    response = post_images(client, CHELSEA, headers={"X-Priority": "2", "X-Request-Timeout": "99"})
    assert response.status_code == 504
    assert "no prediction within 0.5 s" in response.get_json()["error"]
    [raw] = redis_client.lrange(queue.keys.queue_at(2), 0, -1)
    request = messages.decode_request(raw)
    assert request.priority == 2
    assert request.expired()
    predictor = CountingPredictor(SimulatedModel(0, 0))
    assert make_worker(settings, predictor).run_once(1) == 1
    assert predictor.batches == [], "an expired request is never run"
    assert not redis_client.exists(queue.keys.result(request.id))


def test_v2_timeout_in_microseconds_and_priority(
    settings: Settings, queue: RequestQueue, redis_client: redis.Redis
) -> None:
    client = create_app(settings).test_client()
    data = base64.b64encode(CHELSEA).decode()
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [data]}
    body = {"inputs": [tensor], "parameters": {"priority": 2, "timeout": 300_000}}
    started = time.time()
    response = client.post("/v2/models/resnet50/infer", json=body)
    ended = time.time()
    assert response.status_code == 504
    assert "no prediction within 0.3 s" in response.get_json()["error"]
    [raw] = redis_client.lrange(queue.keys.queue_at(2), 0, -1)
    # 0.3 s from when the request came in, which is between started and ended.
    deadline = messages.decode_request(raw).deadline
    assert started + 0.3 - 0.01 <= deadline <= ended + 0.3 + 0.01


@given(priority=st.one_of(st.none(), st.text()), seconds=st.one_of(st.none(), st.text()))
def test_header_parsing_answers_400_or_a_value_in_range(
    priority: str | None, seconds: str | None
) -> None:
    settings = Settings(priority_levels=3, result_timeout=10)
    headers = {
        k: v for k, v in (("X-Priority", priority), ("X-Request-Timeout", seconds)) if v is not None
    }
    try:
        urgency = Urgency.from_headers(headers, settings)
    except Failure as exc:
        status = exc.status
    else:
        status = 200
    assert status in (200, 400)
    if status == 400:
        return
    assert 1 <= urgency.priority <= 3
    assert 0 < urgency.timeout <= 10


@pytest.mark.slow
def test_a_real_server_serves_each_level(settings: Settings) -> None:
    """A real web server (granian) and worker thread: level 2 and v2's
    priority are served; a bad header is its 400."""
    process, base = start_web(settings, "--model", "sim")
    try:
        with WorkerThread(make_worker(settings, SimulatedModel(1, 0))):
            files = {"image": ("x.png", CHELSEA)}
            for level in ("1", "2"):
                response = requests.post(
                    f"{base}/predict", files=files, headers={"X-Priority": level}, timeout=20
                )
                assert response.status_code == 200, response.text
            data = base64.b64encode(CHELSEA).decode()
            tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [data]}
            body = {"inputs": [tensor], "parameters": {"priority": 2, "timeout": 10_000_000}}
            response = requests.post(f"{base}/v2/models/sim/infer", json=body, timeout=20)
            assert response.status_code == 200, response.text
            response = requests.post(
                f"{base}/predict", files=files, headers={"X-Priority": "9"}, timeout=20
            )
            assert response.status_code == 400
            assert "from 1 (the highest) to 2" in response.json()["error"]
    finally:
        stop(process)


def test_lower_levels_fill_whole_batches_without_level_one_traffic(
    settings: Settings, queue: RequestQueue
) -> None:
    predictor = CountingPredictor(SimulatedModel(0, 0))
    worker = make_worker(settings, predictor, batch_size=4, max_lower=1)
    for _ in range(3):
        queue.push(request_at(2), level=2)
    assert worker.run_once(1) == 3, "no level-1 request lately: max_lower does not apply"


def test_after_a_level_one_batch_the_worker_holds_for_the_next(
    settings: Settings, queue: RequestQueue
) -> None:
    predictor = CountingPredictor(SimulatedModel(0, 0))
    worker = make_worker(settings, predictor, batch_size=4, hold=30.0)
    queue.push(request_at(1))
    assert worker.run_once(1) == 1
    queue.push(request_at(2), level=2)
    assert worker.run_once(0.3) == 0, "held for level 1: the level-2 request waits"
    assert queue.depths() == [0, 1]
    queue.push(request_at(1))
    queue.push(request_at(2), level=2)
    assert worker.run_once(1) == 3, "level 1 first, the level-2 ones ride along"
    queue.push(request_at(2), level=2)
    assert worker.run_once(0.3) == 0, "each level-1 batch holds again"
    assert worker.run_once(1) == 1, "the hold is over: level 2 is taken"


def test_the_claim_limits_the_levels_below_the_protected_one(settings: Settings) -> None:
    queue = RequestQueue.open(
        settings.redis_url, messages.Keys(settings.queue_name), timeout=1, levels=3
    )
    for level in (3, 3, 3, 2, 2, 1):
        queue.push(request_at(level), level=level)
    batch = queue.claim_more("w", 8, 0, max_lower=1, protected=2)
    assert [messages.priority_of(r) for r in batch] == [1, 2, 2, 3], "levels 1-2 are the top"
    assert queue.claim_more("w", 8, 0, max_lower=0, protected=2) == []
    assert len(queue.claim_more("w", 8, 0, max_lower=0, protected=3)) == 2, "nothing below 3"


def test_the_worker_protects_level_two_from_level_three(settings: Settings) -> None:
    three = dataclasses.replace(settings, priority_levels=3)
    predictor = CountingPredictor(SimulatedModel(0, 0))
    worker = make_worker(three, predictor, batch_size=4, max_lower=1)
    queue = worker.queue
    for _ in range(3):
        queue.push(request_at(3), level=3)
    assert worker.run_once(1) == 3, "level 3 alone: whole batches"
    for _ in range(3):
        queue.push(request_at(3), level=3)
    assert worker.run_once(1) == 3, "level 3 seen lately protects nothing: it is the lowest"
    queue.push(request_at(2), level=2)
    assert worker.run_once(1) == 1
    assert worker.protected() == 2
    for _ in range(4):
        queue.push(request_at(3), level=3)
    queue.push(request_at(2), level=2)
    assert worker.run_once(1) == 2, "the level-2 request and max_lower level-3 ones"
    assert worker.run_once(1) == 1, "a batch from below level 2 holds max_lower"
    queue.push(request_at(1), level=1)
    queue.push(request_at(2), level=2)
    assert worker.run_once(1) == 3, "levels 1 and 2, and max_lower level-3 ones"
    assert worker.protected() == 1, "level 1 seen"
    queue.push(request_at(2), level=2)
    queue.push(request_at(2), level=2)
    assert worker.run_once(1) == 1, "level 2 is below the protected level now"
    assert queue.depths() == [0, 1, 1]


def test_after_a_level_two_batch_the_worker_holds_for_the_next(settings: Settings) -> None:
    """With three levels and no level-1 traffic, level 2 is protected: the
    hold waits for a level-2 request while level-3 ones wait."""
    three = dataclasses.replace(settings, priority_levels=3)
    predictor = CountingPredictor(SimulatedModel(0, 0))
    worker = make_worker(three, predictor, batch_size=4, hold=30.0)
    queue = worker.queue
    queue.push(request_at(2), level=2)
    assert worker.run_once(1) == 1
    queue.push(request_at(3), level=3)
    assert worker.run_once(0.3) == 0, "held for level 2: the level-3 request waits"
    assert queue.depths() == [0, 0, 1]
    assert worker.run_once(1) == 1, "the hold is over: level 3 is taken"
    queue.push(request_at(2), level=2)
    assert worker.run_once(1) == 1  # each level-2 batch holds again
    queue.push(request_at(3), level=3)
    # The held claim waits for the level-2 push: one that took any level
    # would take the level-3 request at once, alone.
    timer = threading.Timer(0.3, queue.push, args=(request_at(2),), kwargs={"level": 2})
    timer.start()
    assert worker.run_once(30) == 2, "the level-2 request first, the level-3 one rides along"
    timer.join()
    assert predictor.batches == [1, 1, 1, 2]


def test_one_push_of_two_wakes_two_blocked_workers(
    queue: RequestQueue, redis_client: redis.Redis
) -> None:
    got: dict[str, bytes | None] = {}

    def claim(worker_id: str) -> None:
        got[worker_id] = queue.claim_first(worker_id, wait=20)

    def blocked() -> int:
        return redis_client.info("clients")["blocked_clients"]

    already = blocked()
    threads = [threading.Thread(target=claim, args=(w,)) for w in ("a", "b")]
    for thread in threads:
        thread.start()
    wait_until(lambda: blocked() >= already + 2, what="both claims blocked on the wake-up list")
    queue.push_all([b"x", b"y"], max_depth=10, level=2)
    for thread in threads:
        thread.join(10)
    assert sorted(got.values()) == [b"x", b"y"], "each woken by its own token, at once"
