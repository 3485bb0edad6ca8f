"""Staying up when Redis misbehaves, and changing the model without an error:
a shard that hangs (SIGSTOP: connections stay open, nothing answers), a
Sentinel failover after the master is killed, a rolling upgrade of every
worker under load, and model names that would share Redis keys."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from conftest import CHELSEA, WorkerThread, start, start_web, stop, wait_until

from keras_server.broker import messages
from keras_server.broker.placement import ShardSet
from keras_server.broker.redis_server import RedisServer, find_redis_server, free_port
from keras_server.broker.request_queue import RequestQueue
from keras_server.broker.shards import label
from keras_server.catalog import CatalogError, load_models_file
from keras_server.cli import read_models
from keras_server.engines.simulated import SimulatedModel
from keras_server.settings import Settings, load_settings
from keras_server.web.app import create_app
from keras_server.worker.main import make_workers

RESULT_TIMEOUT = 5.0
# How far past its deadline an answer may come: --redis-timeout (the default,
# 1 s: a wait on a hung shard is given up that long after Redis should have
# ended it, so that a late nil reply is never taken for a hang), then the HTTP
# hop and a loaded CI box.
SLACK_S = 1.0 + 2.0


@dataclass(frozen=True)
class Answer:
    status: int
    seconds: float
    retry_after: str | None
    version: str | None


def predict(base: str) -> Answer:
    started = time.monotonic()
    try:
        response = requests.post(
            base + "/predict", files={"image": CHELSEA}, timeout=RESULT_TIMEOUT + 20
        )
    except requests.RequestException:
        return Answer(0, time.monotonic() - started, None, None)
    body = response.json()
    return Answer(
        response.status_code,
        time.monotonic() - started,
        response.headers.get("Retry-After"),
        body.get("model", {}).get("version"),
    )


def hammer(base: str, count: int, clients: int = 6) -> list[Answer]:
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda _: predict(base), range(count)))


def assert_clear(answers: list[Answer]) -> None:
    """Only a prediction, or a clear refusal, each by its deadline."""
    for answer in answers:
        assert answer.status in (200, 503, 504), answer
        if answer.status == 503:
            assert answer.retry_after, answer
        assert answer.seconds <= RESULT_TIMEOUT + SLACK_S, answer


class LoadLoop:
    """Clients posting back to back in threads until stopped; every answer kept."""

    def __init__(self, base: str, clients: int = 4) -> None:
        self.base = base
        self.answers: list[tuple[float, Answer]] = []
        self.running = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while self.running.is_set():
            started = time.monotonic()
            self.answers.append((started, predict(self.base)))

    def __enter__(self) -> LoadLoop:
        self.running.set()
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running.clear()
        for thread in self.threads:
            thread.join(RESULT_TIMEOUT + 30)

    def count(self, status: int = 200) -> int:
        return sum(a.status == status for _, a in self.answers)


def sim_worker(settings: Settings, *extra: str) -> subprocess.Popen[str]:
    return start(
        "--role", "worker", "--model", "sim", "--sim-batch-ms", "10", "--sim-image-ms", "1",
        "--redis-url", settings.redis_url, "--queue-name", settings.queue_name,
        "--heartbeat-ttl", "3", *extra,
    )  # fmt: skip


def web(settings: Settings) -> tuple[subprocess.Popen[str], str]:
    return start_web(settings, "--result-timeout", str(RESULT_TIMEOUT), "--web-threads", "16")


def wait_ready(base: str, claim_loops: int = 1) -> None:
    def ready() -> bool:
        try:
            body = requests.get(base + "/readyz", timeout=5).json()
        except requests.RequestException:
            return False
        return bool(body.get("ready")) and body.get("claim_loops", 0) >= claim_loops

    wait_until(ready, timeout=60, what="readiness")


# -- model names that would share keys ------------------------------------------


def test_a_model_named_after_a_key_part_is_refused(tmp_path: Path) -> None:
    """A model called "workers" used to queue into the default model's workers set."""
    default = messages.Keys("q")
    for part in ("workers", "version", "versions", "traffic", "models"):
        with pytest.raises(ValueError, match="collide"):
            messages.Keys.for_model("q", part, default="resnet50")
    models = tmp_path / "models.toml"
    models.write_text('[models.resnet50]\nmodel = "sim"\n[models.workers]\nmodel = "sim"\n')
    with pytest.raises(CatalogError, match="'workers' would collide"):
        read_models(load_settings(["--models-file", str(models)]))
    # The default model keeps the plain queue name, so it may have any name.
    models.write_text('default = "workers"\n[models.workers]\nmodel = "sim"\n')
    assert load_models_file(models)[1] == "workers"
    assert messages.Keys.for_model("q", "workers", default="workers") == default


