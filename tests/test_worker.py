"""The worker loop with a small real Keras model and a real Redis."""

import dataclasses
import json
import logging
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CountingPredictor, WorkerThread, make_worker, wait_until
from prometheus_client import REGISTRY

from keras_server.broker import messages
from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.broker.request_queue import RequestQueue
from keras_server.catalog import model_specs
from keras_server.settings import Settings
from keras_server.worker.main import build_workers


def enqueue(queue: RequestQueue, n: int, timeout: float = 20) -> list[str]:
    rng = np.random.default_rng(n)
    ids = []
    for _ in range(n):
        image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        request = messages.ImageRequest.create(image, timeout)
        queue.push(messages.encode_request(request))
        ids.append(request.id)
    return ids


def answers(queue: RequestQueue, ids: list[str], timeout: float = 10) -> list[dict]:
    results = []
    for request_id in ids:
        raw = queue.wait_result(request_id, timeout)
        assert raw is not None, f"no answer for {request_id}"
        results.append(messages.decode_result(raw))
    return results


@pytest.mark.parametrize("batch_size", [1, 8, 32])
def test_queued_requests_take_ceil_n_over_b_forward_passes(
    settings: Settings, queue: RequestQueue, predictor: CountingPredictor, batch_size: int
) -> None:
    ids = enqueue(queue, 20)
    worker = make_worker(settings, predictor, batch_size)
    while worker.run_once(wait=0.5):
        pass
    assert len(predictor.batches) <= math.ceil(20 / batch_size)
    assert sum(predictor.batches) == 20
    assert max(predictor.batches) <= batch_size
    for result in answers(queue, ids):
        assert result["success"] is True
        assert len(result["predictions"]) == 5


def test_each_request_gets_its_own_prediction(
    settings: Settings, queue: RequestQueue, predictor: CountingPredictor
) -> None:
    """Batched answers go to the right requests: compare with one-by-one."""
    ids = enqueue(queue, 6)
    images = [
        messages.decode_request(raw).image for raw in queue.client.lrange(queue.keys.queue, 0, -1)
    ]
    make_worker(settings, predictor, 8).run_once(wait=1)
    for request_id, image, result in zip(ids, images, answers(queue, ids), strict=True):
        alone = predictor.inner.predict(image[None])[0]
        best = int(np.argmax(alone))
        assert result["predictions"][0]["label"] == predictor.labels[best], request_id
        assert result["predictions"][0]["probability"] == pytest.approx(
            float(alone[best]), rel=1e-4
        )


def test_a_failed_batch_answers_everyone_and_the_loop_goes_on(
    settings: Settings, queue: RequestQueue, small_classifier: object
) -> None:
    failing = CountingPredictor(small_classifier, fail=True)
    with WorkerThread(make_worker(settings, failing)) as running:
        results = answers(queue, enqueue(queue, 5))
        assert all(r["success"] is False for r in results)
        assert all("model failed" in r["error"] for r in results)
        failing.fail = False
        assert all(r["success"] for r in answers(queue, enqueue(queue, 3)))
        assert running.thread.is_alive()


def test_expired_requests_are_skipped(
    settings: Settings, queue: RequestQueue, predictor: CountingPredictor
) -> None:
    stale = enqueue(queue, 3, timeout=-1)
    fresh = enqueue(queue, 2)
    make_worker(settings, predictor).run_once(wait=1)
    assert predictor.batches == [2]
    assert all(r["success"] for r in answers(queue, fresh))
    for request_id in stale:
        assert not queue.client.exists(queue.keys.result(request_id))


