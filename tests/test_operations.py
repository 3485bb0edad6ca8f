"""Health probes and Prometheus metrics, in one process and across granian's
web processes: the request metrics labelled with the version that answered
(a failing canary beside a stable version), the jobs' metrics."""

import base64
import dataclasses
import http.server
import io
import threading
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
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
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from keras_server.broker import messages
from keras_server.broker.request_queue import RequestQueue
from keras_server.broker.shards import label
from keras_server.engines.simulated import SimulatedModel
from keras_server.settings import Settings
from keras_server.web.app import create_app
from keras_server.worker.callbacks import CallbackSender
from keras_server.worker.loop import Worker


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


def versioned_worker(settings: Settings, version: str, predictor: object) -> Worker:
    """A worker of `version` of the model `settings` name, claiming its version's own queue."""
    keys = messages.Keys(settings.queue_name)
    queue = RequestQueue.open(
        settings.redis_url, keys, timeout=1, levels=settings.priority_levels, version=version
    )
    return Worker(queue, predictor, 8, result_ttl=20, name=settings.model, version=version)


def test_request_metrics_carry_the_version_that_answered(settings: Settings) -> None:
    """Version 1 answers, version 2 (the canary) has a model that raises:
    its 500s are counted under version 2, version 1's 200s under version 1,
    whichever route (pinned, the traffic policy's latest, v2); a request no
    model answered is counted under "" (an unknown model or version, a probe)."""
    sim = dataclasses.replace(settings, model="sim")
    client = create_app(sim).test_client()
    stable = versioned_worker(sim, "1", SimulatedModel(0, 0))
    canary = versioned_worker(sim, "2", CountingPredictor(SimulatedModel(0, 0), fail=True))
    before = client.get("/metrics").get_data(as_text=True)
    with WorkerThread(stable), WorkerThread(canary):
        wait_until(
            lambda: client.get("/models").get_json()["models"][0]["versions"] == ["1", "2"],
            what="both versions live",
        )
        for _ in range(3):
            assert (
                post_images(client, CHELSEA, path="/models/sim/versions/1/predict").status_code
                == 200
            )
        for _ in range(2):
            assert (
                post_images(client, CHELSEA, path="/models/sim/versions/2/predict").status_code
                == 500
            )
        # Unversioned: the policy is `latest`, version 2.
        assert post_images(client, CHELSEA).status_code == 500
        image = {"name": "image", "datatype": "BYTES", "shape": [1]}
        infer = {"inputs": [{**image, "data": [base64.b64encode(CHELSEA).decode()]}]}
        assert client.post("/v2/models/sim/versions/2/infer", json=infer).status_code == 500
        assert client.post("/v2/models/sim/versions/1/infer", json=infer).status_code == 200
        assert (
            post_images(client, CHELSEA, path="/models/sim/versions/9/predict").status_code == 404
        )
        assert post_images(client, CHELSEA, path="/models/other/predict").status_code == 404
        assert client.get("/healthz").status_code == 200
        after = client.get("/metrics").get_data(as_text=True)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    total = "keras_server_http_requests_total"
    pinned = "/models/<name>/versions/<version>/predict"
    infer_route = "/v2/models/<name>/versions/<version>/infer"
    assert delta(total, endpoint=pinned, status="200", model="sim", version="1") == 3
    assert delta(total, endpoint=pinned, status="500", model="sim", version="2") == 2
    assert delta(total, endpoint="/predict", status="500", model="sim", version="2") == 1
    assert delta(total, endpoint=infer_route, status="500", model="sim", version="2") == 1
    assert delta(total, endpoint=infer_route, status="200", model="sim", version="1") == 1
    # Version 9 is not served: known model, no version.
    assert delta(total, endpoint=pinned, status="404", model="sim", version="") == 1
    assert delta(total, endpoint="/models/<name>/predict", status="404", model="", version="") == 1
    assert delta(total, endpoint="/healthz", status="200", model="", version="") == 1
    seconds = "keras_server_http_request_seconds_count"
    assert delta(seconds, endpoint=pinned, model="sim", version="1") == 3
    assert delta(seconds, endpoint=pinned, model="sim", version="2") == 2


class Receiver(http.server.BaseHTTPRequestHandler):
    """A job's callback receiver: /ok takes it (204), /down answers 500."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204 if self.path == "/ok" else 500)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def post_job(client: FlaskClient, images: list[bytes], callback_url: str) -> str:
    """POST /jobs; its status URL."""
    data = {"image": [(io.BytesIO(b), f"{i}.png") for i, b in enumerate(images)]}
    answer = client.post(
        "/jobs",
        data={**data, "callback_url": callback_url},
        content_type="multipart/form-data",
    )
    assert answer.status_code == 202, answer.get_json()
    return answer.headers["Location"]


def test_job_metrics_backlog_items_and_callbacks(settings: Settings, receiver: str) -> None:
    """A job of five images and one that is not an image, submitted while
    no worker runs: the bad one is a failed item at once, three wait in the
    backlog (the web server feeds two batches of one onto the queue); a
    worker then runs it: five items succeeded, and its callback to a
    receiver that answers 500 is given up (failed). A second job's callback
    is delivered."""
    jobs = dataclasses.replace(
        settings,
        model="sim",
        batch_size=1,
        callback_hosts=urlsplit(receiver).netloc,  # host:port: an entry allows its port alone
        callback_secret="s3cret",
    )
    client = create_app(jobs).test_client()
    model = {"model": "sim", "shard": label(jobs.redis_url)}

    def scrape() -> str:
        return client.get("/metrics").get_data(as_text=True)

    def scrape_until(check: Callable[[str], bool], what: str) -> str:
        return wait_until(lambda: t if check(t := scrape()) else None, what=what)  # type: ignore[return-value]

    before = scrape()

    def delta(text: str, name: str, **labels: str) -> float:
        return value(text, name, **labels) - value(before, name, **labels)

    items, callbacks = "keras_server_job_items_total", "keras_server_callbacks_total"
    first = post_job(client, [CHELSEA] * 5 + [b"not an image"], receiver + "/down")
    waiting = scrape_until(
        lambda t: value(t, "keras_server_job_backlog", **model) == 3, "the backlog in the survey"
    )
    assert delta(waiting, items, model="sim", result="failed") == 1  # counted by the web tier
    assert delta(waiting, items, model="sim", result="succeeded") == 0
    sender = CallbackSender(jobs.callback_hosts, jobs.callback_secret, first_backoff=0.01)
    # Pending callbacks are polled at each beat (a third of the TTL): 3 s
    # rather than 10 s, so the five tries are given up in seconds.
    worker = make_worker(jobs, SimulatedModel(0, 0), callbacks=sender, heartbeat_ttl=3.0)
    with WorkerThread(worker):
        wait_until(lambda: client.get(first).get_json()["state"] == "done", what="the job done")
        given_up = scrape_until(
            lambda t: delta(t, callbacks, outcome="given_up") == 1, "the callback given up"
        )
        post_job(client, [CHELSEA], receiver + "/ok")
        delivered = scrape_until(
            lambda t: delta(t, callbacks, outcome="delivered") == 1, "the second job's callback"
        )
    assert delta(given_up, items, model="sim", result="succeeded") == 5
    assert delta(given_up, callbacks, outcome="delivered") == 0
    assert delta(delivered, items, model="sim", result="succeeded") == 6
    assert delta(delivered, items, model="sim", result="failed") == 1
    assert value(delivered, "keras_server_job_backlog", **model) == 0
