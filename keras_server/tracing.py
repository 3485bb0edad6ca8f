"""OpenTelemetry tracing, through the queue: off unless asked for.

On when `--otlp-endpoint` is given or the standard OTEL_* variables ask for
OTLP (`OTEL_TRACES_EXPORTER=otlp`, or an `OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), and not `OTEL_SDK_DISABLED=true` nor
`OTEL_TRACES_EXPORTER=none`. Then `configure` starts, in each process that
calls it (every web process, every worker), an SDK TracerProvider with a
BatchSpanProcessor sending OTLP/HTTP; the SDK itself reads the other OTEL_*
variables (sampler, resource, headers, batching). The SDK is the `otel` extra:
it is imported only here, and only once tracing is asked for.

Off, each helper returns one shared do-nothing context manager: no
OpenTelemetry import, no allocation beyond the call.

The trace crosses the queue as the W3C traceparent of the web tier's enqueue
span (messages.ImageRequest.trace, `"trace"` in the request's header). A
worker's batch serves many traces, so its span links to every request's
enqueue span, and is the child of the first sampled one (docs/operations.md
draws the shape).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from keras_server.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanContext, Tracer

log = logging.getLogger(__name__)

# Attribute names: ours, under one prefix (OpenTelemetry has no convention for them).
MODEL = "keras_server.model"
VERSION = "keras_server.model.version"
ENGINE = "keras_server.engine"
PRECISION = "keras_server.precision"
BATCH_SIZE = "keras_server.batch.size"
SHARD = "keras_server.shard"
IMAGES = "keras_server.images"
ANSWERED = "keras_server.answered"

# The only wire format we speak: OTLP over HTTP with protobuf bodies.
PROTOCOL = "http/protobuf"
INSTALL_HINT = "pip install 'keras-server[otel]'"


class TracingUnavailable(RuntimeError):
    """Tracing is asked for but cannot run (the SDK is not installed, or the
    OTEL_* variables ask for something we do not send)."""


class SpanLike(Protocol):
    def set_attribute(self, key: str, value: Any) -> None: ...


class _Off:
    """The context manager and span of every helper while tracing is off."""

    __slots__ = ()

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        return None


OFF = _Off()


class _State:
    """This process's tracer, once `configure` started one."""

    tracer: Tracer | None = None
    provider: TracerProvider | None = None


_state = _State()
_lock = threading.Lock()


