"""deploy/'s monitoring against a real Prometheus (Debian's `prometheus`
package: the server and `promtool`, installed by `make test` before the
tests when missing, as root: tests/preflight.py).

- The alert rules (deploy/prometheus/keras-server-rules.yaml) pass `promtool
  check rules`, and their unit tests (keras-server-rules.test.yaml) pass
  `promtool test rules`; every alert has a runbook and a test that fires it.
- The Grafana dashboard (deploy/grafana/keras-server.json) and the rules read
  only metrics the server exports.
- A Prometheus started here scrapes a running server (`--role all`, the
  simulated model, the gRPC front) every second while traffic goes through
  it (HTTP, gRPC with tritonclient, jobs); every query
  of the dashboard, asked through Prometheus's HTTP API, returns data, and
  every alert rule evaluates without error.
- A canary: version 1 of the simulated model (a worker process) and version
  2 whose model raises on some batches (a worker thread here), 70/30 by the
  traffic policy: the dashboard's error rate by version shows version 2's
  errors beside version 1's none. Headless Chromium takes the Prometheus
  UI's graph of that query (docs/canary.png is such a screenshot), kept in
  $KERAS_SERVER_TEST_ARTIFACTS (default tests/artifacts/).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import yaml
from conftest import (
    CHELSEA,
    ROOT,
    WorkerThread,
    start,
    start_serving,
    start_web,
    stop,
    system_tool,
    wait_until,
)
from playwright.sync_api import sync_playwright
from tritonclient.utils import InferenceServerException

from keras_server.broker import messages
from keras_server.broker.placement import ShardSet
from keras_server.broker.redis_server import free_port
from keras_server.broker.request_queue import RequestQueue
from keras_server.catalog import ModelSpec
from keras_server.engines.simulated import SimulatedModel
from keras_server.processes import Child, ChildFailed
from keras_server.serving.models import ServedModel
from keras_server.serving.traffic import Policy, store_policy
from keras_server.settings import Settings
from keras_server.web.app import create_app
from keras_server.worker.loop import Worker

RULES = ROOT / "deploy" / "prometheus" / "keras-server-rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "keras-server-rules.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "keras-server.json"
# What Grafana puts in for $__rate_interval at a 1 s scrape interval is 4 s
# (four scrapes); a little more keeps a late scrape from emptying a rate.
RATE_INTERVAL = "10s"
METRIC = re.compile(r"\bkeras_server_\w+")
# The suffixes Prometheus's exposition adds to a histogram's family name.
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
ARTIFACTS = Path(os.environ.get("KERAS_SERVER_TEST_ARTIFACTS", ROOT / "tests" / "artifacts"))
CHROMIUM = "/usr/bin/chromium"
ERROR_RATE_PANEL = "Error rate by model and version (5xx share)"
LATENCY_PANEL = "Latency by model and version (p50, p95)"


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    found = []
    for panel in panels:
        for inner in [panel, *panel.get("panels", [])]:
            found += [(inner["title"], t["expr"]) for t in inner.get("targets", [])]
    return found


def panel_queries(title: str) -> list[str]:
    found = [expr for panel, expr in dashboard_queries() if panel == title]
    assert found, title
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@pytest.fixture(scope="module")
def promtool() -> str:
    return system_tool("/usr/bin/promtool")


def test_the_rules_pass_promtool_check_and_their_unit_tests(promtool: str) -> None:
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout
    # Run where the test file is: its rule_files path is relative.
    tested = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_runbook_and_a_unit_test_that_fires_it() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert names == {
        "KerasServerQueueGrowing",
        "KerasServerNoLiveWorker",
        "KerasServerHighErrorRate",
        "KerasServerShardDown",
        "KerasServerDecodeBudgetRefusing",
        "KerasServerJobBacklogStuck",
        "KerasServerJobCallbacksFailing",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        # A runbook: what is wrong, what to check, what to do.
        description = rule["annotations"]["description"]
        assert "Check" in description or "says why" in description, rule["alert"]
        assert "Act" in description, rule["alert"]
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in cases
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for test in cases
        for case in test["alert_rule_test"]
        if not case["exp_alerts"]
    }
    assert fired == names
    assert quiet == names


def test_the_dashboard_and_rules_read_only_metrics_we_export(settings: Settings) -> None:
    text = create_app(settings).test_client().get("/metrics").get_data(as_text=True)
    # Every family this process declares; the model process's histograms and
    # gauges are declared by the same module, so they are here too.
    families = set(re.findall(r"^# TYPE (keras_server_\w+) ", text, re.MULTILINE))
    assert "keras_server_batch_size" in families
    exported = families | {f + suffix for f in families for suffix in HISTOGRAM_SERIES}
    queries = [expr for _, expr in dashboard_queries()]
    queries += [rule["expr"] for rule in alert_rules()]
    used = {name for expr in queries for name in METRIC.findall(expr)}
    assert used - exported == set()
    # The dashboard covers what the issue asked for.
    for name in (
        "keras_server_http_requests_total",
        "keras_server_http_request_seconds_bucket",
        "keras_server_queue_depth",
        "keras_server_batch_size_bucket",
        "keras_server_inference_seconds_bucket",
        "keras_server_decode_cpu_seconds_total",
        "keras_server_workers_live",
        "keras_server_failed_batches_total",
        "keras_server_decode_refused_total",
        "keras_server_grpc_requests_total",
        "keras_server_grpc_request_seconds_bucket",
        "keras_server_job_backlog",
        "keras_server_job_items_total",
        "keras_server_callbacks_total",
    ):
        assert name in used, name
    # The canary panels read each version's series.
    for title in (ERROR_RATE_PANEL, LATENCY_PANEL):
        for expr in panel_queries(title):
            assert "by (model, version" in expr, expr


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "keras-server"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        # Every query asks the dashboard's chosen Prometheus.
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    # No two panels on the same spot.
    spots = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels]
    assert len(set(spots)) == len(spots)


class Prometheus:
    """A Prometheus server scraping `targets` every second, with our rules."""

    def __init__(self, directory: Path, targets: list[str]) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "keras-server", "static_configs": [{"targets": targets}]}
            ],
        }
        config_path = directory / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.child = Child(
            "prometheus",
            [
                system_tool("/usr/bin/prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            log_path=directory / "prometheus.log",
        )

    def __enter__(self) -> Prometheus:
        self.child.start()
        try:
            self.child.wait_until(self.ready, timeout=60, what="ready")
        except ChildFailed as exc:
            self.child.stop()
            pytest.fail(str(exc))
        return self

    def __exit__(self, *exc: object) -> None:
        self.child.stop()

    def ready(self) -> bool:
        try:
            return requests.get(self.url + "/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def api(self, path: str, **params: str) -> Any:
        answer = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = answer.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector `expr` evaluates to now, without NaN samples (a
        quantile of a histogram with no new observations)."""
        data = self.api("query", query=expr.replace("$__rate_interval", RATE_INTERVAL))
        assert data["resultType"] == "vector", data
        return [s for s in data["result"] if not math.isnan(float(s["value"][1]))]


