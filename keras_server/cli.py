"""The command line (`keras-server`, `python -m keras_server`, or
`python run_keras_server.py`): build the settings once, then run a role.

- all:    a private Redis if needed, then the model worker and the HTTP front
          (and with --grpc-port the gRPC front) as child processes of this one
          (the single-machine setup, one command, one log)
- web:    the HTTP front alone: granian serving the Flask app (web/front.py;
          never imports TensorFlow); with --grpc-port, the HTTP front and the
          gRPC front (rpc/server.py) as child processes of this one
- worker: the model loop alone

`keras-server classify PATH... --url URL` is the batch client instead
(classify.py): it talks HTTP to a running server and loads none of the above.

SIGTERM is graceful everywhere: the front lets in-flight requests finish, and a
worker finishes and answers the batch it holds before it deregisters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from keras_server import metrics, tracing
from keras_server.broker import messages
from keras_server.broker.redis_server import RedisUnavailable, ensure_redis
from keras_server.broker.request_queue import RequestQueue
from keras_server.broker.shards import label
from keras_server.callbacks import CallbackSender
from keras_server.catalog import SIM, CatalogError, Models, ModelSpec
from keras_server.engines.predictor import ModelLoadError, Predictor, timed_warm_up
from keras_server.logs import configure_logging
from keras_server.metrics import MULTIPROCESS_DIR_ENV
from keras_server.processes import die_with_parent
from keras_server.settings import Settings, SettingsError, load_settings, to_environment
from keras_server.web.admin import load_admin_keys
from keras_server.web.auth import KeysFileError, load_keys
from keras_server.web.deployment import Deployment
from keras_server.worker.loop import FairLock, Worker, serve

log = logging.getLogger("keras_server")


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); `prog` names the
    program in errors, as argparse does (default: the script run)."""
    # One name for argparse's errors and ours, whichever way we were started.
    prog = prog or os.path.basename(sys.argv[0])
    command = list(sys.argv[1:] if argv is None else argv)
    if command[:1] == ["classify"]:  # the batch client, not a server role
        return classify(command[1:], f"{prog} classify")
    try:
        settings = load_settings(argv, prog=prog)
        models = settings.model_specs()  # read once; a bad models file or spec stops us here
        tracing.check(settings)  # asked for traces without the otel extra: say so now
    except (SettingsError, CatalogError, tracing.TracingUnavailable) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        if settings.api_keys and settings.role != "worker":
            load_keys(settings.api_keys)  # an unusable keys file stops us before the port opens
        if settings.admin_keys and settings.role != "worker":
            load_admin_keys(settings.admin_keys)
        if settings.role == "web":
            if settings.grpc_port:
                return run_web(settings)
            exec_front(settings)
        elif settings.role == "worker":
            run_worker(settings, models)
        else:
            return run_all(settings, models)
    except (RedisUnavailable, ModelLoadError, CatalogError, KeysFileError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


def classify(argv: Sequence[str], prog: str) -> int:
    """The batch client, whose requests and rich come with the `client` extra."""
    try:
        from keras_server import classify as batch_client
    except ImportError as exc:
        print(f"{prog}: error: {exc.name} is missing: pip install 'keras-server[client]'",
              file=sys.stderr)  # fmt: skip
        return 2
    return batch_client.main(argv, prog)


def loader(settings: Settings, spec: ModelSpec) -> Callable[[], Predictor]:
    """How to build a model: the engines are imported only for a real model, so
    the web role and `--model sim` never load TensorFlow (nor does a model
    served from the conversion cache)."""
    if spec.source == SIM:
        from keras_server.engines.simulated import SimulatedModel

        return lambda: SimulatedModel(settings.sim_batch_ms, settings.sim_image_ms, spec.top_k)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_server.engines.selection import EngineOptions, load_predictor

    options = EngineOptions(
        cache_dir=settings.cache_dir,
        min_agreement=settings.min_agreement,
        max_image_pixels=settings.max_image_pixels,
        parallel_batches=settings.parallel_batches,
        openvino_streams=settings.openvino_streams,
    )
    return lambda: load_predictor(spec, options)


def make_workers(
    settings: Settings,
    predictor: Predictor,
    model: str | None = None,
    models: Models | None = None,
) -> list[Worker]:
    """The claim loops of one model (default: the default model): for each
    Redis shard `--parallel-batches` of them, all sharing the model, taking
    turns (that many at once). `models`: the entry point's, else read from
    `settings`."""
    specs = models or settings.model_specs()
    name = model or specs.default
    spec = specs.find(name)
    version = spec.version if spec else ""
    keys = messages.Keys.for_model(settings.queue_name, name, specs.default)
    turn = FairLock(settings.parallel_batches) if len(settings.redis_urls) > 1 else None
    callbacks = CallbackSender(settings.callback_hosts, settings.callback_secret)
    workers = []
    for url in settings.redis_urls:
        # The process's one Shard for `url`: the web tier of --role all and
        # every model's worker share its connections and its health.
        # Its version's own queue first, then the model's (RequestQueue).
        queue = RequestQueue.open(
            url,
            keys,
            timeout=settings.redis_timeout,
            levels=settings.priority_levels,
            version=version,
            registry=messages.Keys(settings.queue_name).models,
        )
        for _ in range(settings.parallel_batches):
            worker = Worker(
                queue,
                predictor,
                settings.batch_size,
                result_ttl=settings.result_timeout,
                heartbeat_ttl=settings.heartbeat_ttl,
                batch_delay=settings.max_batch_delay_ms / 1000,
                max_lower=settings.lower_batch_limit,
                hold=settings.priority_hold_ms / 1000,
                description=predictor.description,
                name=name,
                version=version,
                turn=turn,
                job_ttl=settings.job_ttl,
                callbacks=callbacks,
            )
            log.info("worker %s: model %r, queue %r at %s", worker.id, name, keys.queue, label(url))
            workers.append(worker)
    return workers


def build_workers(settings: Settings, models: Models) -> list[Worker]:
    """Load and warm up every model this process serves (`--serve`); their claim loops."""
    workers = []
    for spec in models.serving(settings.serve):
        predictor = loader(settings, spec)()
        timed_warm_up(predictor, settings.batch_size)
        metrics.record_engine(spec.name, predictor)
        workers += make_workers(settings, predictor, spec.name, models)
    return workers


def run_worker(settings: Settings, models: Models) -> None:
    workers = build_workers(settings, models)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.host)
        log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    stop = threading.Event()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        log.info("SIGTERM: finishing the current batch, then stopping")
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)  # Ctrl-C: as clean as SIGTERM
    tracing.configure(settings, "worker")
    try:
        serve(workers, stop)
    finally:
        tracing.shutdown()  # the last batches' spans go out before we exit


