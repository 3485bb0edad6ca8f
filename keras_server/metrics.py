"""Prometheus metrics (prometheus-client), served at GET /metrics.

Counters and histograms live in the process that observes them: the web tier
counts requests (labelled with the model and version that answered), the
worker counts batches and the job items it records, whoever sends a job's
callback counts it (`--role all` shows both; a
`--role worker` process serves its own with `--metrics-port`). The HTTP
front's processes (and, under `--role all`, the model worker's) share them
through prometheus-client's multiprocess mode: the launcher sets
PROMETHEUS_MULTIPROC_DIR before anything imports this.
What lives in Redis (queue depth, job backlog, worker heartbeats) is read
from the web process's survey of the shards (serving/workers.py), so every
web server reports the same truth.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from keras_server.engines.predictor import Predictor

# prometheus-client's own switch (read by the library at import); we only
# follow it to pick the matching registry.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# The model and version that answered a predict or infer request ("" for a
# request no model answered: refused before its model and version were known,
# probes, metadata, jobs), as the serving core names them (serving/pipeline.py,
# `Served`). Both are bounded: the model by the deployment's registry, the
# version by the versions its workers serve (a version a client names but
# no worker serves is a 404 before it is known).
ANSWERED_BY = ["model", "version"]
REQUESTS = Counter(
    "keras_server_http_requests",
    "HTTP requests answered, by endpoint, status and the model and version that answered",
    ["endpoint", "status", *ANSWERED_BY],
)
REQUEST_SECONDS = Histogram(
    "keras_server_http_request_seconds",
    "Seconds from request to response, by endpoint and the model and version that answered",
    ["endpoint", *ANSWERED_BY],
    buckets=LATENCY_BUCKETS,
)
GRPC_REQUESTS = Counter(
    "keras_server_grpc_requests",
    "gRPC calls answered (the v2 protocol, --grpc-port), by method, status code and the "
    "model and version that answered",
    ["method", "code", *ANSWERED_BY],
)
GRPC_REQUEST_SECONDS = Histogram(
    "keras_server_grpc_request_seconds",
    "Seconds from gRPC call to answer, by method and the model and version that answered",
    ["method", *ANSWERED_BY],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "keras_server_batch_size",
    "Images per forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
INFERENCE_SECONDS = Histogram(
    "keras_server_inference_seconds", "Seconds per forward pass", buckets=LATENCY_BUCKETS
)
FAILED_BATCHES = Counter("keras_server_failed_batches", "Forward passes that raised")
HEARTBEAT_FAILURES = Counter(
    "keras_server_heartbeat_failures",
    "Worker heartbeats that failed, by reason: redis (Redis refused or was unreachable) "
    "or error (any other exception: the heartbeat is restarted)",
    ["reason"],
)
CALLBACKS = Counter(
    "keras_server_callbacks",
    "Tries of job callbacks, by outcome: delivered, retried (to be tried again), "
    "given_up (failed every try) or dropped (its job gone, or its URL no longer allowed)",
    ["outcome"],
)
SWEEP_FAILURES = Counter(
    "keras_server_sweep_failures",
    "Times moving the queue of a version left without workers onto its model's queue "
    "failed in Redis (the worker log has the error)",
)
CLAIMS_PAUSED = Counter(
    "keras_server_claims_paused",
    "Times a claim loop stopped claiming because its heartbeat had not succeeded for "
    "2/3 of --heartbeat-ttl (it resumes at the next successful beat)",
)
DECODE_CPU_SECONDS = Counter(
    "keras_server_decode_cpu_seconds",
    "CPU seconds the web tier spent decoding and resizing uploads",
)
DECODE_REFUSED = Counter(
    "keras_server_decode_refused", "Uploads answered 503 because the decode memory budget was spent"
)
QUEUED = Counter(
    "keras_server_queued_requests",
    "Requests this web tier queued, by model and shard",
    ["model", "shard"],
)
RESPONSE_CACHE_HITS = Counter(
    "keras_server_response_cache_hits",
    "Images answered from the response cache, by model",
    ["model"],
)
RESPONSE_CACHE_MISSES = Counter(
    "keras_server_response_cache_misses",
    "Images the response cache did not answer (skipped lookups included), by model",
    ["model"],
)
RESPONSE_CACHE_STORED_BYTES = Counter(
    "keras_server_response_cache_stored_bytes",
    "Bytes of answers written to the response cache, by model",
    ["model"],
)
RESPONSE_CACHE_SKIPPED = Counter(
    "keras_server_response_cache_skipped",
    "Images whose response cache lookup or write was skipped, by model, operation "
    "(lookup, store) and reason (versions, down, unreachable, refused, full, bug)",
    ["model", "operation", "reason"],
)
API_KEY_REQUESTS = Counter(
    "keras_server_api_key_requests",
    "Requests with a valid API key, by the key's name in the keys file (never the key; "
    "'-' for every key unless --metrics-key-names) and quota: none (the key has no "
    "quota), within, over (answered 429), unenforced (the quota's Redis could not be "
    "asked: let through)",
    ["key_name", "quota"],
)

JOB_ITEMS = Counter(
    "keras_server_job_items",
    "Job images recorded in their job, by model and result: succeeded, failed (the "
    "model failed on it; or, counted by the web tier, it could not be decoded)",
    ["model", "result"],
)
# Both final outcomes exported from the start: an alert on the first failure
# needs the 0 before it (a series born at 1 shows no increase).
for _outcome in ("delivered", "given_up"):
    CALLBACKS.labels(_outcome)

# Set once by the worker that loads each model (never by the web tier).
ENGINE_LABELS = ["model", "engine", "precision"]
ENGINE = Gauge(
    "keras_server_engine_info",
    "1 for the engine and precision serving each model in this process",
    ENGINE_LABELS,
    multiprocess_mode="max",
)
TOP1_AGREEMENT = Gauge(
    "keras_server_engine_top1_agreement",
    "Share of the start-up reference images whose top-1 class matches Keras fp32",
    ENGINE_LABELS,
    multiprocess_mode="max",
)
MAX_DIFFERENCE = Gauge(
    "keras_server_engine_max_probability_difference",
    "Largest |engine - Keras fp32| class probability on the start-up reference images",
    ENGINE_LABELS,
    multiprocess_mode="max",
)


def record_engine(model: str, predictor: Predictor) -> None:
    """What serves `model` here, and how closely it follows Keras."""
    labels = (model, predictor.engine, predictor.precision)
    ENGINE.labels(*labels).set(1)
    if predictor.fidelity is not None:
        TOP1_AGREEMENT.labels(*labels).set(predictor.fidelity.agreement)
        MAX_DIFFERENCE.labels(*labels).set(predictor.fidelity.max_difference)


def exposition(live_collector: Collector) -> tuple[bytes, str]:
    """The /metrics body and its content type; `live_collector` adds what is
    read at scrape time (the queue gauges, web/probes.py)."""
    if os.environ.get(MULTIPROCESS_DIR_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    live = CollectorRegistry()
    live.register(live_collector)
    return generate_latest(registry) + generate_latest(live), CONTENT_TYPE_LATEST