def grpc_calls(port: int) -> list[str]:
    """gRPC calls that succeed (a liveness probe, an inference) and one that
    does not: their status codes."""
    codes = []
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    image = grpcclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([CHELSEA], dtype=np.object_))
    try:
        for call in (
            client.is_server_live,
            lambda: client.infer("sim", [image]),
            lambda: client.get_model_metadata("no-such-model"),
        ):
            try:
                call()
                codes.append("OK")
            except InferenceServerException as exc:
                codes.append(str(exc.status()).removeprefix("StatusCode."))
    finally:
        client.close()
    return codes


@pytest.fixture
def traffic_server(settings: Settings) -> Iterator[str]:
    """`--role all` with the simulated model and the gRPC front, with answers
    of every kind going through it until the test ends: 200s, 400s (not an
    image) and 404s (an unknown model); over gRPC, OK and NOT_FOUND; jobs of
    an image and a file that is not one (202)."""
    grpc_port = free_port()
    process, base = start_serving(
        settings, "--role", "all", "--model", "sim", "--sim-batch-ms", "5",
        "--sim-image-ms", "0", "--web-workers", "1", "--grpc-port", str(grpc_port),
    )  # fmt: skip
    done = threading.Event()
    statuses: list[int | str] = []

    def send() -> None:
        # One kept-alive connection throughout: the 404 answered before its
        # upload was read leaves it usable (uploads.finish_body).
        with requests.Session() as session:
            while not done.is_set():
                for path, body in (
                    ("/predict", CHELSEA),
                    ("/predict", b"not an image"),
                    ("/models/no-such-model/predict", CHELSEA),
                ):
                    answer = session.post(base + path, files={"image": body}, timeout=30)
                    statuses.append(answer.status_code)
                job = [("image", ("a.png", CHELSEA)), ("image", ("b.png", b"not an image"))]
                statuses.append(session.post(base + "/jobs", files=job, timeout=30).status_code)
                # UNAVAILABLE until the gRPC front listens, beside the HTTP one.
                statuses.extend(grpc_calls(grpc_port))
                done.wait(0.2)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield base
    finally:
        done.set()
        sender.join(timeout=40)
        log = stop(process, timeout=60)
    assert process.returncode == 0, log
    assert {200, 202, 400, 404, "OK", "NOT_FOUND"} <= set(statuses), statuses[:20]


