"""Redis Cluster as the broker (issue 30): the hash tags that keep each
script's and transaction's keys on one slot, the redis+cluster:// URL, and a
real 6-node cluster on loopback (3 masters, 3 replicas, started once for the
module): the queue's operations, a `--model sim` server's predictions,
jobs, cache, quotas and versions, a model's 3 partitions on the 3 masters,
and SIGKILL of a master under 32 clients."""

from __future__ import annotations

import dataclasses
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from conftest import start_serving, stop, wait_until
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from keras_server.broker.messages import SLOTS, Keys, WorkerInfo, partition_tags
from keras_server.broker.placement import ShardSet
from keras_server.broker.quotas import Quota, Quotas
from keras_server.broker.redis_server import LocalCluster, RedisServer
from keras_server.broker.shards import label
from keras_server.settings import Settings, SettingsError, load_settings, parse_cluster_url

ROOT = Path(__file__).resolve().parent.parent
CHELSEA = (ROOT / "images" / "chelsea.png").read_bytes()
SIM = ["--model", "sim", "--sim-batch-ms", "5", "--sim-image-ms", "1", "--batch-size", "8"]


def slots(names: list[str]) -> set[int]:
    return {key_slot(n.encode()) for n in names}


# -- names ---------------------------------------------------------------------


@pytest.mark.parametrize("partition", [0, 1, 2])
@pytest.mark.parametrize("model", ["", "resnet"])
def test_each_script_and_transaction_touches_one_slot(model: str, partition: int) -> None:
    """The keys each script and MULTI of the broker names together (their
    lists as request_queue.py, liveness.py, jobs.py and
    pending_callbacks.py build them) hash to one slot."""
    root = Keys.for_model("image_queue", model or "default", "default")
    keys = root.partitions(3)[partition]
    version = keys.for_version("v2")
    levels = 3
    claim = [keys.processing("w"), version.wakeup, keys.wakeup]
    claim += [q.queue_at(lvl) for lvl in range(1, levels + 1) for q in (version, keys)]
    requeue = [keys.processing("w"), keys.workers, keys.heartbeat("w"), version.wakeup]
    sweep = [keys.wakeup, *version.queues(levels), *keys.queues(levels)]
    push = [version.queue_at(2), version.wakeup]
    beat = [keys.heartbeat("w"), keys.workers, keys.worker_versions, keys.known_versions]
    finish = [keys.result("r"), *keys.job_keys("j"), keys.callbacks, keys.processing("w")]
    jobs = [keys.jobs, keys.queue_at(levels), keys.job("j") + ":items", keys.job_items("j")]
    callbacks = [keys.callbacks, keys.callback_tries]
    for names in (claim, requeue, sweep, push, beat, finish, jobs, callbacks):
        assert len(slots(names)) == 1, names
    # The cache's entries of a model, MGET together, and a quota's bucket.
    assert len(slots([root.cached("m", "1", "top5", d) for d in ("a", "b")])) == 1
    assert root.quota("alice").startswith(root.tag)


def test_names_keep_the_tag_in_braces_first() -> None:
    keys = Keys("q")
    assert keys.tag == "{q}"
    assert keys.result("r") == "{q}:result:r"
    assert keys.for_version("2").queue_at(2) == "{q}:version:2:level:2"
    assert Keys.for_model("q", "m", "d").workers == "{q:m}:workers"
    assert keys.partitions(1) == [keys]


@pytest.mark.parametrize("count", [2, 3, 5, 16])
def test_partitions_fall_in_equal_slot_ranges(count: int) -> None:
    """Partition i's tag is in the i-th of `count` equal slot ranges: one
    per master of a cluster made by redis-cli --cluster create."""
    tags = partition_tags("image_queue", count)
    assert len(set(tags)) == count
    for i, tag in enumerate(tags):
        assert i * SLOTS // count <= key_slot(tag.encode()) < (i + 1) * SLOTS // count
    parts = Keys("image_queue").partitions(count)
    assert [p.tag for p in parts] == ["{" + t + "}" for t in tags]
    # What the registry names and the web builds its queues from.
    assert {p.queue_name for p in parts} == {"image_queue"}


