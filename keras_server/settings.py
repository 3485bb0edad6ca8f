"""Every knob of the server, in one table: command line > environment > default.

The entry point calls `load_settings()` once and passes the frozen `Settings`
down; only `load_settings` reads our KERAS_SERVER_* variables and `sys.argv`.
Other modules touch `os.environ` only for other programs' switches:
prometheus-client's multiprocess directory (metrics, web.front), TensorFlow's
log level (worker.main), OpenTelemetry's OTEL_* variables (tracing, and the SDK
itself), and the environment handed to the child processes (cli).
The batch client (client/batch.py) is no server: its `--api-key` defaults to
`$KERAS_SERVER_API_KEY`, read by its own parser. No knob either:
KERAS_SERVER_PORTS, the class of ports redis_server.free_port picks from,
which parallel test processes set to keep apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from keras_server.callbacks import allowed_hosts
from keras_server.catalog import ENGINES, PRECISIONS, PREPROCESSING, check_source, check_top_k

ENV_PREFIX = "KERAS_SERVER_"
ROLES = ("all", "web", "worker")
MAX_BATCH_SIZE = 1024
MAX_PRIORITY_LEVELS = 16
# More would only split the cores into streams too small to be worth a batch each.
MAX_PARALLEL_BATCHES = 8
# Most requests waiting at one priority level on one shard (--max-queue). Each
# holds its decoded pixels in Redis (150 KB at 224x224): 100,000 of them are
# 15 GB, past what one Redis should hold, and 100 s of work even for a
# deployment answering 1,000 images a second, longer than a request usually
# waits (--result-timeout, 30 s by default) before its 504.
# A bigger backlog belongs in jobs (--max-job-backlog), not the queue.
MAX_QUEUE = 100_000

MAX_OPENVINO_STREAMS = 8
# One request's images are queued in one MULTI and held in memory at once by
# the web process (decoded: 150 KB each at 224 x 224).
MAX_IMAGES = 1024
# Most hash tags one model's queue is spread over (--queue-partitions).
MAX_QUEUE_PARTITIONS = 64
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# An occlusion grid's sides (serving/explain.py): 2 x 2 says little; 16 x 16
# is 256 images per explanation, queued in one transaction, well within the
# queue's default depth (--max-queue).
MIN_EXPLAIN_GRID, MAX_EXPLAIN_GRID = 2, 16


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("must be a number") from None


SENTINEL_SCHEME = "redis+sentinel://"
CLUSTER_SCHEME = "redis+cluster://"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", SENTINEL_SCHEME, CLUSTER_SCHEME)


def split_redis_urls(text: str) -> tuple[str, ...]:
    """The shards' URLs. Commas separate shards, except inside a
    redis+sentinel:// or redis+cluster:// URL, whose addresses are
    comma-separated too: a new shard starts only where a scheme follows the comma."""
    return tuple(u.strip() for u in re.split(r",(?=\s*[a-z+]+://)", text))


def _callback_hosts(text: str) -> str:
    allowed_hosts(text)  # ValueError names a bad entry
    return text


def _public_url(text: str) -> str:
    if not text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http or https URL, e.g. https://api.example.com")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must be scheme://host[:port][/path], without query or credentials")
    return text.rstrip("/")


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """(sentinel addresses, master name, db, password) of a redis+sentinel:// URL."""
    rest = url.removeprefix(SENTINEL_SCHEME)
    password = None
    if "@" in rest:
        credentials, rest = rest.rsplit("@", 1)
        password = unquote(credentials.split(":", 1)[-1]) or None
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts or len(parts) > 2:
        raise ValueError(f"expected {SENTINEL_SCHEME}HOST:PORT[,HOST:PORT...]/MASTER[/DB]")
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"sentinel address {host!r}: expected HOST:PORT")
        sentinels.append((name.strip("[]"), int(port)))
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError(f"database {parts[1]!r}: expected a number")
    return sentinels, parts[0], int(parts[1]) if len(parts) == 2 else 0, password