def _flag(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip().lower()


def _exporters(environ: Mapping[str, str]) -> set[str]:
    return {e.strip() for e in _flag(environ, "OTEL_TRACES_EXPORTER").split(",") if e.strip()}


def requested(settings: Settings, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `settings` or the OTEL_* variables ask for traces."""
    environ = os.environ if environ is None else environ
    if _flag(environ, "OTEL_SDK_DISABLED") == "true":
        return False
    if settings.otlp_endpoint:
        return True
    exporters = _exporters(environ)
    if "none" in exporters:
        return False
    return "otlp" in exporters or any(
        environ.get(name)
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def check(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """TracingUnavailable, saying why, when tracing is asked for and cannot
    run; the entry point calls this before it starts anything."""
    environ = os.environ if environ is None else environ
    if not requested(settings, environ):
        return
    protocol = _flag(environ, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _flag(
        environ, "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    if protocol and protocol != PROTOCOL:
        raise TracingUnavailable(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: traces are sent as {PROTOCOL} only"
        )
    if _exporters(environ) - {"otlp"}:
        raise TracingUnavailable(
            f"OTEL_TRACES_EXPORTER={environ['OTEL_TRACES_EXPORTER']!r}: only otlp (or none) is sent"
        )
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        asked = "--otlp-endpoint" if settings.otlp_endpoint else "the OTEL_* variables"
        raise TracingUnavailable(
            f"tracing is asked for ({asked}) but OpenTelemetry is not installed "
            f"({exc.name} is missing): {INSTALL_HINT}"
        ) from None


def configure(settings: Settings, role: str) -> bool:
    """Start tracing in this process when asked for (once; later calls do
    nothing); True when it is on. `role` ("web", "worker") names the service
    unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES do.

    Call it in the process that serves, after any fork: the batch processor's
    thread does not survive one (granian forks its web processes, and each
    builds its app, and calls this, after the fork)."""
    with _lock:
        if _state.tracer is not None:
            return True
        if not requested(settings):
            return False
        check(settings)
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"process.pid": os.getpid(), "keras_server.role": role})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: f"keras-server-{role}"}))
        # The sampler (OTEL_TRACES_SAMPLER) and the batching (OTEL_BSP_*) come
        # from the environment; so do the endpoint, headers and timeout unless
        # --otlp-endpoint names the collector.
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        endpoint = (
            f"{settings.otlp_endpoint.rstrip('/')}/v1/traces" if settings.otlp_endpoint else None
        )
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        trace.set_tracer_provider(provider)
        _state.provider = provider
        _state.tracer = provider.get_tracer("keras_server")
        # The spans still in the batch processor go out when the process ends:
        # atexit in a plain process (a worker), and multiprocessing's own exit
        # hook in a granian web process, which leaves by os._exit and so never
        # runs atexit.
        atexit.register(shutdown)
        multiprocessing.util.Finalize(None, shutdown, exitpriority=100)
        log.info(
            "tracing on: OTLP/HTTP to %s as %s",
            endpoint or "the OTEL_EXPORTER_OTLP_* endpoint",
            resource.attributes.get(SERVICE_NAME),
        )
        return True


def enabled() -> bool:
    return _state.tracer is not None


def shutdown() -> None:
    """Send the spans still queued and stop tracing in this process."""
    with _lock:
        provider, _state.provider, _state.tracer = _state.provider, None, None
    if provider is not None:
        provider.shutdown()


class ServerSpan:
    """An HTTP request's span, current from `server_span` until `end`."""

    def __init__(self, span: Any, token: object) -> None:
        self._span = span
        self._token = token

    def status(self, code: int) -> None:
        self._span.set_attribute("http.response.status_code", code)
        if code >= 500:  # a 4xx is the client's, not an error of ours
            from opentelemetry.trace import StatusCode

            self._span.set_status(StatusCode.ERROR)

    def end(self, error: BaseException | None = None) -> None:
        from opentelemetry import context

        if error is not None:
            self._span.record_exception(error)
        self._span.end()
        context.detach(self._token)


def server_span(
    method: str, route: str | None, path: str, headers: Mapping[str, str]
) -> ServerSpan | None:
    """The span of an HTTP request (kind SERVER), made current: the child
    of the trace context in `headers` (a W3C traceparent, by the propagators
    OTEL_PROPAGATORS names), else a new trace; named by route, with
    OpenTelemetry's HTTP attribute names. None while tracing is off."""
    tracer = _state.tracer
    if tracer is None:
        return None
    from opentelemetry import context, propagate, trace
    from opentelemetry.trace import SpanKind

    attributes = {"http.request.method": method, "url.path": path}
    if route:
        attributes["http.route"] = route
    span = tracer.start_span(
        f"{method} {route}" if route else method,
        context=propagate.extract(headers),
        kind=SpanKind.SERVER,
        attributes=attributes,
    )
    return ServerSpan(span, context.attach(trace.set_span_in_context(span)))


def span(name: str, attributes: Mapping[str, Any] | None = None, *, producer: bool = False) -> Any:
    """A context manager for a child span of the current one, made current
    (`producer`: of kind PRODUCER, one that puts work on the queue); its
    `__enter__` gives the span (SpanLike). An exception leaving it is
    recorded on the span."""
    tracer = _state.tracer
    if tracer is None:
        return OFF
    from opentelemetry.trace import SpanKind

    kind = SpanKind.PRODUCER if producer else SpanKind.INTERNAL
    return tracer.start_as_current_span(name, kind=kind, attributes=attributes)


def traceparent() -> str:
    """The W3C traceparent of the current span, for a queue message; "" when
    tracing is off or no span is recording."""
    if _state.tracer is None:
        return ""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent", "")


def _span_context(value: str) -> SpanContext | None:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract({"traceparent": value})
    found = trace.get_current_span(context).get_span_context()
    return found if found.is_valid else None


def batch_span(traces: Iterable[str], attributes: Mapping[str, Any] | None = None) -> Any:
    """A context manager for a worker's batch span (kind CONSUMER), made
    current: linked to each request's span (`traces`, their traceparents;
    empty or invalid ones are skipped), and the child of the first sampled
    one, so that request's trace shows the batch in place. A batch of
    untraced requests starts a trace of its own."""
    tracer = _state.tracer
    if tracer is None:
        return OFF
    from opentelemetry import context, trace
    from opentelemetry.trace import Link, SpanKind

    found: Sequence[SpanContext] = [c for t in traces if t and (c := _span_context(t))]
    parent = next((c for c in found if c.trace_flags.sampled), None)
    # An empty context, not the current one: a batch is nobody's child but
    # its requests'.
    start = (
        trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent else context.Context()
    )
    return tracer.start_as_current_span(
        "batch",
        context=start,
        kind=SpanKind.CONSUMER,
        links=[Link(c) for c in found],
        attributes=attributes,
    )