def run_all(settings: Settings, models: Models) -> int:
    """The one-command setup: a private Redis when none runs, the model worker
    and the HTTP front (and the gRPC front with --grpc-port), each a child
    process of this one (the model never shares a GIL with the HTTP threads),
    with one log: the children write to our stdout and stderr.

    The children are in sessions of their own, so a Ctrl-C in the terminal
    reaches only us, and tied to us (they get SIGTERM if we die). SIGTERM or
    Ctrl-C stops them in order: the fronts first, which let the requests in
    flight finish while the worker still answers them, then the worker, which
    answers the batch it holds, then Redis. Returns the exit status: 1 when a
    child failed (its own log line says why)."""
    stop = stop_on_signals()
    with contextlib.ExitStack() as cleanup:
        settings, private_redis = ensure_redis(settings)
        if private_redis:
            cleanup.callback(private_redis.close)
        # One prometheus-client multiprocess directory for every child, so the
        # front's /metrics shows the worker's batches beside its requests.
        env = child_environment(settings, metrics_directory(cleanup))
        worker = spawn(WORKER_COMMAND, {**env, "KERAS_SERVER_ROLE": "worker"})
        cleanup.callback(finish, worker, "model worker", settings.result_timeout + 30)
        deployment = Deployment.from_settings(settings, models)
        served = [deployment.models[spec.name] for spec in models.serving(settings.serve)]
        while not all(model.live_workers() for model in served):
            if worker.poll() is not None:
                return 1  # it logged why (a model that cannot load, ...)
            if stop.wait(0.1):
                return 0
        children = [(worker, "model worker"), *start_fronts(settings, env, cleanup)]
        return watch(children, stop)
    return 0