def _explain_grid(text: str) -> int:
    value = int(text) if text.strip().isdigit() and len(text) < 10 else 0
    if not MIN_EXPLAIN_GRID <= value <= MAX_EXPLAIN_GRID:
        raise ValueError(f"must be a whole number from {MIN_EXPLAIN_GRID} to {MAX_EXPLAIN_GRID}")
    return value


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str | None]:
    """(seed nodes, password) of a redis+cluster://[:PASSWORD@]HOST:PORT[,HOST:PORT...]
    URL: any of the cluster's nodes, from which the client learns the rest."""
    rest = url.removeprefix(CLUSTER_SCHEME)
    password = None
    if "@" in rest:
        credentials, rest = rest.rsplit("@", 1)
        password = unquote(credentials.split(":", 1)[-1]) or None
    hosts = rest.rstrip("/")
    if not hosts or "/" in hosts:
        # A cluster has database 0 alone: no path.
        raise ValueError(f"expected {CLUSTER_SCHEME}HOST:PORT[,HOST:PORT...]")
    nodes = []
    for host in hosts.split(","):
        name, _, port = host.strip().rpartition(":")
        if not name.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"cluster node {host!r}: expected HOST:PORT")
        nodes.append((name.strip("[]"), int(port)))
    return nodes, password


def _redis_urls(text: str) -> str:
    """One Redis URL, or several (shards) separated by commas."""
    urls = split_redis_urls(text)
    for url in urls:
        if not url.startswith(REDIS_SCHEMES):
            raise ValueError(f"each URL must start with {', '.join(REDIS_SCHEMES)}")
        if url.startswith(SENTINEL_SCHEME):
            parse_sentinel_url(url)
        if url.startswith(CLUSTER_SCHEME):
            parse_cluster_url(url)
    if len(set(urls)) != len(urls):
        raise ValueError("a Redis URL is listed twice")
    return ",".join(urls)


def _redis_url(text: str) -> str:
    """One Redis URL (not shards), or empty."""
    text = text.strip()
    if text and len(split_redis_urls(text)) > 1:
        raise ValueError("one Redis URL, not several")
    return _redis_urls(text) if text else ""


def _choice(options: Sequence[str], upper: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.upper() if upper else text.lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _otlp_endpoint(text: str) -> str:
    value = text.strip()
    if value and not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL (OTLP over HTTP)")
    return value


def _cors_origins(text: str) -> str:
    """Origins as a browser sends them (scheme://host[:port], lower case), or *."""
    origins = [o.strip() for o in text.split(",") if o.strip()]
    if origins == ["*"] or not origins:
        return ",".join(origins)
    found = []
    for origin in origins:
        if origin == "*":
            raise ValueError("* allows every origin: give it alone")
        try:
            parts = urlsplit(origin)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.username is not None
            or parts.password is not None
            or parts.path
            or parts.query
            or parts.fragment
            or origin.endswith(("?", "#"))
        ):
            raise ValueError(
                f"{origin!r} is not an origin: write scheme://host[:port] (http or https, "
                "no path, no trailing slash), or * alone"
            )
        netloc = parts.netloc.lower()
        if port is not None and parts.port == {"http": 80, "https": 443}[parts.scheme]:
            netloc = netloc.rsplit(":", 1)[0]  # a browser leaves a default port out
        found.append(f"{parts.scheme}://{netloc}")
    return ",".join(dict.fromkeys(found))


def _queue_name(text: str) -> str:
    text = _non_empty(text)
    if any(c in text for c in "{}#"):
        # Keys puts the name in braces (a hash tag) and marks partitions with '#'.
        raise ValueError("must not contain '{', '}' or '#'")
    return text


def _non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


