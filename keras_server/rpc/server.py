"""The gRPC front: `python -m keras_server.rpc.server`, the process that
serves the v2 protocol over gRPC on --grpc-port.

cli.py starts it beside the HTTP front when --grpc-port is set, under
`--role all` (with the model worker) and `--role web`, handing down the
resolved settings as KERAS_SERVER_* variables and the prometheus-client
multiprocess directory the HTTP front also writes to, so `/metrics` shows its
calls too. It is one process: grpcio's server runs --web-threads threads, each
holding one call while it waits in Redis for the answer (grpcio's C core
reads and writes the connections meanwhile). It never imports an engine.

- The port is bound on --host, without SO_REUSEPORT: a port in use is an
  error at start, not a second server sharing it.
- At most --grpc-max-calls calls are held at once (grpcio's
  `maximum_concurrent_rpcs`): past it grpcio answers RESOURCE_EXHAUSTED at
  once, so the calls waiting for a thread, each up to --max-upload-mb, are
  bounded.
- Messages up to --max-upload-mb are received; a larger one is answered
  RESOURCE_EXHAUSTED by grpcio before any of it is parsed.
- With --api-keys, every call but ServerLive and ServerReady (those too with
  --auth-probes) carries a key in its metadata, as the HTTP front's headers
  do (serving/keys.py), or is UNAUTHENTICATED before it is parsed; a key
  with nothing left of its quota (serving/quotas.py) is RESOURCE_EXHAUSTED,
  with `retry-after` and `ratelimit-*` trailers; a ModelInfer is charged
  per image.
- SIGTERM or SIGINT: no new calls; those in flight have up to
  --result-timeout to finish.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from keras_server import metrics
from keras_server.logs import configure_logging
from keras_server.processes import stop_on_signals
from keras_server.rpc import grpc_predict_v2_pb2_grpc as pb_grpc
from keras_server.rpc.service import InferenceService
from keras_server.serving.cache import ResponseCache
from keras_server.serving.failures import OverQuota
from keras_server.serving.keys import ApiKeys, Rejected, key_from, load_keys
from keras_server.serving.models import Deployment
from keras_server.serving.pipeline import Decoder, Pipeline
from keras_server.serving.quotas import Caller, Limiter
from keras_server.settings import Settings, load_settings

log = logging.getLogger(__name__)

# The calls that answer the probes' questions: open without a key unless --auth-probes.
PROBES = frozenset({"ServerLive", "ServerReady"})


class KeyCheck(grpc.ServerInterceptor):
    """--api-keys for gRPC: the key from the call's metadata, or UNAUTHENTICATED."""

    def __init__(self, keys: ApiKeys, settings: Settings, limiter: Limiter) -> None:
        self.keys = keys
        self.settings = settings
        self.limiter = limiter

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = details.method.rsplit("/", 1)[-1]
        if method in PROBES and not self.settings.auth_probes:
            return continuation(details)
        # gRPC metadata keys are lower case.
        metadata = dict(details.invocation_metadata)
        try:
            key = key_from(metadata.get("authorization"), metadata.get("x-api-key"))
        except Rejected as rejected:
            what = "malformed authorization" if rejected.error else "no key"
            log.warning("refused gRPC %s: %s", method, what)
            return _refuse(method, str(rejected))
        entry = self.keys.identify(str(key))
        if entry is None:
            log.warning("refused gRPC %s: unknown key", method)
            return _refuse(method, "the API key is not valid")
        # The key's quota, shared with the HTTP front: nothing left, refused now.
        try:
            self.limiter.gate(Caller(entry.name, entry.quota))
        except OverQuota as over:
            # RateLimit-* and Retry-After, as trailers (lower case, as gRPC's metadata is).
            trailers = tuple((k.lower(), v) for k, v in over.headers.items())
            return _refuse(method, over.message, grpc.StatusCode.RESOURCE_EXHAUSTED, trailers)
        return continuation(details)


def _refuse(
    method: str,
    message: str,
    status: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED,
    trailers: tuple[tuple[str, str], ...] = (),
) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> None:
        metrics.GRPC_REQUESTS.labels(method, status.name, "", "").inc()  # refused before routing
        if trailers:
            context.set_trailing_metadata(trailers)
        context.abort(status, message)

    return grpc.unary_unary_rpc_method_handler(abort)


def address(settings: Settings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{host}:{settings.grpc_port}"


def build_server(settings: Settings, deployment: Deployment | None = None) -> grpc.Server:
    """The gRPC server for `settings`, its port bound, not yet started."""
    if deployment is None:
        deployment = Deployment.from_settings(settings)
    interceptors = []
    keys, limiter = None, None
    if settings.api_keys:
        keys = load_keys(settings.api_keys)
        limiter = Limiter.from_settings(settings)
        log.info("API keys required on gRPC (%d accepted)", len(keys))
        interceptors.append(KeyCheck(keys, settings, limiter))
    server = grpc.server(
        ThreadPoolExecutor(max_workers=settings.web_threads, thread_name_prefix="grpc"),
        interceptors=interceptors,
        maximum_concurrent_rpcs=settings.grpc_call_limit,
        options=[
            ("grpc.max_receive_message_length", settings.max_upload_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    cache = ResponseCache.from_settings(settings, deployment)
    pipeline = Pipeline(settings, deployment, Decoder(settings), cache, limiter)
    service = InferenceService(pipeline, keys)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    server.add_insecure_port(address(settings))  # RuntimeError if the port is taken
    return server


def main() -> int:
    settings = load_settings([])
    configure_logging(settings.log_level)
    try:
        server = build_server(settings)
    except RuntimeError as exc:  # grpcio's "Failed to bind": the port is taken
        log.error("gRPC cannot listen on %s: %s", address(settings), exc)
        return 1
    stop = stop_on_signals("gRPC: stopping once the calls in flight are answered")
    server.start()
    log.info(
        "gRPC (v2 inference protocol) listening on %s (%d threads, at most %d calls)",
        address(settings),
        settings.web_threads,
        settings.grpc_call_limit,
    )
    stop.wait()
    server.stop(grace=settings.result_timeout).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