@pytest.mark.slow
def test_prometheus_scrapes_a_server_and_every_dashboard_query_returns_data(
    traffic_server: str, tmp_path: Path
) -> None:
    target = traffic_server.removeprefix("http://")
    with Prometheus(tmp_path, [target]) as prometheus:
        # Rates need two scrapes inside their window, and the model process's
        # metrics appear with its first batch.
        queries = dashboard_queries()
        # The data is what the traffic made: /predict answered 200 at a
        # positive rate, and the worker's batches were seen. A scrape can
        # come between a request's answer and its batch's count: wait for
        # both, as for the rest.
        rate_of_200 = (
            'sum by (endpoint, status) (rate(keras_server_http_requests_total{endpoint="/predict",'
            ' status="200"}[$__rate_interval]))'
        )

        def positive(expr: str) -> bool:
            found = prometheus.query(expr)
            return bool(found) and float(found[0]["value"][1]) > 0

        deadline = time.monotonic() + 45
        while True:
            empty = [f"{title}: {expr}" for title, expr in queries if not prometheus.query(expr)]
            counts = (rate_of_200, "sum(keras_server_batch_size_count)")
            zero = [expr for expr in counts if not positive(expr)]
            if not (empty or zero) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not empty, "no data for:\n" + "\n".join(empty)
        assert not zero, f"zero: {zero}"
        (target_state,) = prometheus.api("targets")["activeTargets"]
        assert target_state["health"] == "up", target_state

        # Every alert rule evaluated against the real series, without an error,
        # and none fires on a healthy server.
        deadline = time.monotonic() + 20
        while True:
            (group,) = prometheus.api("rules")["groups"]
            rules = group["rules"]
            # Go's zero time until a rule's first evaluation.
            evaluated = all(not r["lastEvaluation"].startswith("0001") for r in rules)
            if evaluated or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert evaluated, rules
        assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
        for rule in rules:
            assert rule["health"] == "ok", rule
            assert rule["state"] == "inactive", rule


class FailingCanary(SimulatedModel):
    """The simulated model with a bug: every third forward pass raises."""

    def __init__(self) -> None:
        super().__init__(5, 0)
        self.passes = 0

    def predict(self, images: np.ndarray) -> np.ndarray:
        self.passes += 1
        if self.passes % 3 == 0:
            raise RuntimeError("the canary's bug")
        return super().predict(images)


def weigh(settings: Settings, weights: dict[str, float]) -> None:
    """The sim model's traffic policy, written as the admin API writes it."""
    keys = messages.Keys(settings.queue_name)
    shards = ShardSet.connect([settings.redis_url], keys, timeout=2.0)
    store_policy(ServedModel(ModelSpec(name="sim", source="sim"), shards).router,
                 Policy.from_weights(weights))  # fmt: skip