@dataclass(frozen=True)
class Number:
    """A number's parser, its bounds part of its row in the table: an int or
    a finite float, at least `low` (more than it with `above`), at most
    `high`. `says`: the bounds in words, for any value outside them, where
    the generic words would say less (a port, granian's range)."""

    whole: bool
    low: float
    high: float | None = None
    above: bool = False
    says: str = ""

    def __call__(self, text: str) -> float:
        value = _int(text) if self.whole else _float(text)
        low_ok = (self.whole or math.isfinite(value)) and (
            value > self.low if self.above else value >= self.low
        )
        high_ok = self.high is None or value <= self.high
        if self.says and not (low_ok and high_ok):
            raise ValueError(f"must be {self.says}")
        if not low_ok:
            raise ValueError(f"must be {self._at_least()}")
        if not high_ok:
            raise ValueError(f"must be at most {self.high:g}")
        return value

    def _at_least(self) -> str:
        if self.whole and self.low == 0:
            return "a whole number, 0 or more"
        if self.whole:
            return f"a whole number of at least {self.low:g}"
        if self.above:
            return f"a number greater than {self.low:g}"
        return f"a number, {self.low:g} or more"


POSITIVE_INT = Number(whole=True, low=1)
NON_NEGATIVE_INT = Number(whole=True, low=0)
POSITIVE = Number(whole=False, low=0, above=True)
NON_NEGATIVE = Number(whole=False, low=0)
PORT = Number(whole=True, low=0, high=65535, says="a TCP port between 0 and 65535")


@dataclass(frozen=True)
class Knob:
    """One row of the settings table: a field of Settings declared with `knob`."""

    field: str
    default: Any
    parse: Callable[[str], Any]  # ValueError saying what is wrong with the text
    help: str
    metavar: str

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.field.upper()


def knob(default: Any, parse: Callable[[str], Any], says: str) -> Any:
    """A field of Settings that is a knob, its row of the table (Knob): `says`
    is "METAVAR: help", as --help shows them (--port PORT  port the ...)."""
    metavar, _, help = says.partition(": ")
    if not help or " " in metavar:
        raise ValueError(f"a knob says 'METAVAR: help', not {says!r}")
    return dataclasses.field(
        default=default, metadata={"parse": parse, "help": help, "metavar": metavar}
    )