def test_bad_entries_are_answered_or_dropped_without_hurting_the_batch(
    settings: Settings, queue: RequestQueue, predictor: CountingPredictor
) -> None:
    good = enqueue(queue, 1)
    queue.push(b"\x00 not json")
    wrong_shape = messages.ImageRequest.create(np.zeros((10, 10, 3), np.uint8), 20)
    queue.push(messages.encode_request(wrong_shape))
    broken = json.loads(messages.encode_request(wrong_shape).partition(b"\n")[0])
    broken.update(id="broken", dtype="object")
    queue.push(json.dumps(broken).encode())
    newer = json.loads(messages.encode_request(wrong_shape).partition(b"\n")[0])
    newer.update(id="newer", format=messages.FORMAT + 1)
    queue.push(json.dumps(newer).encode() + b"\n" + bytes(300))
    assert make_worker(settings, predictor).run_once(wait=1) == 5
    assert predictor.batches == [1]
    assert answers(queue, good)[0]["success"] is True
    shape_error = answers(queue, [wrong_shape.id])[0]
    assert shape_error["success"] is False and "does not fit" in shape_error["error"]
    assert answers(queue, ["broken"])[0] == {"success": False, "error": "the request was malformed"}
    assert answers(queue, ["newer"])[0] == {
        "success": False,
        "error": f"a request in message format 2; this server reads format {messages.FORMAT}",
    }


@pytest.mark.parametrize("where", ["flag", "models file"])
def test_the_simulated_model_answers_with_its_top_k(
    settings: Settings, queue: RequestQueue, tmp_path: Path, where: str
) -> None:
    sim = dataclasses.replace(settings, sim_batch_ms=0, sim_image_ms=0)
    if where == "flag":
        sim = dataclasses.replace(sim, model="sim", top_k=3)
    else:
        (tmp_path / "m.toml").write_text('[models.sim]\nmodel = "sim"\ntop_k = 3\n')
        sim = dataclasses.replace(sim, models_file=str(tmp_path / "m.toml"))
    (worker,) = build_workers(sim, model_specs(sim))
    ids = enqueue(queue, 2)
    assert worker.run_once(wait=1) == 2
    assert [len(result["predictions"]) for result in answers(queue, ids)] == [3, 3]


def test_loop_survives_redis_being_unreachable_and_serves_once_it_answers(
    predictor: CountingPredictor, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", redis_url_given=True)
    server = RedisServer(port=port)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="keras_server.worker.loop"),
            WorkerThread(make_worker(settings, predictor)) as running,
        ):
            # The worker marks the host down and waits for the probe to hear from it.
            wait_until(
                lambda: any("unreachable" in r.getMessage() for r in caplog.records),
                what="the worker finding Redis unreachable",
            )
            assert running.worker.queue.shard.is_down()
            assert running.thread.is_alive()
            # The heartbeat's failures are warnings, not debug lines.
            wait_until(
                lambda: any("heartbeat failed" in r.getMessage() for r in caplog.records),
                what="the heartbeat's failure logged at WARNING",
            )
            server.start()
            queue = RequestQueue.open(server.url, messages.Keys("image_queue"), timeout=1)
            assert answers(queue, enqueue(queue, 1))[0]["success"] is True
    finally:
        server.close()


def test_a_request_may_ask_for_the_whole_vector(
    settings: Settings, queue: RequestQueue, predictor: CountingPredictor
) -> None:
    """In one batch: a plain request gets its top 5 as ever; one asking for the
    probabilities gets the whole float32 vector and its top classes by index."""
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2)]
    plain = messages.ImageRequest.create(images[0], 20)
    full = messages.ImageRequest.create(images[1], 20, probabilities=True, classes=3)
    queue.push_all([messages.encode_request(r) for r in (plain, full)], max_depth=10)
    make_worker(settings, predictor, 8).run_once(wait=1)
    assert predictor.batches == [2]
    results = queue.wait_results([plain.id, full.id], timeout=5)

    assert set(messages.decode_result(results[plain.id])) == {"success", "predictions", "model"}
    header, vector = messages.decode_probabilities(results[full.id])
    want = predictor.inner.predict(images[1][None])[0]
    assert vector is not None and vector.dtype == np.float32 and vector.shape == (1000,)
    np.testing.assert_allclose(vector, want, rtol=1e-4, atol=1e-7)
    best = np.argsort(-vector, kind="stable")[:3]
    assert header["classes"] == [{"index": int(i), "label": predictor.labels[i]} for i in best]
    assert header["model"] == {"name": settings.model, "version": settings.model_version}