@pytest.mark.parametrize(
    "other", ["flowers", "result-x", "work", "q", "worker_2", "version-2", "models_x", "1"]
)
def test_no_other_models_keys_meet_the_default_models(other: str) -> None:
    def every_key(keys: messages.Keys) -> set[str]:
        return {
            keys.queue,
            keys.workers,
            keys.result("id"),
            keys.processing("w"),
            keys.heartbeat("w"),
            keys.worker_versions,
            keys.known_versions,
            keys.traffic,
            keys.models,
            keys.for_version("1").queue,
            keys.for_version("1").queue_at(2),
            keys.for_version("1").wakeup,
        }

    default = messages.Keys.for_model("q", "default", default="default")
    assert not every_key(default) & every_key(messages.Keys.for_model("q", other, "default"))


# -- a hung shard -----------------------------------------------------------------


@pytest.fixture
def two_servers() -> Iterator[list[RedisServer]]:
    servers = [RedisServer().start(), RedisServer().start()]
    yield servers
    for server in servers:
        if server.process and server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)
        server.close()


def freeze(server: RedisServer) -> None:
    """A hung host: the process keeps its sockets open and never answers."""
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)


def thaw(server: RedisServer) -> None:
    assert server.process is not None
    server.process.send_signal(signal.SIGCONT)


def test_a_hung_shard_is_skipped_and_probed_back(two_servers: list[RedisServer]) -> None:
    keys = messages.Keys("hung")
    queues = [RequestQueue.open(s.url, keys, timeout=0.3) for s in two_servers]
    shards = ShardSet(queues)
    hung, healthy = queues
    freeze(two_servers[0])
    # Every push lands on the healthy shard: the hung one times out once, is
    # marked down, and is not asked again.
    assert all(shards.push(b"x", max_depth=1000) is healthy for _ in range(30))
    assert shards.up() == [healthy]
    assert healthy.depth() == 30
    thaw(two_servers[0])
    wait_until(lambda: shards.up() == queues, timeout=10, what="the probe to see it again")
    assert hung.depth() in (0, 1)  # a timed-out push may have landed before the hang


@pytest.mark.slow
def test_a_hung_shard_costs_seconds_not_the_cluster(
    two_servers: list[RedisServer], settings: Settings
) -> None:
    """One worker serving both shards and a web server in front; SIGSTOP one shard
    under load: requests waiting on it end by their deadline, and the rest of
    the traffic is served by the other shard."""
    urls = ",".join(s.url for s in two_servers)
    sharded = dataclasses.replace(settings, redis_url=urls)
    worker = sim_worker(sharded, "--redis-timeout", "0.5")
    server, base = web(sharded)
    try:
        wait_ready(base, claim_loops=2)
        assert {a.status for a in hammer(base, 24)} == {200}
        with LoadLoop(base) as load:
            wait_until(lambda: load.count() >= 20, what="traffic")
            freeze(two_servers[0])
            # Each web process finds the hang on its first command there, at
            # most --redis-timeout (1 s) after it begins.
            settled = time.monotonic() + 3
            wait_until(
                lambda: sum(a.status == 200 for t, a in load.answers if t > settled) >= 40,
                timeout=60,
                what="traffic after the hang",
            )
        assert_clear([a for _, a in load.answers])
        after = [a for t, a in load.answers if t > settled]
        assert {a.status for a in after} == {200}, after
        ready = requests.get(base + "/readyz", timeout=5).json()
        assert ready["ready"] is True
        assert label(two_servers[0].url) in " ".join(ready["unreachable"])

        thaw(two_servers[0])
        wait_until(
            lambda: requests.get(base + "/readyz", timeout=5).json().get("unreachable") is None,
            what="the shard to be back",
        )
        assert {a.status for a in hammer(base, 40)} == {200}
    finally:
        thaw(two_servers[0])
        stop(server)
        stop(worker)


# -- Sentinel failover -------------------------------------------------------------

MASTER = "keras"