@dataclass(frozen=True)
class Settings:
    """Every knob, its default, parser and help: the settings table (KNOBS)."""

    host: str = knob(
        "127.0.0.1",
        _non_empty,
        "ADDR: address the HTTP server binds (and a --role worker's --metrics-port)",
    )
    port: int = knob(5000, PORT, "PORT: port the HTTP server listens on")
    # The --redis-url text: one URL, or several separated by commas (shards);
    # `redis_urls` is the list. The field keeps the knob's name, which the
    # flag and the environment variable are derived from.
    redis_url: str = knob(
        "redis://localhost:6379/0",
        _redis_urls,
        "URL[,URL...]: Redis holding the queue (redis://, rediss:// for TLS, unix://, or "
        "redis+sentinel://HOST:PORT,HOST:PORT/MASTER through Sentinel, or "
        "redis+cluster://HOST:PORT[,HOST:PORT...], seed nodes of a Redis Cluster), or several "
        "separated by commas (shards); if not given and nothing answers at the default, --role "
        "all starts a private redis-server",
    )
    # False when redis_url is the default: only then may we start a private
    # redis-server if nothing answers there (see broker/redis_server.py).
    redis_url_given: bool = False
    redis_timeout: float = knob(
        1.0,
        POSITIVE,
        "SECONDS: seconds any Redis command may take (the waits for work and answers: past the "
        "end Redis sets for them); a shard that takes longer (a hung host) is skipped like one "
        "that refuses connections",
    )
    model: str = knob(
        "resnet50",
        lambda text: check_source(text.strip()),
        "MODEL: a keras.applications model (resnet50, mobilenet_v2, efficientnet_b0, ...), a "
        ".keras file, or sim: a simulated model that only sleeps, for load tests",
    )
    weights: str = knob(
        "imagenet",
        _non_empty,
        "WEIGHTS: for a built-in --model: 'imagenet' (Keras downloads it once into "
        "~/.keras/models/), 'none' (new random weights at every start: demos and tests only, "
        "converted again at every start), or the path of an .h5 weights file or a .keras file",
    )
    labels: str = knob(
        "",
        str.strip,
        "FILE: class names for a .keras --model: one per line, or JSON (default: ImageNet's)",
    )
    preprocessing: str = knob(
        "",
        _choice(("", *PREPROCESSING)),
        "MODE: caffe, tf, torch (Keras's preprocess_input modes), scale (to 0..1) or none; "
        "default: a built-in model's own, none for a .keras file",
    )
    top_k: int = knob(5, lambda text: check_top_k(_int(text)), "K: classes in each answer")
    model_version: str = knob(
        "1",
        _non_empty,
        "VERSION: the model's version, named in every answer (a rolling upgrade starts workers "
        "with a new one)",
    )
    models_file: str = knob(
        "",
        str.strip,
        "FILE: a TOML file of several models to serve side by side (replaces --model, --weights, "
        "--labels, --preprocessing, --top-k)",
    )
    models_from: str = knob(
        "workers",
        _choice(("workers", "file")),
        "workers|file: web servers route the models of --models-file (or --model) and, with "
        "workers, also every model a live worker serves, learned from Redis while serving",
    )
    model_grace: float = knob(
        60.0,
        NON_NEGATIVE,
        "SECONDS: --models-from workers: seconds a learned model's requests get 503 (no live "
        "worker) after its last worker left, before it is forgotten (404)",
    )
    serve: str = knob(
        "all",
        _non_empty,
        "NAMES: --role worker/all: the models of --models-file this process loads, "
        "comma-separated, or all",
    )
    batch_size: int = knob(
        32,
        Number(whole=True, low=1, high=MAX_BATCH_SIZE),
        f"N: most images in one forward pass (at most {MAX_BATCH_SIZE})",
    )
    parallel_batches: int = knob(
        0,
        Number(whole=True, low=0, high=MAX_PARALLEL_BATCHES),
        "N: batches a worker runs at once, each claimed by its own claim loop per Redis shard; "
        "above 1, OpenVINO is compiled for that many requests with the THROUGHPUT hint (a CPU "
        "stream each; a batch of one image still gets every core). 1: one batch at a time; "
        "0: one per core for OpenVINO on a CPU with AMX, where that served the most images/s, "
        "else 1 (the choice is logged; BENCHMARKS.md, 'Parallel batches')",
    )
    openvino_streams: int = knob(
        0,
        Number(whole=True, low=0, high=MAX_OPENVINO_STREAMS),
        "N: OpenVINO: each batch split over this many infer requests run at once, a CPU stream "
        "each with its share of the cores (THROUGHPUT hint; a batch of one image still gets "
        "every core); 1: the whole batch on one stream with every core (LATENCY hint); 0: one "
        "stream per core on a CPU with AMX while one batch runs at a time (--parallel-batches "
        "1), else 1 (the choice is logged)",
    )
    engine: str = knob(
        "auto",
        _choice(ENGINES),
        "ENGINE: what runs the forward pass: auto (OpenVINO fp32 on a CPU; keras on a GPU or when "
        "OpenVINO cannot serve the model), keras, onnx (ONNX Runtime) or openvino; converted "
        "engines are checked against Keras at start-up",
    )
    precision: str = knob(
        "fp32",
        _choice(PRECISIONS),
        "PRECISION: fp32, or with OpenVINO bf16 (CPUs with AVX512_BF16/AMX) or int8 (needs "
        "--calibration-dir); a lossy precision is never picked automatically",
    )
    cache_dir: str = knob(
        "~/.cache/keras-server",
        _non_empty,
        "DIR: where converted models are kept between starts, keyed by model, weights, precision "
        "and versions ('none': convert at every start)",
    )
    calibration_dir: str = knob(
        "",
        str.strip,
        "DIR: images like the traffic, decoded like uploads: int8 calibrates on them, and every "
        "fifth is held out to measure bf16/int8 fidelity against Keras",
    )
    min_agreement: float = knob(
        0.95,
        Number(whole=False, low=0, high=1, says="a number from 0 to 1"),
        "SHARE: bf16/int8: refuse to start when the top-1 class agrees with Keras fp32 on less "
        "than this share of the held-out images",
    )
    max_batch_delay_ms: float = knob(
        0.0,
        NON_NEGATIVE,
        "MS: after the first request of a batch, wait up to this long for more (0: take what is "
        "queued)",
    )
    queue_name: str = knob(
        "image_queue",
        _queue_name,
        "NAME: Redis list the requests go through; every key name starts with it, in braces (a "
        "Redis Cluster hash tag)",
    )
    queue_partitions: int = knob(
        1,
        Number(whole=True, low=1, high=MAX_QUEUE_PARTITIONS),
        "N: hash tags each model's queue is spread over, on every Redis (its own keys each: "
        "web processes push to one, workers claim from all); on a Redis Cluster, one per "
        f"master spreads a busy model over them all (at most {MAX_QUEUE_PARTITIONS})",
    )
    max_queue: int = knob(
        512,
        Number(whole=True, low=1, high=MAX_QUEUE),
        "N: most requests waiting in a shard's queue at each priority level; beyond it a "
        f"request is refused at once with 503 and Retry-After (at most {MAX_QUEUE})",
    )
    priority_levels: int = knob(
        2,
        Number(whole=True, low=1, high=MAX_PRIORITY_LEVELS),
        "N: priority levels a request may ask for (X-Priority, v2 parameters.priority), "
        f"1 the highest; a request that names none is level 1 (at most {MAX_PRIORITY_LEVELS})",
    )
    low_priority_batch_size: int = knob(
        1,
        NON_NEGATIVE_INT,
        "N: while requests above the lowest priority level come (a batch held one in the last "
        "second; the highest such level is the protected one), most requests from below the "
        "protected level in one forward pass (0: --batch-size): a protected request that comes "
        "while a batch runs waits for it, so a smaller batch bounds that wait, at a cost in the "
        "lower levels' throughput; without traffic above the lowest level batches are whole",
    )
    priority_hold_ms: float = knob(
        30.0,
        NON_NEGATIVE,
        "MS: after a batch that held a request at the protected level (see "
        "--low-priority-batch-size), wait up to this long for the next request at that level "
        "before taking lower levels' work (0: never wait): a client sending one request after "
        "another then finds the model free, at the cost of that idle time when none comes",
    )
    result_timeout: float = knob(
        30.0,
        POSITIVE,
        "SECONDS: seconds a request waits for its prediction before a 504; the most a request's "
        "own timeout (X-Request-Timeout, v2 parameters.timeout) may ask",
    )
    max_upload_mb: float = knob(16.0, POSITIVE, "MB: largest accepted request body")
    max_image_pixels: int = knob(
        50_000_000, POSITIVE_INT, "PIXELS: largest accepted image (width x height) before a 413"
    )
    max_images: int = knob(
        64,
        Number(whole=True, low=1, high=MAX_IMAGES),
        "N: most images in one request (repeated image fields on /predict, a v2 infer's "
        f"batch; at most {MAX_IMAGES}); beyond it a 413",
    )
    explain_grid: int = knob(
        8,
        _explain_grid,
        "N: /explain's occlusion grid: the image is shown to the model again with each of "
        "N x N cells masked, one at a time, at the lowest priority level (a request's "
        f"grid= may ask another, {MIN_EXPLAIN_GRID} to {MAX_EXPLAIN_GRID})",
    )
    decode_memory_mb: float = knob(
        512.0,
        POSITIVE,
        "MB: memory each web process may hold for images being decoded, estimated from their "
        "headers; an upload that does not fit beside those in flight gets a 503 with Retry-After, "
        "one that could never fit a 413",
    )
    role: str = knob(
        "all",
        _choice(ROLES),
        "ROLE: all: the HTTP front and a model worker, as child processes of one command; web or "
        "worker alone",
    )
    web_workers: int = knob(
        2,
        POSITIVE_INT,
        "N: --role web and all: HTTP server (granian) processes; --role all runs the model in a "
        "process of its own beside them",
    )
    web_threads: int = knob(
        32,
        POSITIVE_INT,
        "N: threads per web process, i.e. requests each can hold while they wait for their "
        "prediction (connections waiting for their headers hold none)",
    )
    header_timeout: float = knob(
        10.0,
        Number(whole=False, low=0.001, high=60, says="from 0.001 to 60 seconds (granian's range)"),
        "SECONDS: seconds a client may take to send its request line and headers before the "
        "connection is closed (a slow client holds no thread meanwhile)",
    )
    heartbeat_ttl: float = knob(
        10.0,
        POSITIVE,
        "SECONDS: seconds without a heartbeat after which a claim loop (a worker's, on one shard) "
        "counts as dead and its claimed requests go back on the queue",
    )
    metrics_port: int = knob(
        0, PORT, "PORT: --role worker: serve Prometheus /metrics on this port (0: off)"
    )
    grpc_port: int = knob(
        0,
        PORT,
        "PORT: --role web and all: also speak the v2 inference protocol over gRPC on this port "
        "(0: off), from a process of its own beside the HTTP front",
    )
    grpc_max_calls: int = knob(
        0,
        NON_NEGATIVE_INT,
        "N: most gRPC calls held at once, running or waiting for one of the --web-threads threads "
        "(each may hold a message of --max-upload-mb); past it a call is answered "
        "RESOURCE_EXHAUSTED at once (0: twice --web-threads)",
    )
    sim_batch_ms: float = knob(50.0, NON_NEGATIVE, "MS: --model sim: sleep per batch")
    sim_image_ms: float = knob(5.0, NON_NEGATIVE, "MS: --model sim: sleep per image")
    log_level: str = knob("INFO", _choice(LOG_LEVELS, upper=True), "LEVEL: logging level")
    api_keys: str = knob(
        "",
        str.strip,
        "FILE: a file of API keys, one per line: every request but /healthz, the upload page (/ "
        "and /assets/), /openapi.json and the probes (see --auth-probes) must then show one "
        "(Authorization: Bearer KEY or X-API-Key: KEY); after a key, optional name=NAME "
        "rate=N/UNIT burst=N give it a name and a quota shared through Redis (over it: 429)",
    )
    admin_keys: str = knob(
        "",
        str.strip,
        "FILE: a file of admin keys, NAME KEY per line, separate from --api-keys: turns on the "
        "admin API under /admin/ (models, versions, traffic policy; 404 without it), which takes "
        "these keys alone (Authorization: Bearer KEY or X-Admin-Key: KEY)",
    )
    auth_probes: bool = knob(
        False,
        _bool,
        "BOOL: with --api-keys: the probes /readyz, /metrics, /v2/health/live and "
        "/v2/health/ready need a key too (true or false)",
    )
    metrics_key_names: bool = knob(
        False,
        _bool,
        "BOOL: with --api-keys: /metrics counts requests by API key name (the keys file's name=, "
        "never the key); off, every key's are counted under one name, '-', so a scrape does not "
        "list the server's clients (true or false)",
    )
    response_cache_ttl: float = knob(
        0.0,
        NON_NEGATIVE,
        "SECONDS: seconds an answer stays in the shared response cache, so the same upload to the "
        "same model version is answered from Redis without queueing it (0: off; a model of "
        "--models-file may set its own response_cache_ttl)",
    )
    response_cache_url: str = knob(
        "",
        _redis_url,
        "URL: the Redis holding the response cache (default: the first --redis-url, the queue's); "
        "in production a Redis of its own with maxmemory and maxmemory-policy allkeys-lru",
    )
    otlp_endpoint: str = knob(
        "",
        _otlp_endpoint,
        "URL: send OpenTelemetry traces over OTLP/HTTP to this collector, e.g. "
        "http://localhost:4318 (/v1/traces is appended, as to OTEL_EXPORTER_OTLP_ENDPOINT); "
        "empty: traces only when the standard OTEL_* variables ask for them (needs the otel "
        "extra; docs/operations.md#tracing)",
    )
    max_job_images: int = knob(
        1000,
        POSITIVE_INT,
        "N: most images in one job (POST /jobs: image fields and an archive's files); beyond it a "
        "413",
    )
    max_job_upload_mb: float = knob(
        256.0,
        POSITIVE,
        "MB: largest POST /jobs body, streamed to temporary files, never held whole "
        "(--max-upload-mb is every other route's, and each image's in a job)",
    )
    max_archive_mb: float = knob(
        1024.0,
        POSITIVE,
        "MB: most bytes a job's archive may inflate, hidden files and tar headers included: a "
        "zip's declared sizes are checked first, and reading stops as soon as it is over; beyond "
        "it a 413",
    )
    max_job_backlog: int = knob(
        4000,
        POSITIVE_INT,
        "N: most job images waiting in a shard's Redis, not yet on the queue (each is its decoded "
        "pixels, 150 KB at 224x224); a job that would pass it gets a 503 with Retry-After",
    )
    job_ttl: float = knob(
        86400.0,
        POSITIVE,
        "SECONDS: seconds a job's record and results are kept (from its end; an unfinished job's "
        "from its start)",
    )
    callback_hosts: str = knob(
        "",
        _callback_hosts,
        "HOSTS: where a job's callback_url may point: comma-separated HOST, HOST:PORT or "
        "HOST:PORT/PATH entries (no port: 443 for https, 80 for http; a path: that prefix, on a "
        "segment boundary); empty: no callbacks",
    )
    callback_secret: str = knob(
        "",
        str.strip,
        "SECRET: the HMAC-SHA256 key that signs job callbacks, with their timestamp "
        "(X-Signature-256, X-Keras-Server-Timestamp); callbacks need it (prefer the environment "
        "variable to the flag: ps shows flags)",
    )
    public_url: str = knob(
        "",
        _public_url,
        "URL: the server's address as clients reach it, e.g. https://api.example.com (a path "
        "prefix too, if a proxy adds one): a job callback's status_url starts with it; empty: "
        "status_url is a path",
    )
    cors_origins: str = knob(
        "",
        _cors_origins,
        "ORIGIN[,ORIGIN...]: web pages of these origins (scheme://host[:port], comma-separated, "
        "or * for any) may call the API from a browser (CORS): preflights are answered and every "
        "answer, errors included, carries the CORS headers; credentials are never allowed (keys "
        "travel in headers). Empty: off",
    )

    @property
    def redis_urls(self) -> tuple[str, ...]:
        """Each Redis of --redis-url: one per shard."""
        return split_redis_urls(self.redis_url)

    @property
    def lower_batch_limit(self) -> int:
        """Most requests from below the worker's protected level in one batch."""
        return min(self.low_priority_batch_size or self.batch_size, self.batch_size)

    @property
    def max_job_upload_bytes(self) -> int:
        return int(self.max_job_upload_mb * 1024 * 1024)

    @property
    def max_archive_bytes(self) -> int:
        return int(self.max_archive_mb * 1024 * 1024)

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        """Each origin of --cors-origins ("*" alone for any); empty when off."""
        return tuple(o for o in self.cors_origins.split(",") if o)

    @property
    def decode_memory_bytes(self) -> int:
        return int(self.decode_memory_mb * 1024 * 1024)

    @property
    def grpc_call_limit(self) -> int:
        """Most gRPC calls held at once (--grpc-max-calls; 0: twice
        --web-threads, a call for each thread and as many waiting for one)."""
        return self.grpc_max_calls or 2 * self.web_threads

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