def test_a_poison_entry_costs_only_itself(
    settings: Settings, queue: RequestQueue, predictor: CountingPredictor
) -> None:
    # Its shape multiplies past 2**64: np.prod wrapped it to 0, it passed the
    # size check with no data, and reshape failed the whole batch.
    header = {"id": "poison", "shape": [2**32, 2**32, 1], "dtype": "uint8", "deadline": 9e9}
    header["format"] = messages.FORMAT
    queue.push(json.dumps(header).encode() + b"\n")
    good = enqueue(queue, 8)
    worker = make_worker(settings, predictor, batch_size=16)
    assert worker.run_once(wait=1) == 9
    assert [a["success"] for a in answers(queue, good)] == [True] * 8
    assert answers(queue, ["poison"])[0] == {"success": False, "error": "the request was malformed"}
    assert queue.client.llen(queue.keys.processing(worker.id)) == 0


class BrokenLabels(CountingPredictor):
    """The model runs; building the answers after it fails (no labels)."""

    def __init__(self, inner: object) -> None:
        super().__init__(inner)
        self.labels = ()


def test_a_failure_outside_predict_answers_the_batch_and_clears_the_claim(
    settings: Settings, queue: RequestQueue, predictor: CountingPredictor
) -> None:
    model = BrokenLabels(predictor.inner)
    worker = make_worker(settings, model, batch_size=4)
    with WorkerThread(worker):
        ids = enqueue(queue, 3)
        for answer in answers(queue, ids):
            assert answer["success"] is False and "worker log" in answer["error"]
        wait_until(lambda: queue.client.llen(queue.keys.processing(worker.id)) == 0)
        model.labels = predictor.labels  # the loop still runs and now serves
        assert answers(queue, enqueue(queue, 2))[0]["success"] is True


def test_a_heartbeat_that_raises_is_restarted_counted_and_pauses_claiming(
    settings: Settings,
    queue: RequestQueue,
    predictor: CountingPredictor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in the heartbeat (not a Redis error) neither ends it quietly nor
    leaves the claim loop claiming requests that others would reap."""
    ttl = 0.9
    worker = make_worker(settings, predictor, heartbeat_ttl=ttl)
    real = worker.heartbeat
    failing = threading.Event()
    calls: list[float] = []

    def heartbeat() -> None:
        calls.append(time.monotonic())
        if failing.is_set():
            raise RuntimeError("injected heartbeat bug")
        real()

    worker.heartbeat = heartbeat  # type: ignore[method-assign]
    failed = "keras_server_heartbeat_failures_total"
    failures_before = REGISTRY.get_sample_value(failed, {"reason": "error"}) or 0.0
    paused_before = REGISTRY.get_sample_value("keras_server_claims_paused_total") or 0.0
    with caplog.at_level(logging.WARNING, logger="keras_server.worker.loop"), WorkerThread(worker):
        assert answers(queue, enqueue(queue, 1))[0]["success"] is True
        failing.set()
        # The claim loop is in its pause (not inside a claim) once it counted it.
        wait_until(
            lambda: (
                (REGISTRY.get_sample_value("keras_server_claims_paused_total") or 0.0)
                > paused_before
            ),
            what="the claim loop pausing",
        )
        raised = len(calls)
        ids = enqueue(queue, 1)
        # Past the heartbeat's expiry (1.5 TTLs): the request stays queued.
        time.sleep(1.5 * ttl)
        assert queue.depth() == 1
        assert worker.beats_stale()
        # The heartbeat went on after each bug: restarted and counted.
        assert len(calls) >= raised + 2
        failures = REGISTRY.get_sample_value(failed, {"reason": "error"}) or 0.0
        assert failures - failures_before >= 3
        failing.clear()
        assert answers(queue, ids)[0]["success"] is True
    logged = [r for r in caplog.records if r.exc_info and "injected" in str(r.exc_info[1])]
    assert logged and all(r.levelno >= logging.WARNING for r in logged)
