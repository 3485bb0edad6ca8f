"""OpenTelemetry tracing through the queue (keras_server/tracing.py), against
a real OTLP/HTTP receiver the test runs: a small HTTP server that decodes
each ExportTraceServiceRequest with opentelemetry-proto.

The servers are real processes (granian with two web processes under --role
web, and a --role worker), with the batch processor's delay set past the
test's length, so every span arrives only through the flush at shutdown."""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
import requests
from conftest import CHELSEA, ENV, ROOT, start, stop, wait_for_http
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from keras_server import tracing
from keras_server.broker import messages
from keras_server.broker.redis_server import free_port
from keras_server.broker.request_queue import RequestQueue
from keras_server.engines.simulated import SimulatedModel
from keras_server.settings import Settings, SettingsError, load_settings
from keras_server.worker.loop import Worker

# A client's own trace, continued by the server.
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
# Generous: a loaded 2-core machine takes long to start and stop the servers.
STARTUP_S = 240
STOP_S = 90
# Not one of OTEL_*'s: what the servers inherit from the test's environment.
CLEAN_ENV = {k: v for k, v in ENV.items() if not k.startswith("OTEL_")}


@dataclass
class Span:
    name: str
    trace: str
    id: str
    parent: str
    kind: int
    links: list[tuple[str, str]]
    attributes: dict[str, Any]
    service: str
    pid: int


@dataclass
class Receiver:
    """What an OTLP/HTTP collector received on /v1/traces."""

    url: str
    spans: list[Span] = field(default_factory=list)
    posts: int = 0

    def named(self, name: str, service: str | None = None) -> list[Span]:
        return [
            s for s in self.spans if s.name == name and (service is None or s.service == service)
        ]

    def one(self, name: str, trace: str) -> Span:
        found = [s for s in self.spans if s.name == name and s.trace == trace]
        assert len(found) == 1, f"{name} in trace {trace}: {found} of {self.spans}"
        return found[0]


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    port = free_port()
    received = Receiver(f"http://127.0.0.1:{port}")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            assert self.path == "/v1/traces", self.path
            export = ExportTraceServiceRequest.FromString(body)
            with lock:
                received.posts += 1
                for resource_spans in export.resource_spans:
                    resource = _attributes(resource_spans.resource.attributes)
                    for scope in resource_spans.scope_spans:
                        for s in scope.spans:
                            received.spans.append(
                                Span(
                                    name=s.name,
                                    trace=s.trace_id.hex(),
                                    id=s.span_id.hex(),
                                    parent=s.parent_span_id.hex(),
                                    kind=s.kind,
                                    links=[(k.trace_id.hex(), k.span_id.hex()) for k in s.links],
                                    attributes=_attributes(s.attributes),
                                    service=resource["service.name"],
                                    pid=resource["process.pid"],
                                )
                            )
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield received
    server.shutdown()
    server.server_close()


