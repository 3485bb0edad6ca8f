"""Faults between hosts, for real (issue 18, item 3).

Redis, a web server (`--role web`, granian) and a worker (`--role worker
--model sim`) each run in their own network namespace, joined by veth links
(tests/netns.py). Under steady load from a few client threads, each scenario
breaks one thing for a few seconds, then heals it:

- 100 ms of round-trip latency and 1 % loss on the worker <-> Redis link (tc netem);
- the worker cut off from Redis for 5 s while it holds a claimed batch;
- the web server cut off from Redis for 5 s;
- Redis stopped (SIGSTOP) for 3 s.

Properties, for every scenario: every request ends 200, 503 or 504 within its
deadline + 2 s; every 200 is the answer its own image gets (the simulated
model's answer is a function of the pixels, and every request sends a
different image); from 5 s after healing on, every request is 200; no claimed
request is left in a processing list; the three processes still run (none
needed a restart). One cluster serves all the scenarios in turn, so the last
property also covers the scenarios before.

Skipped, with the reason, where network namespaces (root) or sch_netem are
missing.
"""

from __future__ import annotations

import dataclasses
import io
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import netns
import numpy as np
import pytest
import redis
import requests
from conftest import ENV, ROOT
from PIL import Image

from keras_server.broker.messages import Keys
from keras_server.catalog import SIM_SIZE
from keras_server.engines.predictor import top_k
from keras_server.engines.simulated import SimulatedModel
from keras_server.images import load_image
from keras_server.processes import Child, ChildFailed
from run_cluster import http_answers

pytestmark = pytest.mark.slow

REDIS_PORT = 6379
WEB_PORT = 8000
QUEUE = "faults"
# Small, so that each scenario takes seconds: a silent Redis is given up on
# after REDIS_TIMEOUT, a request after RESULT_TIMEOUT.
REDIS_TIMEOUT_S = 0.5
RESULT_TIMEOUT_S = 3.0
# The properties.
GRACE_S = 2.0  # every request ends within its deadline + this
RECOVERY_S = 5.0  # after healing, everything is 200 again within this
CLIENTS = 4
BEFORE_S = 2.0  # load before the fault
AFTER_S = RECOVERY_S + 3.0  # load after healing: the last 3 s must be all 200

SIM = SimulatedModel(batch_ms=0, image_ms=0)


@dataclasses.dataclass(frozen=True)
class Cluster:
    hosts: netns.Hosts
    redis: Child
    web: Child
    worker: Child
    base: str  # the web server's URL, from the root namespace
    observer: redis.Redis  # reaches Redis over its own link

    def children(self) -> list[Child]:
        return [self.redis, self.web, self.worker]

    def logs(self) -> str:
        return "\n".join(f"--- {c.name} ---\n{c.log_tail(4000)}" for c in self.children())

    def claimed(self) -> int:
        """Requests in any worker's processing list."""
        keys = list(self.observer.scan_iter(Keys(QUEUE).processing("*")))
        return sum(int(self.observer.llen(k)) for k in keys)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    with netns.Hosts() as hosts:
        binds = [hosts.address("redis", link) for link in ("worker", "web", "observer")]
        redis_server = Child(
            "redis-server",
            hosts.command("redis", [
                "redis-server", "--port", str(REDIS_PORT), "--bind", *binds,
                "--protected-mode", "no", "--save", "", "--appendonly", "no",
            ]),
            tied=True,
        ).start()  # fmt: skip

        def role(name: str, link: str, *args: str) -> Child:
            url = f"redis://{hosts.address('redis', link)}:{REDIS_PORT}/0"
            command = [
                sys.executable, "run_keras_server.py", *args, "--model", "sim",
                "--redis-url", url, "--queue-name", QUEUE,
                "--redis-timeout", str(REDIS_TIMEOUT_S), "--result-timeout", str(RESULT_TIMEOUT_S),
            ]  # fmt: skip
            return Child(name, hosts.command(name, command), cwd=ROOT, env=ENV, tied=True).start()

        web_host = hosts.address("web", "client")
        web = role("web", "web", "--role", "web", "--host", web_host, "--port", str(WEB_PORT),
                   "--web-workers", "1")  # fmt: skip
        worker = role(
            "worker", "worker", "--role", "worker", "--batch-size", "8",
            "--sim-batch-ms", "50", "--sim-image-ms", "5", "--heartbeat-ttl", "3",
        )  # fmt: skip
        observer = redis.Redis(host=hosts.address("redis", "observer"), port=REDIS_PORT,
                               socket_timeout=5, socket_connect_timeout=5)  # fmt: skip
        made = Cluster(hosts, redis_server, web, worker, f"http://{web_host}:{WEB_PORT}", observer)
        try:
            ready = http_answers(made.base + "/readyz", success=True)
            netns_wait(made, ready, 90, "the web server ready with a live worker")
            yield made
        finally:
            observer.close()
            for child in (web, worker, redis_server):
                child.stop(10)