def run_web(settings: Settings) -> int:
    """--role web with --grpc-port: the HTTP front and the gRPC front, child
    processes of this one, stopped together (SIGTERM or Ctrl-C: each lets
    its requests in flight finish). 1 when either exits by itself."""
    stop = stop_on_signals()
    with contextlib.ExitStack() as cleanup:
        env = child_environment(settings, metrics_directory(cleanup))
        return watch(start_fronts(settings, env, cleanup), stop)
    return 0


def start_fronts(
    settings: Settings, env: dict[str, str], cleanup: contextlib.ExitStack
) -> list[tuple[subprocess.Popen[bytes], str]]:
    """The HTTP front, and the gRPC front with --grpc-port, stopped together
    by `cleanup` (both get SIGTERM at once, and each its own time to finish)."""
    log.info("starting the HTTP front (granian) on %s:%d", settings.host, settings.port)
    fronts = [(spawn(FRONT_COMMAND, env), "HTTP front")]
    if settings.grpc_port:
        log.info("starting the gRPC front on %s:%d", settings.host, settings.grpc_port)
        fronts.append((spawn(GRPC_COMMAND, env), "gRPC front"))

    def stop_fronts() -> None:
        for child, _ in fronts:
            if child.poll() is None:
                child.terminate()
        for child, name in fronts:
            finish(child, name, settings.result_timeout + 10)

    cleanup.callback(stop_fronts)
    return fronts


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (logged once)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            log.info("%s: stopping once the requests in flight are answered",
                     signal.Signals(signum).name)  # fmt: skip
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def metrics_directory(cleanup: contextlib.ExitStack) -> str:
    directory = tempfile.mkdtemp(prefix="keras-server-metrics-")
    cleanup.callback(shutil.rmtree, directory, ignore_errors=True)
    return directory


def watch(children: list[tuple[subprocess.Popen[bytes], str]], stop: threading.Event) -> int:
    """Until `stop` is set (0) or a child exits by itself (1, logged)."""
    while not stop.wait(0.2):
        for child, name in children:
            if child.poll() is not None:
                log.error("the %s exited (status %s): stopping", name, child.returncode)
                return 1
    return 0


# Children of --role all: the worker role and the fronts, configured by the
# KERAS_SERVER_* variables we hand down (not by the command line).
WORKER_COMMAND = ("-c", "import sys; from keras_server.cli import main; sys.exit(main([]))")
FRONT_COMMAND = ("-m", "keras_server.web.front")
GRPC_COMMAND = ("-m", "keras_server.rpc.server")


# glibc's malloc, as each child starts (it reads these once, at start-up; a
# value the user set wins). By default it gives a buffer over 128 KB back to
# the kernel when freed, and raises that threshold only as bigger buffers
# come and go, while each thread's arena also returns its free top: every
# request's upload, decoded pixels and queue message (0.1-1 MB each) were
# faulted back in page by page, ~270 page faults per request in the web tier
# (issue 23). Fixed at the ceiling glibc's own adjustment may reach (32 MB,
# twice that for the trim), freed memory stays with the process for the next
# request, bounded by what requests held at once (the decode budget).
MALLOC_ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(64 << 20),
}


def child_environment(settings: Settings, metrics_dir: str) -> dict[str, str]:
    """Our environment plus the resolved settings, which the child loads back,
    prometheus-client's multiprocess directory, which must be set before the
    library is first imported (hence new interpreters rather than forks), and
    glibc's malloc settings, which must be set before the process starts."""
    return {
        **MALLOC_ENVIRONMENT,
        **os.environ,
        **to_environment(settings),
        MULTIPROCESS_DIR_ENV: metrics_dir,
    }


def spawn(command: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *command],
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C is ours to pass on, in order
        preexec_fn=die_with_parent,  # noqa: PLW1509 (only a prctl call runs in the child)
    )


def finish(child: subprocess.Popen[bytes], name: str, timeout: float) -> None:
    """SIGTERM `child` and wait for it to exit gracefully; SIGKILL after `timeout` s."""
    if child.poll() is None:
        child.terminate()
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        log.error("the %s did not stop within %.0f s of SIGTERM: killed", name, timeout)
        child.kill()
        child.wait()


def exec_front(settings: Settings) -> None:
    """Replace this process with the HTTP front (web/front.py: granian
    serving the web tier), configured like --role all's children."""
    env = child_environment(settings, tempfile.mkdtemp(prefix="keras-server-metrics-"))
    log.info("starting the HTTP front (granian) on %s:%d", settings.host, settings.port)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *FRONT_COMMAND], env)