def serve_pair(
    settings: Settings,
    web_env: dict[str, str],
    worker_env: dict[str, str],
    worker_args: tuple[str, ...] = (),
) -> tuple[Any, Any, str]:
    """A --role worker (sim) and a --role web of two granian processes."""
    common = ("--redis-url", settings.redis_url, "--queue-name", settings.queue_name)
    worker = start(
        "--role", "worker", "--model", "sim", "--sim-batch-ms", "5", "--sim-image-ms", "1",
        *common, *worker_args, env=worker_env,
    )  # fmt: skip
    port = free_port()
    web = start(
        "--role", "web", "--web-workers", "2", "--model", "sim", "--port", str(port), *common,
        env=web_env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(base + "/healthz", web, STARTUP_S)
        # Ready: the worker is up and its input size known to the web tier.
        wait_for_http(base + "/readyz", web, STARTUP_S)
    except BaseException:
        stop(worker, STOP_S)
        raise
    return worker, web, base


def predict(base: str, headers: dict[str, str] | None = None) -> None:
    for _ in range(60):  # /readyz answers before both web processes know the worker
        response = requests.post(
            base + "/predict", files={"image": CHELSEA}, headers=headers, timeout=60
        )
        if response.status_code != 503:
            break
        time.sleep(0.2)
    assert response.status_code == 200, response.text


@pytest.mark.slow
def test_a_trace_crosses_the_queue_from_web_to_worker(
    settings: Settings, receiver: Receiver
) -> None:
    # The web tier is configured by the standard variables, the worker by the
    # flag. A batch delay past the test: nothing is sent before shutdown.
    late = {**CLEAN_ENV, "OTEL_BSP_SCHEDULE_DELAY": "600000"}
    web_env = {**late, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    worker, web, base = serve_pair(settings, web_env, late, ("--otlp-endpoint", receiver.url))
    try:
        predict(base, {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
        predict(base)
        requests.get(base + "/healthz", timeout=10)
        assert receiver.posts == 0, "spans went out before the shutdown"
    finally:
        web_log, worker_log = stop(web, STOP_S), stop(worker, STOP_S)
    assert web.returncode == 0 and worker.returncode == 0, web_log + worker_log
    assert "tracing on" in web_log and "tracing on" in worker_log

    # The client's trace, continued: HTTP span -> decode, enqueue, wait.
    http = next(s for s in receiver.spans if s.trace == CLIENT_TRACE and s.kind == 2)  # SERVER
    assert http.parent == CLIENT_SPAN
    assert http.service == "keras-server-web"
    assert http.attributes["http.route"] == "/predict"
    assert http.attributes["http.response.status_code"] == 200
    assert http.name == "POST /predict"
    decode, enqueue, wait = (receiver.one(n, CLIENT_TRACE) for n in ("decode", "enqueue", "wait"))
    assert decode.parent == enqueue.parent == wait.parent == http.id
    assert {decode.pid, enqueue.pid, wait.pid} == {http.pid}
    assert enqueue.kind == 4  # PRODUCER
    assert enqueue.attributes[tracing.MODEL] == "sim"
    assert enqueue.attributes[tracing.SHARD] == wait.attributes[tracing.SHARD]
    assert wait.attributes[tracing.ANSWERED] == 1

    # Across the queue, in the worker process: the batch, a child of the
    # request's enqueue span and linked to it, with the forward pass and the
    # answer under it.
    batch = receiver.one("batch", CLIENT_TRACE)
    assert batch.service == "keras-server-worker" and batch.pid != http.pid
    assert batch.parent == enqueue.id
    assert (CLIENT_TRACE, enqueue.id) in batch.links
    assert batch.kind == 5  # CONSUMER
    assert batch.attributes[tracing.MODEL] == "sim"
    assert batch.attributes[tracing.VERSION] == "1"
    assert batch.attributes[tracing.ENGINE] == "sim"
    assert batch.attributes[tracing.PRECISION] == "fp32"
    assert batch.attributes[tracing.BATCH_SIZE] == 1
    assert batch.attributes[tracing.SHARD] == enqueue.attributes[tracing.SHARD]
    forward, answer = receiver.one("forward", CLIENT_TRACE), receiver.one("answer", CLIENT_TRACE)
    assert forward.parent == answer.parent == batch.id

    # The request without a traceparent starts a trace of its own, which
    # crosses the queue too.
    roots = [s for s in receiver.spans if s.kind == 2 and s.trace != CLIENT_TRACE]
    assert len(roots) == 1 and roots[0].parent == ""
    other = roots[0].trace
    assert receiver.one("batch", other).parent == receiver.one("enqueue", other).id
    # The probe is not traced.
    assert not [s for s in receiver.spans if s.attributes.get("http.route") == "/healthz"]


@pytest.mark.slow
def test_role_all_traces_its_front_and_its_worker_child(
    settings: Settings, receiver: Receiver
) -> None:
    """--role all: the flag reaches both children (the front's granian
    process and the model process) through the environment it hands down."""
    port = free_port()
    server = start(
        "--role", "all", "--model", "sim", "--sim-batch-ms", "5", "--sim-image-ms", "1",
        "--web-workers", "1", "--port", str(port), "--otlp-endpoint", receiver.url,
        "--redis-url", settings.redis_url, "--queue-name", settings.queue_name,
        env={**CLEAN_ENV, "OTEL_BSP_SCHEDULE_DELAY": "600000"},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(base + "/readyz", server, STARTUP_S)
        predict(base, {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    finally:
        log = stop(server, STOP_S)
    assert server.returncode == 0, log
    enqueue, batch = receiver.one("enqueue", CLIENT_TRACE), receiver.one("batch", CLIENT_TRACE)
    assert batch.parent == enqueue.id and batch.links == [(CLIENT_TRACE, enqueue.id)]
    assert (enqueue.service, batch.service) == ("keras-server-web", "keras-server-worker")
    assert enqueue.pid != batch.pid != server.pid


@pytest.mark.slow
def test_tracing_off_sends_nothing(settings: Settings, receiver: Receiver) -> None:
    # OTEL_TRACES_EXPORTER=none wins over an endpoint; the worker has no OTEL_* at all.
    web_env = {
        **CLEAN_ENV,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_TRACES_EXPORTER": "none",
    }
    worker, web, base = serve_pair(settings, web_env, CLEAN_ENV)
    try:
        predict(base, {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    finally:
        web_log, worker_log = stop(web, STOP_S), stop(worker, STOP_S)
    assert "tracing on" not in web_log + worker_log
    assert receiver.posts == 0


def test_tracing_off_loads_no_tracer() -> None:
    """Off, the web app and the worker loop load neither the SDK's tracing,
    the exporter nor the Flask instrumentation. (redis-py imports
    OpenTelemetry's metrics SDK when it is installed, for its own metrics,
    which stay off unless initialised: not ours to test.)"""
    code = (
        "import sys\n"
        "from keras_server.settings import Settings\n"
        "from keras_server.web.app import create_app\n"
        "import keras_server.cli, keras_server.worker.loop\n"
        "from keras_server import tracing\n"
        "assert not tracing.configure(Settings(), 'web')\n"
        "create_app(Settings())\n"
        "ours = ('opentelemetry.sdk.trace', 'opentelemetry.exporter', "
        "'opentelemetry.instrumentation', 'opentelemetry.propagate')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(ours))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=CLEAN_ENV,
        capture_output=True, text=True, timeout=280, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def _pushed(queue: RequestQueue, trace: str) -> str:
    request = messages.ImageRequest.create(
        np.zeros((224, 224, 3), np.uint8), 30.0, probabilities=False
    )
    queue.push(
        messages.encode_request(messages.ImageRequest(**{**request.__dict__, "trace": trace}))
    )
    return request.id


def test_a_batch_links_every_request_and_is_the_child_of_the_first_sampled(
    settings: Settings, queue: RequestQueue, receiver: Receiver
) -> None:
    traced = Settings(otlp_endpoint=receiver.url)
    unsampled = f"00-{'1' * 32}-{'a' * 16}-00"
    sampled = [f"00-{'2' * 32}-{'b' * 16}-01", f"00-{'3' * 32}-{'c' * 16}-01"]
    for trace in (unsampled, *sampled, "", "not a traceparent"):
        _pushed(queue, trace)
    worker = Worker(queue, SimulatedModel(0, 0), 8, result_ttl=30, name="sim", version="7")
    assert tracing.configure(traced, "worker")
    try:
        assert worker.run_once(1.0) == 5
    finally:
        tracing.shutdown()
    (batch,) = receiver.named("batch")
    assert batch.links == [(t[3:35], t[36:52]) for t in (unsampled, *sampled)]
    assert (batch.trace, batch.parent) == (sampled[0][3:35], sampled[0][36:52])
    assert batch.attributes[tracing.BATCH_SIZE] == 5
    assert batch.attributes[tracing.VERSION] == "7"
    assert {s.parent for s in receiver.spans if s.name in ("forward", "answer")} == {batch.id}


def test_the_trace_field_round_trips_and_a_bad_one_is_dropped() -> None:
    image = np.zeros((2, 2, 3), np.uint8)
    request = messages.ImageRequest("x", image, 1e10, trace="00-ab-cd-01")
    raw = messages.encode_request(request)
    assert messages.decode_request(raw).trace == "00-ab-cd-01"
    assert messages.trace_of(raw) == "00-ab-cd-01"
    plain = messages.encode_request(messages.ImageRequest("x", image, 1e10))
    assert b"trace" not in plain.partition(b"\n")[0]
    assert messages.trace_of(plain) == messages.decode_request(plain).trace == ""
    for bad in (7, ["x"], "t" * (messages.MAX_TRACE + 1)):
        header, _, data = raw.partition(b"\n")
        forged = header.replace(b'"00-ab-cd-01"', repr(bad).replace("'", '"').encode())
        assert messages.decode_request(forged + b"\n" + data).trace == ""
        assert messages.trace_of(forged + b"\n" + data) == ""


def test_what_turns_tracing_on() -> None:
    off, on = Settings(), Settings(otlp_endpoint="http://collector:4318")
    assert not tracing.requested(off, {})
    assert tracing.requested(on, {})
    assert not tracing.requested(on, {"OTEL_SDK_DISABLED": "true"})
    assert tracing.requested(off, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert tracing.requested(off, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/t"})
    assert tracing.requested(off, {"OTEL_TRACES_EXPORTER": "otlp"})
    assert not tracing.requested(
        off, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    )
    with pytest.raises(tracing.TracingUnavailable, match="http/protobuf"):
        tracing.check(on, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    with pytest.raises(tracing.TracingUnavailable, match="only otlp"):
        tracing.check(off, {"OTEL_TRACES_EXPORTER": "otlp,console"})
    with pytest.raises(SettingsError, match="http"):
        load_settings(["--otlp-endpoint", "collector:4318"], {})


def test_otlp_endpoint_without_the_otel_extra_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from keras_server.cli import main

    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    status = main(["--role", "worker", "--otlp-endpoint", "http://127.0.0.1:1"], prog="ks")
    assert status == 2
    error = capsys.readouterr().err
    assert "ks: error: tracing is asked for (--otlp-endpoint)" in error
    assert "keras-server[otel]" in error