def netns_wait(cluster: Cluster, ready: Callable[[], object], timeout: float, what: str) -> None:
    try:
        cluster.web.wait_until(ready, timeout, what)
    except ChildFailed as exc:
        pytest.fail(f"{exc}\n{cluster.logs()}")


def image(index: int) -> bytes:
    """A PNG of noise seeded by `index`: a different image for every request."""
    pixels = np.random.default_rng(index).integers(0, 256, (SIM_SIZE, SIM_SIZE, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def own_answer(data: bytes) -> list[dict[str, object]]:
    """What the simulated model answers for this image alone: decoded as the
    web tier decodes it, one forward pass of one."""
    pixels = load_image(data, (SIM_SIZE, SIM_SIZE), max_pixels=SIM_SIZE * SIM_SIZE)
    return top_k(SIM.predict(pixels[None])[0], SIM.labels, SIM.top_k)


@dataclasses.dataclass(frozen=True)
class Outcome:
    index: int
    started: float  # monotonic
    elapsed: float
    status: int | str  # the HTTP status, or the client's error
    wrong: str = ""  # a 200 that is not this image's answer: what came instead

    def line(self, t0: float) -> str:
        return f"#{self.index} at +{self.started - t0:.2f} s: {self.status} in {self.elapsed:.2f} s"


class Load:
    """CLIENTS threads posting a new image each, back to back, until stopped."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._count = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self) -> Load:
        self.t0 = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            # A request ends within its deadline + GRACE_S, or the client gives up then.
            thread.join(RESULT_TIMEOUT_S + GRACE_S + 5)

    def _next(self) -> int:
        with self._lock:
            self._count += 1
            return self._count

    def _client(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                index = self._next()
                data = image(index)
                started = time.monotonic()
                try:
                    # Longer than the property allows, to see how late a late one is.
                    answer = session.post(
                        self.base + "/predict",
                        files={"image": ("x.png", data)},
                        timeout=RESULT_TIMEOUT_S + GRACE_S + 3,
                    )
                    status: int | str = answer.status_code
                except requests.RequestException as exc:
                    answer, status = None, f"{type(exc).__name__}: {exc}"
                elapsed = time.monotonic() - started
                wrong = ""
                if answer is not None and status == 200:
                    got = answer.json().get("predictions")
                    if not same_answer(got, own_answer(data)):
                        wrong = str(got)[:200]
                with self._lock:
                    self.outcomes.append(Outcome(index, started, elapsed, status, wrong))
                time.sleep(0.01)


def same_answer(got: object, expected: list[dict[str, object]]) -> bool:
    if not isinstance(got, list) or len(got) != len(expected):
        return False
    return all(
        g.get("label") == e["label"]
        and abs(float(g["probability"]) - float(e["probability"])) < 1e-6
        for g, e in zip(got, expected, strict=True)
    )


def run_scenario(
    cluster: Cluster,
    fault: Callable[[], None],
    heal: Callable[[], None],
    duration: float,
    *,
    start_when: Callable[[], bool] | None = None,
) -> None:
    """Load the cluster; after BEFORE_S, `fault()`, `duration` s later `heal()`,
    then AFTER_S more of load; then check every property."""
    problems: list[str] = []
    with Load(cluster.base) as load:
        time.sleep(BEFORE_S)  # the scenario's schedule (docstring): load, then the fault
        if start_when is not None:
            waited = time.monotonic() + 5
            while not (began := start_when()) and time.monotonic() < waited:
                time.sleep(0.005)
            if not began:
                problems.append("the fault could not start at the moment asked for")
        fault_at = time.monotonic()
        try:
            fault()
            time.sleep(duration)  # the fault lasts this long under load
        finally:
            heal()
        healed_at = time.monotonic()
        time.sleep(AFTER_S)  # load after healing, to see the recovery
    outcomes = sorted(load.outcomes, key=lambda o: o.started)
    problems += violations(outcomes, load.t0, fault_at, healed_at)
    # A batch being answered right now is claimed for a moment: wait that out.
    deadline = time.monotonic() + RESULT_TIMEOUT_S + 5
    while (claimed := cluster.claimed()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if claimed:
        problems.append(f"{claimed} claimed requests left in processing lists")
    if dead := [c.name for c in cluster.children() if not c.alive()]:
        problems.append(f"exited: {', '.join(dead)}")
    summary = (
        f"{len(outcomes)} requests: {dict(Counter(o.status for o in outcomes))}; "
        f"fault at +{fault_at - load.t0:.2f} s, healed at +{healed_at - load.t0:.2f} s"
    )
    print(summary)
    if problems:
        pytest.fail("\n".join([summary, *problems, cluster.logs()]), pytrace=False)


def test_latency_and_loss_between_worker_and_redis(cluster: Cluster) -> None:
    reason = netns.netem_unavailable()
    if reason:
        pytest.skip(reason)
    link = cluster.hosts.links["worker"]
    run_scenario(cluster, lambda: link.netem(delay_ms=100, loss_percent=1), link.heal, 6.0)


def test_worker_cut_off_from_redis_mid_batch(cluster: Cluster) -> None:
    link = cluster.hosts.links["worker"]
    # Cut while the worker holds a claimed batch (its processing list is not empty).
    run_scenario(cluster, link.partition, link.heal, 5.0, start_when=lambda: cluster.claimed() > 0)


def test_web_server_cut_off_from_redis(cluster: Cluster) -> None:
    link = cluster.hosts.links["web"]
    run_scenario(cluster, link.partition, link.heal, 5.0)


def test_redis_paused(cluster: Cluster) -> None:
    run_scenario(
        cluster,
        lambda: cluster.redis.send_signal(signal.SIGSTOP),
        lambda: cluster.redis.send_signal(signal.SIGCONT),
        3.0,
    )


def violations(outcomes: list[Outcome], t0: float, fault_at: float, healed_at: float) -> list[str]:
    """What the requests' outcomes break of the properties, one line each."""

    def listed(found: list[Outcome]) -> str:
        return "; ".join(o.line(t0) for o in found[:10]) + (" ..." if len(found) > 10 else "")

    problems = []
    # Those over before the fault began: all 200, or the cluster was not healthy.
    before = [o for o in outcomes if o.started + o.elapsed < fault_at]
    after = [o for o in outcomes if o.started >= healed_at + RECOVERY_S]
    if not before:
        problems.append("no request before the fault")
    elif failing := [o for o in before if o.status != 200]:
        problems.append(f"not all 200 before the fault: {listed(failing)}")
    if bad := [o for o in outcomes if o.status not in (200, 503, 504)]:
        problems.append(f"ended neither 200, 503 nor 504: {listed(bad)}")
    if late := [o for o in outcomes if o.elapsed > RESULT_TIMEOUT_S + GRACE_S]:
        problems.append(f"ended after the deadline + {GRACE_S:g} s: {listed(late)}")
    if wrong := [o for o in outcomes if o.wrong]:
        problems.append(f"got another image's answer: {listed(wrong)} ({wrong[0].wrong})")
    if not after:
        problems.append(f"no request started {RECOVERY_S:g} s after healing")
    elif failing := [o for o in after if o.status != 200]:
        problems.append(f"not 200 again {RECOVERY_S:g} s after healing: {listed(failing)}")
    return problems