class Sentinels:
    """A master, a replica and three redis-sentinel processes on loopback."""

    def __init__(self, tmp: Path) -> None:
        binary = find_redis_server()
        assert binary
        self.master = RedisServer().start()
        self.replica = RedisServer(
            extra_args=["--replicaof", "127.0.0.1", str(self.master.port)]
        ).start()
        self.ports = [free_port() for _ in range(3)]
        self.processes = []
        for port in self.ports:
            conf = tmp / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {tmp}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 4000\n"
            )
            self.processes.append(
                subprocess.Popen(
                    [binary, str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def master_port(self) -> int | None:
        for port in self.ports:
            try:
                client = redis.Redis(port=port, socket_timeout=1)
                _, found = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
                return int(found)
            except (redis.RedisError, TypeError, ValueError):
                continue
        return None

    def close(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()
        self.master.close()
        self.replica.close()


@pytest.mark.slow
def test_sentinel_failover_under_load(tmp_path: Path, settings: Settings) -> None:
    """kill -9 the master under load: clients see only 200, 503 with
    Retry-After, or 504, none past its deadline, and once the replica is
    promoted everything is served again, with no restart."""
    cluster = Sentinels(tmp_path)
    try:
        wait_until(lambda: cluster.master_port() == cluster.master.port, what="sentinels to agree")
        failover = dataclasses.replace(settings, redis_url=cluster.url)
        worker = sim_worker(failover)
        server, base = web(failover)
        try:
            wait_ready(base)
            with LoadLoop(base) as load:
                wait_until(lambda: load.count() >= 20, what="traffic")
                assert cluster.master.process is not None
                cluster.master.process.kill()
                killed_at = time.monotonic()
                wait_until(
                    lambda: cluster.master_port() == cluster.replica.port,
                    timeout=30,
                    what="the promotion",
                )
                promoted_at = time.monotonic()
                wait_until(
                    lambda: sum(a.status == 200 for t, a in load.answers if t > promoted_at) >= 40,
                    timeout=30,
                    what="traffic after the promotion",
                )
            answers = sorted(load.answers, key=lambda ta: ta[0])
            assert_clear([a for _, a in answers])
            failed = [t for t, a in answers if a.status != 200]
            last_failure = max(failed, default=killed_at)
            # Everything is served again within 15 s of the kill.
            assert last_failure - killed_at <= 15, (last_failure - killed_at, answers)
            print(
                f"failover: promoted {promoted_at - killed_at:.1f} s after the kill; last "
                f"non-200 started {last_failure - killed_at:.1f} s after it; "
                f"{len(failed)} of {len(answers)} requests not 200"
            )
        finally:
            stop(server)
            stop(worker)
    finally:
        cluster.close()


# -- rolling upgrade ---------------------------------------------------------------


@pytest.mark.slow
def test_rolling_upgrade_answers_every_request(settings: Settings) -> None:
    """Under steady load, start workers of version 2, then SIGTERM every
    worker of version 1: not one answer is other than 200, and the answers
    say which version served them."""
    old = [sim_worker(settings, "--model-version", "1") for _ in range(2)]
    server, base = web(settings)
    new: list[subprocess.Popen[str]] = []
    try:
        wait_ready(base, claim_loops=2)
        with LoadLoop(base) as load:
            wait_until(lambda: load.count() >= 30, what="traffic on version 1")
            new = [sim_worker(settings, "--model-version", "2") for _ in range(2)]
            wait_ready(base, claim_loops=4)
            for process in old:
                process.send_signal(signal.SIGTERM)
            for process in old:
                assert process.wait(30) == 0
            drained_at = time.monotonic()
            wait_until(
                lambda: sum(1 for t, _ in load.answers if t > drained_at) >= 40,
                what="traffic on version 2",
            )
        answers = [a for _, a in sorted(load.answers, key=lambda ta: ta[0])]
        assert {a.status for a in answers} == {200}, [a for a in answers if a.status != 200]
        assert answers[0].version == "1"
        assert answers[-1].version == "2"
        late = [a.version for t, a in load.answers if t > drained_at]
        assert set(late) == {"2"}
    finally:
        stop(server)
        for process in old + new:
            stop(process)


def test_readyz_counts_worker_processes_not_claim_loops(two_servers: list[RedisServer]) -> None:
    """One worker process serving 2 shards runs 2 claim loops: /readyz says 1
    worker (and 2 claim loops), not 2 workers."""
    sharded = Settings(
        redis_url=",".join(s.url for s in two_servers), model="sim", queue_name="readyz"
    )
    loops = make_workers(sharded, SimulatedModel(0, 0))
    assert len(loops) == 2
    client = create_app(sharded).test_client()
    with WorkerThread(loops[0]), WorkerThread(loops[1]):
        wait_until(lambda: client.get("/readyz").status_code == 200, what="a ready worker")
        wait_until(
            lambda: client.get("/readyz").get_json()["claim_loops"] == 2, what="both claim loops"
        )
        body = client.get("/readyz").get_json()
    assert body["workers"] == 1
