"""Health probes and Prometheus metrics, in one process and across granian's web processes."""

import dataclasses

import pytest
import requests
from conftest import CHELSEA, WorkerThread, make_worker, post_images, start_web, stop, wait_until
from prometheus_client.parser import text_string_to_metric_families

from keras_server.broker.request_queue import RequestQueue
from keras_server.broker.shards import label
from keras_server.engines.simulated import SimulatedModel
from keras_server.settings import Settings
from keras_server.web.app import create_app


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def test_healthz_is_always_ok(settings: Settings) -> None:
    down = dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0")
    response = create_app(down).test_client().get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_needs_a_live_worker(settings: Settings, small_classifier: object) -> None:
    client = create_app(settings).test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    where = label(settings.redis_url)
    assert response.get_json() == {
        "ready": False,
        "reason": f"no live worker for model 'resnet50' at {where}",
    }
    with WorkerThread(make_worker(settings, small_classifier, description="small model")):
        ready = wait_until(lambda: (r := client.get("/readyz")).status_code == 200 and r)
        assert ready.status_code == 200
        body = ready.get_json()
        assert body == {"ready": True, "workers": 1, "claim_loops": 1, "models": ["small model"]}
    # A stopped worker deregisters: the process's survey shows it within REFRESH_S.
    wait_until(lambda: client.get("/readyz").status_code == 503, what="the worker gone")


def test_readyz_without_redis(settings: Settings) -> None:
    down = dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0")
    response = create_app(down).test_client().get("/readyz")
    assert response.status_code == 503
    assert "Redis at 127.0.0.1:1/0 is unreachable" in response.get_json()["reason"]


def test_metrics_count_requests_batches_queue_and_heartbeats(
    settings: Settings, queue: RequestQueue, predictor: object
) -> None:
    client = create_app(settings).test_client()
    before = client.get("/metrics").get_data(as_text=True)
    with WorkerThread(make_worker(settings, predictor)) as running:
        assert post_images(client, CHELSEA).status_code == 200
        client.post("/predict")  # a 400
        live = {"model": "resnet50", "shard": label(settings.redis_url)}

        def scraped() -> object:
            # The queue gauges come from the process's survey, renewed within REFRESH_S.
            found = client.get("/metrics")
            text = found.get_data(as_text=True)
            return found if value(text, "keras_server_workers_live", **live) == 1 else None

        response = wait_until(scraped, what="the worker in the scraped survey")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    after = response.get_data(as_text=True)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Labelled with the model and version that answered: the 400 (no file)
    # was routed to the model, on its shared queue, which no version is sure to answer.
    answered = {"model": "resnet50", "version": "1"}
    routed = {"model": "resnet50", "version": ""}
    requests_total = "keras_server_http_requests_total"
    assert delta(requests_total, endpoint="/predict", status="200", **answered) == 1
    assert delta(requests_total, endpoint="/predict", status="400", **routed) == 1
    assert delta("keras_server_http_request_seconds_count", endpoint="/predict", **answered) == 1
    assert delta("keras_server_http_request_seconds_count", endpoint="/predict", **routed) == 1
    assert delta("keras_server_batch_size_count") >= 1
    assert delta("keras_server_inference_seconds_count") >= 1
    shard = label(settings.redis_url)
    model = {"model": "resnet50", "shard": shard}
    assert delta("keras_server_queued_requests_total", **model) == 1
    assert value(after, "keras_server_redis_up", shard=shard) == 1
    assert value(after, "keras_server_workers_live", **model) == 1
    age = value(
        after, "keras_server_worker_heartbeat_age_seconds", **model, worker=running.worker.id
    )
    assert 0 <= age < 10

    queue.push(b"waiting")
    queue.push(b"waiting")
    queue.push(b"waiting", level=2)

    def idle_scrape() -> str | None:
        text = client.get("/metrics").get_data(as_text=True)
        return text if value(text, "keras_server_workers_live", **model) == 0 else None

    idle = wait_until(idle_scrape, what="a survey after the worker left")
    assert value(idle, "keras_server_queue_depth", **model, level="1") == 2
    assert value(idle, "keras_server_queue_depth", **model, level="2") == 1
    assert value(idle, "keras_server_workers_live", **model) == 0


def test_metrics_while_redis_is_down(settings: Settings) -> None:
    down = dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0")
    text = create_app(down).test_client().get("/metrics").get_data(as_text=True)
    assert value(text, "keras_server_redis_up", shard="127.0.0.1:1/0") == 0


@pytest.mark.slow
def test_metrics_add_up_across_web_processes(settings: Settings) -> None:
    web, base = start_web(settings, "--web-workers", "3")
    try:
        with WorkerThread(make_worker(settings, SimulatedModel(5, 0))):
            for _ in range(12):
                response = requests.post(
                    base + "/predict", files={"image": ("x.png", CHELSEA)}, timeout=30
                )
                assert response.status_code == 200
            assert requests.get(base + "/readyz", timeout=5).json()["ready"] is True
            scrapes = [requests.get(base + "/metrics", timeout=5).text for _ in range(6)]
    finally:
        log = stop(web)
    assert web.returncode == 0, log
    for text in scrapes:
        # Whichever process answers the scrape, it reports all of them.
        answered = {"endpoint": "/predict", "model": "resnet50", "version": "1"}
        assert value(text, "keras_server_http_requests_total", status="200", **answered) == 12
        assert value(text, "keras_server_http_request_seconds_count", **answered) == 12
