"""Job callbacks (keras_server/callbacks.py, worker/callbacks.py) against a
real HTTP receiver on loopback and real Redis: the allow-list's hosts, ports and path prefixes;
the timestamped signature, checked by the receiver code docs/api.md shows;
delivery from Redis by any worker, once, from a bounded pool, surviving the
worker that completed the job; retries given up and counted; the absolute
status URL."""

from __future__ import annotations

import dataclasses
import http.server
import io
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import CHELSEA, ROOT, WorkerThread, make_worker, wait_until
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from keras_server.broker import messages
from keras_server.broker.request_queue import RequestQueue
from keras_server.callbacks import allowed_hosts, refusal, sign
from keras_server.engines.simulated import SimulatedModel
from keras_server.settings import Settings, SettingsError, load_settings
from keras_server.web.app import create_app
from keras_server.worker.callbacks import ATTEMPTS, CallbackSender

SECRET = "s3cret-for-callbacks"
PUBLIC = "https://api.example.com/ml"


# -- the allow-list -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "url", "allowed"),
    [
        ("hooks.example.com", "https://hooks.example.com/x", True),
        ("hooks.example.com", "http://HOOKS.example.com/x", True),
        ("hooks.example.com", "https://hooks.example.com:8443/x", False),
        ("hooks.example.com", "http://hooks.example.com:443/x", False),
        ("hooks.example.com:8443", "https://hooks.example.com:8443/x", True),
        ("hooks.example.com:8443", "https://hooks.example.com/x", False),
        ("hooks.example.com:443/jobs/done", "https://hooks.example.com/jobs/done", True),
        ("hooks.example.com:443/jobs/done", "https://hooks.example.com/jobs/done/7", True),
        ("hooks.example.com:443/jobs/done/", "https://hooks.example.com/jobs/done/7", True),
        ("hooks.example.com:443/jobs/done", "https://hooks.example.com/jobs/doneX", False),
        ("hooks.example.com:443/jobs/done", "https://hooks.example.com/jobs", False),
        ("hooks.example.com/jobs/done", "https://hooks.example.com/jobs/done/../../admin", False),
        ("hooks.example.com/jobs/done", "https://hooks.example.com/jobs/done/%2e%2e/x", False),
        ("hooks.example.com/jobs", "http://hooks.example.com/jobs/1", True),
        ("hooks.example.com", "https://other.example.com/x", False),
        ("hooks.example.com", "https://hooks.example.com.evil.net/x", False),
        ("hooks.example.com", "https://user:pw@hooks.example.com/x", False),
        ("hooks.example.com", "ftp://hooks.example.com/x", False),
        ("a.example, [::1]:9000/cb", "http://[::1]:9000/cb/1", True),
        ("a.example, [::1]:9000/cb", "http://[::1]:9001/cb/1", False),
    ],
)
def test_a_url_must_match_an_entry_by_host_port_and_path_prefix(
    entries: str, url: str, allowed: bool
) -> None:
    assert (refusal(url, allowed_hosts(entries), SECRET) is None) is allowed


def test_bad_entries_and_public_urls_are_refused_at_start() -> None:
    for entry in ("http://h.example", "h.example:port", "user@h.example", "h.example/../x"):
        with pytest.raises(SettingsError, match="--callback-hosts"):
            load_settings(["--callback-hosts", entry], environ={})
    with pytest.raises(SettingsError, match="--public-url"):
        load_settings(["--public-url", "api.example.com"], environ={})
    assert load_settings(["--public-url", PUBLIC + "/"], environ={}).public_url == PUBLIC


@given(url=st.text(max_size=80), entries=st.text(max_size=40))
def test_any_url_is_answered_never_an_exception(url: str, entries: str) -> None:
    try:
        targets = allowed_hosts(entries)
    except ValueError:
        return
    refusal(url, targets, SECRET)


@given(
    prefix=st.lists(st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True), max_size=3),
    path=st.lists(st.from_regex(r"[a-zA-Z0-9._%-]{1,8}", fullmatch=True), max_size=4),
    port=st.sampled_from([None, 80, 8080]),
)
def test_an_allowed_url_is_at_or_below_the_prefix(
    prefix: list[str], path: list[str], port: int | None
) -> None:
    entry = "h.example" + (f":{port}" if port else "") + "".join("/" + p for p in prefix)
    url = "http://h.example" + (f":{port}" if port else "") + "".join("/" + p for p in path)
    if refusal(url, allowed_hosts(entry), SECRET) is None:
        assert path[: len(prefix)] == prefix
        assert ".." not in path and "." not in path


