"""The scaled-out topology with real parts: 2 Redis shards, 2 granian web
servers, 2 workers (simulated model) and nginx round-robin in front."""

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import system_tool
from prometheus_client.parser import text_string_to_metric_families

from keras_server.broker.messages import Keys
from keras_server.broker.request_queue import RequestQueue
from keras_server.broker.shards import label
from run_cluster import Cluster, Part
from stress_test import Load
from stress_test import run as load

pytestmark = pytest.mark.slow

CHELSEA = Path(__file__).resolve().parent.parent / "images" / "chelsea.png"
SIM = ["--model", "sim", "--sim-batch-ms", "20", "--sim-image-ms", "1", "--batch-size", "8"]


@pytest.fixture(scope="module")
def nginx() -> str:
    """nginx (Debian's nginx-light, installed before the tests by `make test`)."""
    return system_tool("/usr/sbin/nginx")


@pytest.fixture
def cluster(nginx: str) -> Iterator[Cluster]:
    with Cluster(2, 2, 2, server_args=SIM, say=lambda _: None) as running:
        yield running


def counter(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` with `labels` at a /metrics URL."""
    text = requests.get(url, timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def metrics_url(part: Part) -> str:
    return f"http://127.0.0.1:{part.port}/metrics"


def predictions_served(web: Part) -> float:
    return counter(metrics_url(web), "keras_server_http_requests_total", endpoint="/predict")


def drive(cluster: Cluster, clients: int, total: int) -> Load:
    result, _ = load(cluster.url + "/predict", ["images/chelsea.png"], clients, total, None)
    return result


def test_requests_through_nginx_spread_over_every_part(cluster: Cluster) -> None:
    assert dict(drive(cluster, clients=16, total=240).statuses) == {"200": 240}

    served = [predictions_served(web) for web in cluster.webs]
    assert sum(served) == 240
    assert min(served) > 0, f"both web servers take a share: {served}"

    by_shard = [
        sum(
            counter(metrics_url(web), "keras_server_queued_requests_total", shard=label(server.url))
            for web in cluster.webs
        )
        for server in cluster.redis
    ]
    assert sum(by_shard) == 240
    assert min(by_shard) > 0, f"both shards take a share: {by_shard}"

    batches = [counter(metrics_url(w), "keras_server_batch_size_count") for w in cluster.workers]
    assert min(batches) > 0, f"both workers run batches: {batches}"
    images = [counter(metrics_url(w), "keras_server_batch_size_sum") for w in cluster.workers]
    assert sum(images) == 240


def test_clients_keep_being_served_when_a_web_server_dies(cluster: Cluster) -> None:
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(drive, cluster, clients=8, total=300)
        victim = cluster.webs[0]
        while predictions_served(victim) < 20:  # kill it once traffic flows through it
            time.sleep(0.05)
        cluster.kill(victim)
        result = running.result(timeout=180)
    assert not victim.alive()
    assert dict(result.statuses) == {"200": 300}
    assert predictions_served(cluster.webs[1]) > 150


@pytest.mark.parametrize("serve", [[], ["--serve", "b"]], ids=["every model", "--serve b"])
def test_ready_with_several_models(nginx: str, tmp_path: Path, serve: list[str]) -> None:
    """Ready once each served model has every worker on every shard: not
    before, and not never (as when counting workers across models)."""
    models = tmp_path / "models.toml"
    models.write_text('[models.a]\nmodel = "sim"\n[models.b]\nmodel = "sim"\ntop_k = 2\n')
    args = [*SIM, "--models-file", str(models), *serve]
    cluster = Cluster(2, 1, 2, server_args=args, say=lambda _: None)
    cluster.start(timeout=60)
    try:
        queue_name = cluster.settings.queue_name
        for shard in cluster.redis:
            for model in ("a", "b"):
                keys = Keys.for_model(queue_name, model, "a")
                queue = RequestQueue.open(shard.url, keys, timeout=5)
                expected = 0 if serve and model == "a" else 2
                assert len(queue.workers()) == expected, (model, shard.url)
        with open("images/chelsea.png", "rb") as f:
            answer = requests.post(
                cluster.url + "/models/b/predict", files={"image": f}, timeout=30
            )
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) == 2
    finally:
        cluster.stop()


def test_nginx_rate_limit_answers_429_in_json(nginx: str) -> None:
    """The template's optional per-client limit, through real nginx: past the
    rate a client gets 429 with our JSON error, before the app sees the
    request; without a limit, never."""
    with Cluster(1, 1, 1, server_args=SIM, say=lambda _: None, rate_limit="1r/m") as limited:
        # One request a minute: the cluster's own readiness check used it up.
        refused = requests.get(limited.url + "/healthz", timeout=5)
        assert refused.status_code == 429
        assert refused.headers["Content-Type"] == "application/json"
        assert refused.headers["Retry-After"] == "1"
        body = refused.json()
        assert body["success"] is False
        assert "too many requests" in body["error"]
        with CHELSEA.open("rb") as f:
            answer = requests.post(limited.url + "/predict", files={"image": f}, timeout=30)
        assert answer.status_code == 429
        assert predictions_served(limited.webs[0]) == 0

    with Cluster(1, 1, 1, server_args=SIM, say=lambda _: None) as unlimited:
        for _ in range(10):
            with CHELSEA.open("rb") as f:
                answer = requests.post(unlimited.url + "/predict", files={"image": f}, timeout=30)
            assert answer.status_code == 200
