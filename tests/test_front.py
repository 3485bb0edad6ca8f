"""The HTTP front (web/front.py, granian) and the per-request costs around it:
slow clients, and the decode CPU counter."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from collections.abc import Iterator

import psutil
import pytest
import requests
from conftest import (
    CHELSEA,
    ENV,
    WorkerThread,
    free_port,
    make_worker,
    start,
    start_serving,
    stop,
    wait_for_http,
)
from prometheus_client import REGISTRY

from keras_server.cli import MALLOC_ENVIRONMENT
from keras_server.engines.simulated import SimulatedModel
from keras_server.serving.pipeline import FLUSH_CPU_S, Decoder
from keras_server.settings import Settings

DECODE_CPU = "keras_server_decode_cpu_seconds_total"


def decode_cpu() -> float:
    return REGISTRY.get_sample_value(DECODE_CPU) or 0.0


def test_decode_cpu_is_counted_in_batches_and_all_of_it(settings: Settings) -> None:
    """One decode does not write the counter (a lock and a file write in
    multiprocess mode, per image); the CPU is added up and written once it
    reaches FLUSH_CPU_S, none of it lost."""
    decode = Decoder(settings)
    before = decode_cpu()
    decode(CHELSEA, (224, 224))
    assert decode_cpu() == before
    for _ in range(2000):
        if decode_cpu() != before:
            break
        decode(CHELSEA, (224, 224))
    assert decode_cpu() - before >= FLUSH_CPU_S


class Dribblers:
    """`count` loopback connections that send a request line, then one header
    line every `every` s and never finish: a slowloris client, bounded."""

    def __init__(self, url: str, count: int, every: float = 1.0) -> None:
        host, port = url.split("//")[1].split(":")
        self.sockets = [socket.create_connection((host, int(port)), 5) for _ in range(count)]
        for s in self.sockets:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\n")
        self.stop = threading.Event()
        self.every = every
        self.thread = threading.Thread(target=self.dribble, daemon=True)

    def dribble(self) -> None:
        while not self.stop.wait(self.every):
            for s in self.sockets:
                # Cut by the server's header timeout: what we want.
                with contextlib.suppress(OSError):
                    s.sendall(b"X-Slow: 1\r\n")

    def __enter__(self) -> Dribblers:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        for s in self.sockets:
            s.close()


@pytest.fixture(params=["all", "web"])
def small_server(request: pytest.FixtureRequest, settings: Settings) -> Iterator[str]:
    """--role all (its own simulated model) or --role web (fed by a worker
    thread here), with 2 threads in one web process: fewer than the dribblers."""
    small = ("--web-workers", "1", "--web-threads", "2", "--model", "sim")
    if request.param == "all":
        process, base = start_serving(settings, "--role", "all", *small, "--sim-batch-ms", "1")
        yield base
    else:
        process, base = start_serving(settings, "--role", "web", *small)
        with WorkerThread(make_worker(settings, SimulatedModel(1, 0))):
            yield base
    log = stop(process, timeout=60)
    assert process.returncode == 0, log


@pytest.mark.slow
def test_slow_clients_do_not_starve_the_others(small_server: str) -> None:
    with Dribblers(small_server, count=8):
        answer = requests.post(
            small_server + "/predict", files={"image": ("x.png", CHELSEA)}, timeout=30
        )
    assert answer.status_code == 200, answer.text


@pytest.mark.slow
def test_every_child_starts_with_the_malloc_settings_a_user_value_winning(
    settings: Settings,
) -> None:
    """--role all's children (the worker, granian's supervisor and its web
    processes) start with glibc's malloc thresholds fixed, which it reads
    only at start-up; one the user set is handed down as it is."""
    port = free_port()
    mine = "1048576"
    process = start(
        "--role", "all", "--model", "sim", "--web-workers", "2", "--port", str(port),
        "--redis-url", settings.redis_url, "--queue-name", settings.queue_name,
        env={**ENV, "MALLOC_TRIM_THRESHOLD_": mine},
    )  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", process)
        assert process.pid is not None
        children = psutil.Process(process.pid).children(recursive=True)
        pythons = [c for c in children if "python" in c.name()]
        assert len(pythons) >= 4, [c.cmdline() for c in children]  # worker, supervisor, 2 web
        for child in pythons:
            environ = child.environ()
            assert environ["MALLOC_MMAP_THRESHOLD_"] == MALLOC_ENVIRONMENT["MALLOC_MMAP_THRESHOLD_"]
            assert environ["MALLOC_TRIM_THRESHOLD_"] == mine
    finally:
        log = stop(process, timeout=60)
    assert process.returncode == 0, log


def _post(
    connection: http.client.HTTPConnection, path: str, size: int, chunked: bool = False
) -> tuple[int, str]:
    """POST a multipart body of `size` bytes on `connection` (`chunked`:
    without a Content-Length, in 64 KB chunks): (status, its Connection header)."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        + b"x" * size
        + b"\r\n--b--\r\n"
    )
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    connection.request(
        "POST", path, body=chunks if chunked else body, encode_chunked=chunked,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )  # fmt: skip
    answer = connection.getresponse()
    answer.read()
    return answer.status, answer.getheader("Connection", "")


def test_a_kept_alive_connection_survives_a_request_refused_before_its_upload_was_read(
    settings: Settings,
) -> None:
    """A 404 sent before the upload was read leaves the connection usable:
    the rest of the body is read and dropped (granian closed it, without a
    `Connection: close`, and the client's next request on it was lost). A
    body declared over --max-upload-mb is not read, and a chunked one is read
    up to it: their answers say close."""
    process, base = start_serving(
        settings, "--role", "all", "--model", "sim", "--web-workers", "1", "--max-upload-mb", "1"
    )  # fmt: skip
    try:
        port = int(base.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        sent = ((200_000, False), (600_000, False), (900_000, False), (600_000, True))
        for size, chunked in sent:
            status, close = _post(connection, "/models/no-such-model/predict", size, chunked)
            assert (status, close) == (404, ""), size
            sock = connection.sock
            connection.request("GET", "/healthz")
            answer = connection.getresponse()
            assert answer.status == 200 and answer.read()
            assert connection.sock is sock, "the same connection answered"
        status, close = _post(connection, "/predict", 2_000_000)
        assert (status, close.lower()) == (413, "close")
        # Chunked, past the limit: read up to it, then closed.
        status, close = _post(connection, "/models/no-such-model/predict", 1_200_000, True)
        assert (status, close.lower()) == (404, "close")
        connection.close()
    finally:
        log = stop(process, timeout=60)
    assert process.returncode == 0, log