# -- a receiver ---------------------------------------------------------------------


@dataclasses.dataclass
class Received:
    body: bytes
    headers: dict[str, str]


class Receiver:
    """An HTTP server on loopback that records each POST and answers it with
    `status(n)` (n: how many came before), after `hold` is set."""

    def __init__(self, status: Callable[[int], int] = lambda n: 200, port: int = 0) -> None:
        self.received: list[Received] = []
        self.status = status
        self.hold = threading.Event()
        self.hold.set()
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.in_flight += 1
                    receiver.most_in_flight = max(receiver.most_in_flight, receiver.in_flight)
                receiver.hold.wait(30)
                with receiver._lock:
                    receiver.in_flight -= 1
                    answer = receiver.status(len(receiver.received))
                    receiver.received.append(Received(body, dict(self.headers.items())))
                self.send_response(answer)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/done"
        self.hosts = f"127.0.0.1:{self.port}/hooks"

    def ids(self) -> list[str]:
        with self._lock:
            return [json.loads(r.body)["id"] for r in self.received]

    def __enter__(self) -> Receiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


def documented_check() -> Callable[[bytes, Any, bytes], bool]:
    """`verified` from the receiver code docs/api.md shows."""
    text = (ROOT / "docs" / "api.md").read_text()
    code = re.search(r"<!-- callback-receiver:[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert code, "docs/api.md lost its receiver code"
    namespace: dict[str, Any] = {}
    exec(code.group(1), namespace)
    return namespace["verified"]  # type: ignore[no-any-return]


def sender(receiver: Receiver, **options: Any) -> CallbackSender:
    return CallbackSender(receiver.hosts, SECRET, first_backoff=0.05, **options)


def done_jobs(queue: RequestQueue, url: str, count: int) -> list[str]:
    """`count` jobs done at creation (their one image failed to decode), each
    with its callback pending."""
    ids = []
    for _ in range(count):
        job_id = uuid.uuid4().hex
        failed = {0: messages.error_result("not an image")}
        assert queue.jobs.create(
            job_id, model="sim", owner="", names=["x.png"], failures=failed, ttl=60,
            callback_url=url,
        )  # fmt: skip
        ids.append(job_id)
    return ids


def pending(queue: RequestQueue) -> int:
    return int(queue.client.zcard(queue.keys.callbacks))


def sample(outcome: str) -> float:
    return REGISTRY.get_sample_value("keras_server_callbacks_total", {"outcome": outcome}) or 0.0


# -- delivery -------------------------------------------------------------------------


def test_a_job_callback_is_signed_with_its_time_and_retried(
    settings: Settings, receiver: Receiver
) -> None:
    """Through POST /jobs and a worker: the first try answered 500, the second
    delivered; both pass the documented check, and a replayed or altered one
    does not; the status URL is absolute with --public-url."""
    receiver.status = lambda n: 500 if n == 0 else 200
    allowed = dataclasses.replace(
        settings, callback_hosts=receiver.hosts, callback_secret=SECRET, public_url=PUBLIC
    )
    client = create_app(allowed).test_client()
    outside = f"http://127.0.0.1:{receiver.port}/elsewhere"
    data = {"image": [(io.BytesIO(CHELSEA), "a.png")], "callback_url": outside}
    refused = client.post("/jobs", data=data, content_type="multipart/form-data")
    assert refused.status_code == 400
    assert "matches no --callback-hosts entry" in refused.get_json()["error"]
    worker = make_worker(
        allowed,
        SimulatedModel(0, 0),
        heartbeat_ttl=0.6,
        callbacks=sender(receiver, public_url=PUBLIC),
    )
    with WorkerThread(worker):
        data = {"image": [(io.BytesIO(CHELSEA), "a.png")], "callback_url": receiver.url}
        answer = client.post("/jobs", data=data, content_type="multipart/form-data")
        assert answer.status_code == 202
        wait_until(lambda: len(receiver.received) >= 2, 30, "the callback, tried twice")
    job_id = answer.get_json()["id"]
    verified = documented_check()
    for delivery in receiver.received:
        assert verified(delivery.body, delivery.headers, SECRET.encode())
        timestamp = int(delivery.headers["X-Keras-Server-Timestamp"])
        assert abs(time.time() - timestamp) < 60
        assert delivery.headers["X-Signature-256"] == sign(delivery.body, SECRET, timestamp)
    body = receiver.received[-1].body
    status = json.loads(body)
    assert status["id"] == job_id
    assert (status["state"], status["total"], status["succeeded"]) == ("done", 1, 1)
    assert status["status_url"] == f"{PUBLIC}/jobs/{job_id}"
    # A delivery recorded and sent again 6 minutes later, re-signed or not, fails.
    old = int(time.time()) - 360
    replayed = {"X-Keras-Server-Timestamp": str(old), "X-Signature-256": sign(body, SECRET, old)}
    assert not verified(body, replayed, SECRET.encode())
    fresh = dict(receiver.received[-1].headers)
    assert not verified(body.replace(b"done", b"DONE"), fresh, SECRET.encode())
    assert not verified(body, {}, SECRET.encode())
    assert pending(worker.queue) == 0


def test_a_pending_callback_outlives_the_worker_that_finished_the_job(
    settings: Settings, queue: RequestQueue
) -> None:
    """The receiver is down while the first worker tries; that worker stops;
    another, started later, delivers the callback from Redis, once."""
    with Receiver() as probe:
        hosts, url, port = probe.hosts, probe.url, probe.port
    allowed = dataclasses.replace(settings, callback_hosts=hosts, callback_secret=SECRET)
    first = make_worker(allowed, SimulatedModel(0, 0), heartbeat_ttl=0.6)
    first.callbacks = CallbackSender(hosts, SECRET, first_backoff=0.3)
    (job_id,) = done_jobs(queue, url, 1)
    retried = sample("retried")
    with WorkerThread(first):
        wait_until(lambda: sample("retried") > retried, 10, "a failed try")
    first.callbacks.close()
    assert pending(queue) == 1
    # The receiver comes back on its port; a new worker process starts.
    second = make_worker(
        allowed, SimulatedModel(0, 0), heartbeat_ttl=0.6, callbacks=CallbackSender(hosts, SECRET)
    )
    with Receiver(port=port) as restarted, WorkerThread(second):
        wait_until(lambda: pending(queue) == 0, 15, "the second worker to deliver it")
    assert restarted.ids() == [job_id]


def test_two_workers_deliver_each_callback_once_from_bounded_pools(
    settings: Settings, queue: RequestQueue, receiver: Receiver
) -> None:
    """Ten pending callbacks, two senders of two threads polling the same
    Redis at once: each callback is delivered once, at most four at a time."""
    receiver.hold.clear()  # the first ones wait, so the pools fill up
    ids = done_jobs(queue, receiver.url, 10)
    senders = [sender(receiver, threads=2), sender(receiver, threads=2)]
    stop = threading.Event()

    def poll(one: CallbackSender) -> None:
        while not stop.is_set():
            one.poll(queue)
            stop.wait(0.01)

    threads = [threading.Thread(target=poll, args=(s,)) for s in senders]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: receiver.in_flight == 4, 10, "both pools busy")
        time.sleep(0.2)  # a pool that took more than its threads would show by now
        assert receiver.in_flight == 4
        assert pending(queue) == 10  # leased, not delivered yet
        receiver.hold.set()
        wait_until(lambda: pending(queue) == 0, 20, "every callback delivered")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for one in senders:
            one.close()
    assert sorted(receiver.ids()) == sorted(ids)
    assert receiver.most_in_flight == 4


def test_a_callback_that_always_fails_is_given_up_and_counted(
    settings: Settings, queue: RequestQueue, receiver: Receiver
) -> None:
    receiver.status = lambda n: 503
    (job_id,) = done_jobs(queue, receiver.url, 1)
    given_up = sample("given_up")
    one = sender(receiver)
    try:
        wait_until(lambda: one.poll(queue) == 0 and pending(queue) == 0, 20, "giving up")
    finally:
        one.close()
    assert receiver.ids() == [job_id] * ATTEMPTS
    assert sample("given_up") == given_up + 1
    assert not queue.client.hexists(queue.keys.callback_tries, job_id)


def test_a_callback_whose_url_is_no_longer_allowed_is_dropped(
    queue: RequestQueue, receiver: Receiver
) -> None:
    done_jobs(queue, receiver.url, 1)
    dropped = sample("dropped")
    one = CallbackSender(f"127.0.0.1:{receiver.port}/other", SECRET)
    try:
        assert one.poll(queue) == 1
        wait_until(lambda: pending(queue) == 0, 10, "the callback dropped")
    finally:
        one.close()
    assert receiver.received == []
    assert sample("dropped") == dropped + 1