@pytest.fixture
def canary_server(settings: Settings) -> Iterator[str]:
    """A web server for the sim model; version 1 in a worker process,
    version 2 (FailingCanary) in a worker thread on its own queue; 70/30 by
    the traffic policy, with /predict traffic until the test ends."""
    stable = start(
        "--role", "worker", "--model", "sim", "--sim-batch-ms", "5", "--sim-image-ms", "0",
        "--redis-url", settings.redis_url, "--queue-name", settings.queue_name,
        "--model-version", "1",
    )  # fmt: skip
    keys = messages.Keys(settings.queue_name)
    canary_queue = RequestQueue.open(settings.redis_url, keys, timeout=1, version="2")
    canary = Worker(canary_queue, FailingCanary(), 8, result_ttl=20, name="sim", version="2")
    web = None
    done = threading.Event()
    senders: list[threading.Thread] = []
    try:
        web, base = start_web(settings, "--model", "sim", "--web-workers", "1")
        with WorkerThread(canary):
            wait_until(
                lambda: (
                    requests.get(base + "/models", timeout=5).json()["models"][0]["versions"]
                    == ["1", "2"]
                ),
                timeout=60,
                what="both versions live",
            )
            weigh(settings, {"1": 70, "2": 30})

            def send() -> None:
                with requests.Session() as session:
                    while not done.is_set():
                        session.post(base + "/predict", files={"image": CHELSEA}, timeout=30)
                        done.wait(0.05)

            senders = [threading.Thread(target=send, daemon=True) for _ in range(2)]
            for sender in senders:
                sender.start()
            yield base
            done.set()
            for sender in senders:
                sender.join(timeout=40)
    finally:
        done.set()
        if web is not None:
            stop(web)
        stop(stable)


def screenshot_graph(prometheus: Prometheus, expr: str, path: Path) -> None:
    """The Prometheus UI's graph of `expr` over the last minute, in headless
    Chromium (Debian's, driven by Playwright), saved to `path`."""
    chromium = system_tool(CHROMIUM)
    query = requests.Request(
        "GET",
        prometheus.url + "/graph",
        params={"g0.expr": expr, "g0.tab": "0", "g0.range_input": "1m", "g0.stacked": "0"},
    ).prepare()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.goto(str(query.url))
            # One legend entry per version: the graph has drawn both.
            page.locator(".legend li.line").nth(1).wait_for(timeout=30_000)
            path.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(path), full_page=True)
        finally:
            browser.close()


@pytest.mark.slow
def test_a_failing_canary_stands_out_in_the_dashboard(canary_server: str, tmp_path: Path) -> None:
    """The dashboard's error rate by version, asked of a real Prometheus
    scraping the web server: version 2 (the canary) fails a share of its
    requests, version 1 none; the latency panel has both versions too."""
    error_rate = panel_queries(ERROR_RATE_PANEL)[0]  # HTTP; the second is gRPC's
    target = canary_server.removeprefix("http://")
    with Prometheus(tmp_path, [target]) as prometheus:

        def by_version() -> dict[str, float] | None:
            found = {
                s["metric"]["version"]: float(s["value"][1]) for s in prometheus.query(error_rate)
            }
            return found if set(found) == {"1", "2"} and found["2"] > 0 else None

        rates = wait_until(by_version, timeout=60, what="both versions' error rates")
        assert rates["1"] == 0, rates
        assert rates["2"] > rates["1"], rates
        # The canary's requests are answered by it alone, so only they fail:
        # about a third of them (every third forward pass raises).
        assert 0.05 < rates["2"] < 0.95, rates
        latency = {s["metric"]["version"] for e in panel_queries(LATENCY_PANEL)[:2]
                   for s in prometheus.query(e)}  # fmt: skip
        assert latency == {"1", "2"}
        # A minute of it in the UI, for the eye (docs/canary.png).
        time.sleep(10)  # the graph spans the last minute: let some of it fill
        expr = error_rate.replace("$__rate_interval", RATE_INTERVAL)
        screenshot_graph(prometheus, expr, ARTIFACTS / "canary-error-rate.png")