def test_a_queue_name_with_braces_is_refused() -> None:
    for name in ("a{b", "a}b", "a#b"):
        with pytest.raises(SettingsError, match="queue-name"):
            load_settings(["--queue-name", name], environ={})


# -- the URL -------------------------------------------------------------------


def test_cluster_urls_parse_and_label() -> None:
    url = "redis+cluster://:s3cret@10.0.0.1:7000,10.0.0.2:7001"
    assert parse_cluster_url(url) == ([("10.0.0.1", 7000), ("10.0.0.2", 7001)], "s3cret")
    assert parse_cluster_url("redis+cluster://[::1]:7000/") == ([("::1", 7000)], None)
    assert label(url) == "cluster:10.0.0.1:7000"
    settings = load_settings(["--redis-url", f"{url},redis://other:6379/0"], environ={})
    assert settings.redis_urls == (url, "redis://other:6379/0")
    for bad in (
        "redis+cluster://",
        "redis+cluster://a:1/0",
        "redis+cluster://a",
        "redis+cluster://a:x",
    ):
        with pytest.raises(ValueError, match="cluster"):
            parse_cluster_url(bad)


@given(st.text(max_size=60))
def test_any_cluster_url_parses_or_is_refused_with_a_value_error(text: str) -> None:
    try:
        nodes, _ = parse_cluster_url("redis+cluster://" + text)
    except ValueError:
        return
    assert nodes and all(0 < port < 65536 and host for host, port in nodes)


# -- a real cluster --------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """3 masters and 3 replicas on loopback, for the whole module."""
    with LocalCluster(masters=3, node_timeout_ms=2000) as found:
        yield found


@pytest.fixture
def name() -> str:
    return f"t{time.monotonic_ns()}"


