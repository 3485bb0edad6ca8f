"""Model versions while serving (issue 22): each version's own queue, pinned
requests answered by that version alone, and the traffic policy in Redis
(`latest`, or weights such as 90/10) followed by unrestarted web servers.

The HTTP tests share one cluster per module: real workers (the simulated
model, tiny sim times), a real web server (`--role web --web-workers 2`) and
real Redis; the images are tiny PNGs. The weighted draw itself is checked
in-process with a seeded generator (`Router.rng`), the HTTP path by a short
end-to-end run."""

from __future__ import annotations

import dataclasses
import io
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import WorkerThread, start, start_web, stop, wait_until
from PIL import Image

from keras_server.broker import messages
from keras_server.broker.placement import ShardSet
from keras_server.broker.request_queue import RequestQueue
from keras_server.catalog import ModelSpec
from keras_server.engines.simulated import SimulatedModel
from keras_server.processes import Child
from keras_server.serving.failures import Unavailable
from keras_server.serving.models import DISCOVERY_INTERVAL_S, ServedModel
from keras_server.serving.traffic import (
    ROUTING_TTL_S,
    Policy,
    PolicyError,
    Router,
    View,
    store_policy,
)
from keras_server.settings import Settings
from keras_server.web.app import create_app
from keras_server.worker.loop import Worker

CLIENTS = 8


def tiny_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


PNG = tiny_png()


def sim_worker(settings: Settings, version: str) -> Child:
    return start(
        "--role", "worker", "--model", "sim", "--sim-batch-ms", "1", "--sim-image-ms", "0",
        "--batch-size", "16", "--max-batch-delay-ms", "1",
        "--redis-url", settings.redis_url, "--queue-name", settings.queue_name,
        "--heartbeat-ttl", "3", "--model-version", version,
    )  # fmt: skip


def router(settings: Settings) -> Router:
    """The default model's router, as a web process has it (for writing the
    policy the way the admin API does)."""
    keys = messages.Keys(settings.queue_name)
    shards = ShardSet.connect([settings.redis_url], keys, timeout=2.0)
    return ServedModel(ModelSpec(name="sim", source="sim"), shards).router


def post(session: requests.Session, url: str) -> tuple[int, str | None]:
    response = session.post(url, files={"image": ("x.png", PNG)}, timeout=30)
    body = response.json()
    return response.status_code, (body.get("model") or {}).get("version")


def many(base: str, paths: list[str]) -> list[tuple[str, int, str | None]]:
    """POST each of `paths` from CLIENTS threads; (path, status, version) each."""
    local = threading.local()

    def one(path: str) -> tuple[str, int, str | None]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return (path, *post(local.session, base + path))

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(one, paths))


ADMIN_KEY = "admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def write_admin_keys(directory: Path) -> str:
    path = directory / "admin-keys"
    path.write_text(f"# who may change traffic\nalice {ADMIN_KEY}\n")
    return str(path)


@pytest.fixture
def admin_keys(tmp_path: Path) -> str:
    return write_admin_keys(tmp_path)