KNOBS: tuple[Knob, ...] = tuple(
    Knob(f.name, f.default, **f.metadata) for f in dataclasses.fields(Settings) if f.metadata
)


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names it."""


def to_environment(settings: Settings) -> dict[str, str]:
    """The settings as KERAS_SERVER_* variables, for a child process to load back."""
    return {row.env: str(getattr(settings, row.field)) for row in KNOBS}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line; `prog` names the program in usage lines and errors
    (None: argparse's default, the name of the script run, sys.argv[0])."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a Keras image classifier over HTTP, batching through Redis.",
        epilog="Every option can also be set as an environment variable, e.g. "
        f"{ENV_PREFIX}BATCH_SIZE=16. The command line wins over the environment.",
    )
    for row in KNOBS:
        parser.add_argument(
            row.flag,
            dest=row.field,
            metavar=row.metavar,
            default=None,
            help=f"{row.help} (env {row.env}; default: {_default_word(row.default)})",
        )
    return parser


def load_settings(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    prog: str | None = None,
) -> Settings:
    """Build Settings from the command line, then the environment, then defaults.

    Raises SettingsError naming the flag or variable when a value is bad;
    argparse itself exits on unknown flags, its message naming `prog`.
    """
    environ = os.environ if environ is None else environ
    args = vars(build_parser(prog).parse_args(argv))
    values: dict[str, Any] = {}
    for row in KNOBS:
        if args[row.field] is not None:
            raw, source = args[row.field], row.flag
        elif row.env in environ:
            raw, source = environ[row.env], row.env
        else:
            continue
        try:
            values[row.field] = row.parse(raw)
        except ValueError as exc:
            raise SettingsError(f"{source}={raw!r}: {exc}") from None
    values["redis_url_given"] = "redis_url" in values
    settings = Settings(**values)
    if settings.grpc_port and settings.grpc_port == settings.port:
        raise SettingsError(f"--grpc-port={settings.grpc_port}: the HTTP server has that port")
    return settings


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default_word(value: Any) -> str:
    """A default as --help and docs/settings.md show it. "unset", not "none":
    `none` is a value some settings take (--weights, --preprocessing), with a
    meaning of its own."""
    return "unset" if value == "" else str(value)


def markdown() -> str:
    """docs/settings.md, generated from the table above so that the page and the
    code cannot disagree (tests/test_docs.py compares the checked-in page)."""
    rows = [
        f"| `{row.flag}` | `{row.env}` | "
        f"{'unset' if row.default == '' else f'`{row.default}`'} | {_cell(row.help)} |"
        for row in KNOBS
    ]
    return "\n".join(
        [
            "# Settings",
            "",
            "<!-- Generated by `python -m keras_server.settings --markdown > docs/settings.md`",
            "     from the table in keras_server/settings.py: edit the help text there. -->",
            "",
            "Each knob is a flag and an environment variable; the flag wins, then the",
            "variable, then the default (`python run_keras_server.py --help` prints the",
            "same table). A bad value exits at once with status 2, naming the flag or",
            "variable and the reason, e.g.",
            "`run_keras_server.py: error: --batch-size='0': must be a whole number of at least 1`.",
            "",
            "| flag | environment | default | meaning |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )


if __name__ == "__main__":
    import sys

    command = argparse.ArgumentParser(
        prog="python -m keras_server.settings", description="Print the settings table."
    )
    command.add_argument("--markdown", action="store_true", help="as docs/settings.md")
    if not command.parse_args().markdown:
        command.error("say --markdown (the only output there is)")
    sys.stdout.write(markdown())