def metric(base: str, name: str) -> float:
    """The sum of a metric's samples on the server's /metrics."""
    text = requests.get(f"{base}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if re.match(rf"{name}(_total)?{{", line)
    )


def master_calls(cluster: LocalCluster, command: str) -> dict[int, int]:
    """Calls of `command` each live master served since its stats were reset."""
    found = {}
    for node in cluster.live_masters():
        client = redis.Redis(port=node.port)
        stats = client.info("commandstats").get(f"cmdstat_{command}", {})
        found[node.port] = int(stats.get("calls", 0))
        client.close()
    return found


def reset_stats(cluster: LocalCluster) -> None:
    for node in cluster.live_masters():
        client = redis.Redis(port=node.port)
        client.config_resetstat()
        client.close()


@pytest.mark.slow
def test_queue_operations_on_a_cluster(cluster: LocalCluster, name: str) -> None:
    """Every script and transaction of the queue, jobs, callbacks and quotas
    runs on a cluster (a CROSSSLOT key list would be refused)."""
    shards = ShardSet.connect([cluster.url], Keys(name), timeout=2, levels=2, partitions=3)
    info = WorkerInfo("sim", 8, "host", 1, time.time(), versioned=True, version="2")
    for queue in shards.queues:
        versioned = queue.of_version("2")
        versioned.beat("w", info, ttl=5)
        versioned.push_all([b'{"id": "a"}\nx', b'{"id": "b", "priority": 2}\ny'], 10, level=1)
        assert versioned.depths() == [2, 0]
        assert versioned.claim_first("w", 1) is not None
        assert len(versioned.claim_more("w", 4, time.monotonic() + 0.05)) == 1
        assert versioned.requeue("w") == 2  # back on the version's queue
        assert len(versioned.claim_more("w", 4, time.monotonic())) == 2
        versioned.finish("w", {"a": b"A"}, ttl=5)
        assert queue.wait_results(["a"], 2) == {"a": b"A"}
        # A dead worker's claims are reaped; a version with no worker is swept.
        versioned.push(b'{"id": "c"}\nz')
        assert versioned.claim_first("w", 1) is not None
        queue.client.delete(queue.keys.heartbeat("w"))
        assert queue.reap_dead() == {"w": 1}
        assert queue.depths() == [1, 0]
        # A job: staged, created, fed onto the queue, recorded, its callback pending.
        queue.jobs.stage("j", [b'{"id": "job.j.0"}\nq'], ttl=60)
        queue.jobs.create("j", model="sim", owner="", names=["x.png"], failures={}, ttl=60,
                          callback_url="http://hook")  # fmt: skip
        assert queue.jobs.feed(10) == 1
        assert queue.finish("w2", {"job.j.0": b'{"success": true}'}, ttl=5).jobs_done == ["j"]
        assert queue.callbacks.claim(time.time() + 1, 30, 5) == [("j", 1)]
        assert queue.jobs.get("j").state == "done"
        assert not queue.jobs.cancel("j")
    quotas = Quotas.open(cluster.url, Keys(name), timeout=2)
    quota = Quota(rate=1, period=3600, burst=2)
    assert [quotas.take("alice", quota).allowed for _ in range(3)] == [True, True, False]


@pytest.mark.slow
def test_a_server_over_a_cluster_serves_on_every_master(
    cluster: LocalCluster, name: str, tmp_path: Path
) -> None:
    """A `--model sim` server (web and worker) with 3 partitions: predictions
    (pinned to a version too), a job, cache hits, quotas and the traffic
    policy work, and the queue's pushes land on all 3 masters."""
    keys = tmp_path / "keys.txt"
    keys.write_text("alice-key-0123456789 name=alice rate=1/h burst=3\nopen-key-0123456789\n")
    admin = tmp_path / "admin.txt"
    admin.write_text("root admin-key-0123456789\n")
    settings = Settings(redis_url=cluster.url, queue_name=name)
    server, base = start_serving(
        settings, *SIM, "--queue-partitions", "3", "--response-cache-ttl", "60",
        "--api-keys", str(keys), "--admin-keys", str(admin), "--web-workers", "1",
    )  # fmt: skip
    try:
        wait_until(lambda: requests.get(base + "/readyz", timeout=5).ok, 90, "ready")
        session = requests.Session()
        session.headers["X-API-Key"] = "open-key-0123456789"
        reset_stats(cluster)
        for i in range(30):
            # Each a different image: no cache hit, every one queued.
            image = CHELSEA + bytes(i + 1)
            answer = session.post(base + "/predict", files={"image": image}, timeout=30)
            assert answer.status_code == 200, answer.text
        pushes = master_calls(cluster, "rpush")
        assert len(pushes) == 3 and all(pushes.values()), pushes

        # (No X-Cache header with --api-keys: the metrics say it.)
        for _ in range(2):
            answer = session.post(base + "/predict", files={"image": CHELSEA}, timeout=30)
            assert answer.status_code == 200, answer.text
        assert metric(base, "keras_server_response_cache_hits") == 1
        pinned = session.post(
            base + "/models/sim/versions/1/predict", files={"image": CHELSEA}, timeout=30
        )
        assert pinned.status_code == 200 and pinned.json()["model"]["version"] == "1"

        job = session.post(base + "/jobs", files=[("image", CHELSEA), ("image", CHELSEA)],
                           timeout=30)  # fmt: skip
        assert job.status_code == 202, job.text

        def done() -> object:
            body = session.get(base + job.json()["status_url"], timeout=10).json()
            return body if body["state"] == "done" else None

        assert wait_until(done, 60, "the job")["succeeded"] == 2  # type: ignore[index]

        alice = {"X-API-Key": "alice-key-0123456789"}
        statuses = [
            requests.post(base + "/predict", files={"image": CHELSEA}, headers=alice,
                          timeout=30).status_code
            for _ in range(4)
        ]  # fmt: skip
        assert statuses == [200, 200, 200, 429]

        admin_header = {"Authorization": "Bearer admin-key-0123456789"}
        put = requests.put(base + "/admin/models/sim/traffic", json={"weights": {"1": 100}},
                           headers=admin_header, timeout=10)  # fmt: skip
        assert put.status_code == 200, put.text
        listed = requests.get(base + "/admin/models", headers=admin_header, timeout=10).json()
        assert [m["traffic"] for m in listed["models"]] == [put.json()["traffic"]]
        assert put.json()["traffic"]["weights"] == {"1": 100}
        metrics = requests.get(base + "/metrics", timeout=10).text
        # One series per shard: the partitions summed.
        depth = [
            line
            for line in metrics.splitlines()
            if line.startswith("keras_server_queue_depth{") and 'level="1"' in line
        ]
        assert len(depth) == 1 and f'shard="{label(cluster.url)}"' in depth[0], depth
    finally:
        stop(server)


def replica_in_sync(cluster: LocalCluster, master: RedisServer) -> bool:
    """Whether `master`'s replica says its link to it is up (ROLE: connected)."""
    for node in cluster.nodes:
        if cluster.role(node) != "slave":
            continue
        with redis.Redis(port=node.port, socket_timeout=1) as client:
            role = client.execute_command("ROLE")
        if int(role[2]) == master.port and role[3] == b"connected":
            return True
    return False


@pytest.mark.slow
def test_a_killed_master_fails_over_without_losing_a_request(
    cluster: LocalCluster, name: str
) -> None:
    """32 clients post for a bounded time while one master is SIGKILLed:
    every request is answered (200, or 503/504 while the replica takes
    over), none past --result-timeout; once the replica is promoted, every
    request succeeds, nothing restarted. Runs last: the cluster keeps 3
    masters, one without a replica."""
    result_timeout = 8.0
    settings = Settings(redis_url=cluster.url, queue_name=name)
    server, base = start_serving(
        settings, *SIM, "--queue-partitions", "3", "--web-workers", "1",
        "--result-timeout", str(result_timeout), "--redis-timeout", "1",
    )  # fmt: skip
    try:
        wait_until(lambda: requests.get(base + "/readyz", timeout=5).ok, 90, "ready")
        outcomes: list[tuple[int, float]] = []  # (status or -1 for no answer, seconds)
        lock = threading.Lock()
        stop_at = time.monotonic() + 14.0  # bounded: every client stops sending then

        def client(i: int) -> None:
            session = requests.Session()
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                started = time.monotonic()
                try:
                    answer = session.post(
                        base + "/predict", files={"image": CHELSEA + bytes([i, n % 256])},
                        timeout=result_timeout + 10,
                    )  # fmt: skip
                    status = answer.status_code
                    if status == 503:
                        assert "Retry-After" in answer.headers, answer.text
                except requests.RequestException:
                    status = -1
                with lock:
                    outcomes.append((status, time.monotonic() - started))

        victim = cluster.live_masters()[1]
        # A replica takes over only with data recent enough: one that has not
        # finished its first sync (a loaded machine, just after `cluster
        # create`) never would, and the promotion below would never come.
        wait_until(lambda: replica_in_sync(cluster, victim), 60, "the victim's replica in sync")
        with ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(client, i) for i in range(32)]
            time.sleep(3.0)  # under load first: the kill lands on claims in flight
            assert victim.process is not None
            victim.process.send_signal(signal.SIGKILL)
            for future in futures:
                future.result()
        statuses = Counter(status for status, _ in outcomes)
        assert set(statuses) <= {200, 503, 504}, statuses
        assert statuses[200] > 0, statuses
        slowest = max(seconds for _, seconds in outcomes)
        # Bounded by the answer's own deadline, plus the web tier's slack.
        assert slowest < result_timeout + 5, (slowest, statuses)

        # The replica takes over; then every request succeeds, as they were.
        wait_until(lambda: len(cluster.live_masters()) == 3 and cluster.ready(), 60,
                   "the replica's promotion")  # fmt: skip

        def serves() -> bool:
            answer = requests.post(base + "/predict", files={"image": CHELSEA}, timeout=30)
            return answer.status_code == 200

        wait_until(serves, 30, "a first success after the failover")
        with ThreadPoolExecutor(32) as pool:
            after = list(pool.map(lambda i: requests.post(
                base + "/predict", files={"image": CHELSEA + bytes([i])}, timeout=30
            ).status_code, range(96)))  # fmt: skip
        assert Counter(after) == {200: 96}
    finally:
        stop(server)


def test_settings_take_partitions(tmp_path: Path) -> None:
    settings = load_settings(["--queue-partitions", "3"], environ={})
    assert dataclasses.replace(settings).queue_partitions == 3
    with pytest.raises(SettingsError, match="queue-partitions"):
        load_settings(["--queue-partitions", "0"], environ={})