@pytest.fixture(scope="module")
def cluster(module_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two workers of version 1, two of version 2, and one web server with
    two processes and the admin API, shared by the module's HTTP tests;
    yields its base URL once both versions are live."""
    settings = module_settings
    admin_keys = write_admin_keys(tmp_path_factory.mktemp("admin"))
    workers = [sim_worker(settings, v) for v in ("1", "1", "2", "2")]
    server = None
    try:
        server, base = start_web(
            settings, "--model", "sim", "--web-workers", "2", "--web-threads", "8",
            "--admin-keys", admin_keys,
        )  # fmt: skip
        wait_until(
            lambda: requests.get(base + "/readyz", timeout=5).json().get("claim_loops") == 4,
            timeout=90,
            what="four live workers",
        )
        yield base
    finally:
        everything = [*workers, *([server] if server is not None else [])]
        for process in everything:
            process.terminate()  # side by side: each stop below then waits less
        for process in everything:
            # Five processes stopping at once on 2 cores: each finishes its
            # batch and deregisters; 20 s was once too short for the last.
            stop(process, timeout=60)


@pytest.mark.slow
def test_pinned_versions_are_answered_by_their_own_workers(cluster: str) -> None:
    """400 requests pinned half to version 1, half to version 2 (REST and
    v2 paths): each answered, and only by the version it names. A version
    the model neither declares nor serves is a 404 naming those it serves."""
    paths = [f"/models/sim/versions/{1 + i % 2}/predict" for i in range(400)]
    answers = many(cluster, paths)
    assert {status for _, status, _ in answers} == {200}
    wrong = [(p, v) for p, _, v in answers if p.split("/")[4] != v]
    assert not wrong, wrong[:5]
    assert Counter(v for _, _, v in answers) == {"1": 200, "2": 200}

    none = requests.post(
        cluster + "/models/sim/versions/3/predict", files={"image": PNG}, timeout=10
    )
    assert none.status_code == 404
    assert "has no version '3'; it serves 1, 2" in none.json()["error"]


def set_traffic(base: str, weights: dict[str, int] | None) -> None:
    url = base + "/admin/models/sim/traffic"
    if weights is None:
        response = requests.delete(url, headers=ADMIN, timeout=10)
    else:
        response = requests.put(url, json={"weights": weights}, headers=ADMIN, timeout=10)
    assert response.status_code == 200, response.text


@pytest.mark.slow
def test_traffic_split_switch_and_rollback(cluster: str) -> None:
    """Unversioned requests follow the policy the admin API sets in Redis,
    through both processes of an unrestarted web server: `latest` (version
    2); a 50/50 split answers from both versions (the proportions are
    test_choose_draws_in_proportion's); after a switch to 100 % of version 1,
    every request begun ROUTING_TTL_S later is answered by version 1; the
    rollback (DELETE: `latest`) likewise."""
    assert {v for _, _, v in many(cluster, ["/predict"] * 40)} == {"2"}

    set_traffic(cluster, {"1": 50, "2": 50})
    # What is tested: each web process reads the policy again within
    # ROUTING_TTL_S (0.5 s), so requests begun that much later follow it.
    time.sleep(ROUTING_TTL_S)
    answers = many(cluster, ["/predict"] * 100)  # both drawn: all but 2**-99 sure
    assert {status for _, status, _ in answers} == {200}
    assert set(Counter(v for _, _, v in answers)) == {"1", "2"}

    for weights, expected in (({"1": 100}, "1"), (None, "2")):
        set_traffic(cluster, weights)
        time.sleep(ROUTING_TTL_S)  # as above: requests begun after it follow the change
        answers = many(cluster, ["/predict"] * 100)
        assert {(status, v) for _, status, v in answers} == {(200, expected)}


# -- in-process: the queue and the router against real Redis ----------------------


def worker_of(settings: Settings, version: str) -> Worker:
    queue = RequestQueue.open(
        settings.redis_url, messages.Keys(settings.queue_name), timeout=2.0, version=version
    )
    return Worker(
        queue,
        SimulatedModel(0, 0),
        batch_size=8,
        result_ttl=20.0,
        heartbeat_ttl=1.0,
        name="sim",
        version=version,
    )


def test_routing_counts_a_split_at_the_web_tier(settings: Settings) -> None:
    """2,000 routing decisions against real Redis with live workers of both
    versions: 90/10 within ±3 points; a version with no live worker gets
    nothing; weights for no live version fall back to `latest`."""
    model = router(settings)
    model.rng = random.Random(7)
    with WorkerThread(worker_of(settings, "1")), WorkerThread(worker_of(settings, "2")):
        wait_until(lambda: set(model.read(0).live) == {"1", "2"}, what="both versions live")
        store_policy(model, Policy.from_weights({"1": 90, "2": 10, "3": 50}))
        counts = Counter(model.route().version for _ in range(2000))
        assert set(counts) == {"1", "2"}
        assert 0.87 <= counts["1"] / 2000 <= 0.93, counts
        store_policy(model, Policy.from_weights({"7": 1}))
        assert model.route().version == "2"
        store_policy(model, Policy())
        assert model.route().version == "2"


def test_choose_draws_in_proportion(settings: Settings) -> None:
    """The weighted draw, with a seeded generator: 90/10 over 10,000 draws
    within a point; weights of versions with no live worker, or of 0, draw
    nothing; no weights, or none live: the latest."""
    model = router(settings)
    model.rng = random.Random(7)
    live = {"1": True, "2": True, "10": True}
    split = View(live, Policy.from_weights({"1": 90, "2": 10, "3": 50, "10": 0}))
    counts = Counter(model.choose(split) for _ in range(10_000))
    assert set(counts) == {"1", "2"}
    assert 0.89 <= counts["1"] / 10_000 <= 0.91, counts
    assert model.choose(View(live, Policy.from_weights({"3": 1}))) == "10"
    assert model.choose(View(live, Policy())) == "10"


def test_workers_that_name_no_version_are_routed_from_the_cached_view(
    settings: Settings,
) -> None:
    """Live workers without a version (the default deployment): unversioned
    and routed to the model's queue from the view, read once per
    ROUTING_TTL_S, not again for every request (it was: a Redis round trip
    and a survey per request); with no live worker at all, a learned model
    still refuses at once."""
    model = router(settings)
    surveys: list[bool] = []
    workers = [messages.WorkerInfo("a simulated model", 8, "host", 1, time.time(), name="sim")]

    def live_workers(fresh: bool = False) -> list[messages.WorkerInfo]:
        surveys.append(fresh)
        return workers

    model.live_workers = live_workers
    model.wait_for_workers = False
    for _ in range(50):
        route = model.route()
        assert (route.version, route.own_queue) == (None, False)
    assert surveys == [False]
    workers = []
    model.forget()
    with pytest.raises(Unavailable, match="no live worker"):
        model.route()
    assert surveys == [False, False, True]


def test_a_leaving_version_hands_its_unpinned_queue_on(settings: Settings) -> None:
    """Requests left on a version's queue after its last worker left are
    moved to the model's queue: unpinned ones are answered by another
    version, pinned ones refused, never answered by another version."""
    keys = messages.Keys(settings.queue_name)
    web_side = RequestQueue.open(settings.redis_url, keys, timeout=2.0, version="1")
    old = worker_of(settings, "1")
    with WorkerThread(old):
        wait_until(web_side.workers, what="version 1 live")
    # Version 1 has left; two requests were routed to it just before.
    image = SimulatedModel(0, 0).input_shape
    free = messages.ImageRequest.create(np.zeros(image, "uint8"), 20)
    pinned = messages.ImageRequest.create(np.zeros(image, "uint8"), 20, version="1")
    web_side.push_all([messages.encode_request(free), messages.encode_request(pinned)], 100)
    with WorkerThread(worker_of(settings, "2")):
        answers = web_side.wait_results([free.id, pinned.id], timeout=15)
    assert messages.decode_result(answers[free.id])["model"]["version"] == "2"
    refused = messages.decode_result(answers[pinned.id])
    assert not refused["success"] and "no live worker" in refused["error"]


def test_pinned_route_through_the_app(settings: Settings) -> None:
    """The app's pinned routes, one rule on every transport: a version with
    workers answers; the model's declared version without a live worker is
    a 503 (retry); a version neither declared nor served, a 404."""
    client = create_app(dataclasses.replace(settings, model="sim")).test_client()
    with WorkerThread(worker_of(settings, "4")):
        wait_until(
            lambda: client.get("/readyz").status_code == 200, what="a live worker of version 4"
        )
        data = {"image": (io.BytesIO(PNG), "x.png")}
        ok = client.post("/models/sim/versions/4/predict", data=data)
        assert ok.status_code == 200, ok.get_json()
        assert ok.get_json()["model"]["version"] == "4"
        data = {"image": (io.BytesIO(PNG), "x.png")}
        assert client.post("/models/sim/versions/5/predict", data=data).status_code == 404
        assert client.post("/v2/models/sim/versions/9/infer", json={}).status_code == 404
        data = {"image": (io.BytesIO(PNG), "x.png")}
        declared = client.post("/models/sim/versions/1/predict", data=data)
        assert declared.status_code == 503, declared.get_json()
        assert declared.headers["Retry-After"] == "1"


@pytest.mark.parametrize(
    "weights",
    [{}, {"1": 0}, {"1": -1}, {"1": "ten"}, {"1": True}, {"a b": 1}, [1], {"1": float("inf")}],
)
def test_bad_weights_are_refused(weights: object) -> None:
    with pytest.raises(PolicyError):
        Policy.from_weights(weights)


def test_an_unreadable_policy_routes_to_the_latest() -> None:
    assert Policy.decode(b"{not json").weights is None
    assert Policy.decode(None).weights is None
    assert Policy.decode(Policy.from_weights({"2": 1}).encode()).weights == {"2": 1.0}
    assert ROUTING_TTL_S <= 1.0


# -- the admin API ------------------------------------------------------------------


def test_no_admin_keys_no_admin_api(settings: Settings) -> None:
    client = create_app(settings).test_client()
    assert client.get("/admin/models", headers=ADMIN).status_code == 404


def test_admin_api_sets_and_clears_a_split(
    settings: Settings, admin_keys: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Admin keys only (no key, a wrong one: 401); weights validated (400),
    versions without live workers refused (409); every change logged with
    the key's name; the routes' answers show the policy and live versions."""
    configured = dataclasses.replace(settings, model="sim", admin_keys=admin_keys)
    client = create_app(configured).test_client()
    traffic = "/admin/models/sim/traffic"
    assert client.get("/admin/models").status_code == 401
    assert client.get("/admin/models", headers={"X-Admin-Key": "x" * 20}).status_code == 401
    with WorkerThread(worker_of(settings, "1")), WorkerThread(worker_of(settings, "2")):
        wait_until(
            lambda: (
                len(client.get("/admin/models", headers=ADMIN).get_json()["models"][0]["versions"])
                == 2
            ),
            what="both versions listed",
        )
        listed = client.get("/admin/models", headers={"X-Admin-Key": ADMIN_KEY}).get_json()
        assert listed["models"][0]["latest"] == "2"
        assert listed["models"][0]["traffic"] == {"policy": "latest"}
        for bad in ({"weights": {"1": 0}}, {"weights": {}}, {"weights": {"1": -5}}, [1]):
            assert client.put(traffic, json=bad, headers=ADMIN).status_code == 400, bad
        refused = client.put(traffic, json={"weights": {"1": 50, "3": 50}}, headers=ADMIN)
        assert refused.status_code == 409
        assert "3" in refused.get_json()["error"]
        assert client.put("/admin/models/nope/traffic", json={}, headers=ADMIN).status_code == 404
        with caplog.at_level("INFO", logger="keras_server.web.admin"):
            done = client.put(traffic, json={"weights": {"1": 100}}, headers=ADMIN)
            assert done.status_code == 200
            assert done.get_json()["traffic"] == {"policy": "weights", "weights": {"1": 100.0}}
            time.sleep(ROUTING_TTL_S)  # any process's cached view is renewed by now
            data = {"image": (io.BytesIO(PNG), "x.png")}
            assert client.post("/predict", data=data).get_json()["model"]["version"] == "1"
            cleared = client.delete(traffic, headers=ADMIN)
            assert cleared.get_json()["traffic"] == {"policy": "latest"}
        logged = [r.getMessage() for r in caplog.records]
        assert any("alice" in m and "weights" in m for m in logged), logged
        assert any("alice" in m and "latest" in m for m in logged), logged
        assert not any(ADMIN_KEY in m for m in logged)


# -- discovery ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_new_model_serves_through_an_unrestarted_web_server(
    settings: Settings, tmp_path: Path
) -> None:
    """A worker for a model the web server was never told of: routed within
    two heartbeats, listed by /models and the repository index; when it
    leaves, 503 "no live worker" for --model-grace, then 404."""
    models = tmp_path / "models.toml"
    models.write_text(
        'default = "base"\n[models.base]\nmodel = "sim"\n[models.extra]\nmodel = "sim"\n'
        'version = "7"\n'
    )
    # A grace long enough that the 503 is seen however slowly the worker
    # stops on a loaded machine (3 s was not always).
    server, base = start_web(
        settings, "--model", "sim", "--web-workers", "2", "--model-grace", "15"
    )
    worker = None
    try:
        url = base + "/models/extra/predict"
        assert requests.post(url, files={"image": PNG}, timeout=10).status_code == 404
        worker = start(
            "--role", "worker", "--models-file", str(models), "--serve", "extra",
            "--sim-batch-ms", "1", "--sim-image-ms", "0", "--heartbeat-ttl", "3",
            "--redis-url", settings.redis_url, "--queue-name", settings.queue_name,
        )  # fmt: skip
        wait_until(
            lambda: requests.post(url, files={"image": PNG}, timeout=10).status_code == 200,
            timeout=90,
            what="the new model served",
        )
        # Each web process reads the registry at most every second: both
        # know the model one interval after the first did.
        time.sleep(DISCOVERY_INTERVAL_S + 0.5)
        session = requests.Session()
        for _ in range(20):
            assert post(session, url) == (200, "7")
        listed = requests.get(base + "/models", timeout=10).json()["models"]
        assert {m["name"]: m["versions"] for m in listed} == {"sim": [], "extra": ["7"]}
        index = requests.post(base + "/v2/repository/index", json={}, timeout=10).json()
        assert {"name": "extra", "version": "7", "state": "READY"} in index
        assert {i["name"]: i["state"] for i in index}["sim"] == "UNAVAILABLE"
        stop(worker)
        worker = None
        # A web process learns the worker left when it next reads the
        # registry (at most ROUTING_TTL_S later); a request routed before
        # that waits in the version's queue for --result-timeout.
        time.sleep(ROUTING_TTL_S + 0.2)
        gone = requests.post(url, files={"image": PNG}, timeout=10)
        assert gone.status_code == 503, gone.text
        assert "no live worker" in gone.json()["error"]
        wait_until(
            lambda: requests.post(url, files={"image": PNG}, timeout=10).status_code == 404,
            timeout=60,
            what="the model forgotten after the grace period",
        )
    finally:
        stop(server)
        if worker is not None:
            stop(worker)


def test_models_from_file_learns_nothing(settings: Settings) -> None:
    """--models-from file: a worker's model the file does not name is 404."""
    pinned = dataclasses.replace(settings, model="sim", models_from="file")
    learning = dataclasses.replace(settings, model="sim")
    keys = messages.Keys(settings.queue_name).for_model(settings.queue_name, "other", "sim")
    queue = RequestQueue.open(
        settings.redis_url,
        keys,
        timeout=2.0,
        version="3",
        registry=messages.Keys(settings.queue_name).models,
    )
    worker = Worker(
        queue, SimulatedModel(0, 0), batch_size=8, result_ttl=20.0, heartbeat_ttl=1.0,
        name="other", version="3",
    )  # fmt: skip
    with WorkerThread(worker):
        learned = create_app(learning).test_client()
        wait_until(lambda: learned.get("/v2/models/other/ready").status_code == 200, what="learned")
        assert learned.get("/v2/models/other").get_json()["versions"] == ["3"]
        fixed = create_app(pinned).test_client()
        assert fixed.get("/v2/models/other/ready").status_code == 404
        assert "other" not in {m["name"] for m in fixed.get("/models").get_json()["models"]}
