"""The command line (`keras-server`, `python -m keras_server`, or
`python run_keras_server.py`): build the settings once, then run a role.

- all:    a private Redis if needed, then the model worker and the HTTP front
          (and with --grpc-port the gRPC front) as child processes of this one
          (the single-machine setup, one command, one log)
- web:    the HTTP front alone: granian serving the Flask app (web/front.py;
          never imports TensorFlow); with --grpc-port, the HTTP front and the
          gRPC front (rpc/server.py) as child processes of this one
- worker: the model loop alone (worker/main.py)

`keras-server classify PATH... --url URL` is the batch client instead
(client/batch.py): it talks HTTP to a running server and loads none of the above.

`keras-server convert [FLAGS]` fills the conversion cache (--cache-dir) with
every model a worker of the same flags would serve, and exits: a step of its
own, run with the memory the conversion needs (Kubernetes' init container,
deploy/kubernetes/worker.yaml), so that the worker then starts from the cache.

SIGTERM is graceful everywhere: the front lets in-flight requests finish, and a
worker finishes and answers the batch it holds before it deregisters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Sequence

from keras_server import tracing
from keras_server.broker import messages
from keras_server.broker.redis_server import RedisUnavailable, ensure_redis
from keras_server.catalog import SIM, CatalogError, Models, model_specs
from keras_server.engines.predictor import ModelLoadError
from keras_server.logs import configure_logging
from keras_server.metrics import MULTIPROCESS_DIR_ENV
from keras_server.processes import Child, stop_on_signals
from keras_server.serving.keys import KeysFileError, load_keys
from keras_server.serving.models import Deployment
from keras_server.settings import Settings, SettingsError, load_settings, to_environment
from keras_server.web.admin import load_admin_keys
from keras_server.worker.main import loader
from keras_server.worker.main import run as run_worker

log = logging.getLogger("keras_server")

STOPPING = "stopping once the requests in flight are answered"


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); `prog` names the
    program in errors, as argparse does (default: the script run)."""
    # One name for argparse's errors and ours, whichever way we were started.
    prog = prog or os.path.basename(sys.argv[0])
    command = list(sys.argv[1:] if argv is None else argv)
    if command[:1] == ["classify"]:  # the batch client, not a server role
        return run_batch_client(command[1:], f"{prog} classify")
    if command[:1] == ["convert"]:  # the cache filled, then exit: not a server role
        return convert(command[1:], f"{prog} convert")
    try:
        settings = load_settings(argv, prog=prog)
        models = read_models(settings)  # read once; a bad models file or spec stops us here
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


def read_models(settings: Settings) -> Models:
    """The models `settings` name (catalog.model_specs), each name checked
    against the key layout, which decides which names are free."""
    models = model_specs(settings)
    for spec in models.specs:
        try:
            messages.Keys.for_model(settings.queue_name, spec.name, models.default)
        except ValueError as exc:
            raise CatalogError(f"models file {settings.models_file}: {exc}") from None
    return models


def run_batch_client(argv: Sequence[str], prog: str) -> int:
    """The batch client, whose requests and rich come with the `client` extra."""
    try:
        from keras_server.client import batch as batch_client
    except ImportError as exc:
        print(f"{prog}: error: {exc.name} is missing: pip install '.[client]' in the "
              "keras-server checkout", file=sys.stderr)  # fmt: skip
        return 2
    return batch_client.main(argv, prog)


def convert(argv: Sequence[str], prog: str) -> int:
    """Convert every model a worker of these flags serves (`--serve`) into
    the conversion cache, or find it there; 0 when each is served by a
    converted engine from the cache, 1 when one is not (the log says why)."""
    try:
        settings = load_settings(argv, prog=prog)
        models = model_specs(settings)
    except (SettingsError, CatalogError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.cache_dir.lower() == "none":
        log.error("--cache-dir none: there is no cache to fill")
        return 1
    failed = []
    for spec in models.serving(settings.serve):
        if spec.source == SIM or spec.engine == "keras":
            log.info("model %r: nothing to convert (%s)", spec.name, spec.engine or "sim")
            continue
        if spec.builtin is not None and spec.weights.lower() == "none":
            # New random weights at every start: what this run converts is never found again.
            log.error("model %r: --weights none cannot be cached", spec.name)
            failed.append(spec.name)
            continue
        try:
            predictor = loader(settings, spec)()
        except ModelLoadError as exc:
            log.error("%s", exc)
            failed.append(spec.name)
            continue
        if predictor.engine == "keras":  # --engine auto fell back: nothing was cached
            log.error("model %r: not converted (the warning above says why)", spec.name)
            failed.append(spec.name)
    if failed:
        return 1
    log.info("conversion cache %s ready", settings.cache_dir)
    return 0


def run_all(settings: Settings, models: Models) -> int:
    """--role all (see the module's docstring): each part a child process of
    this one, so the model never shares a GIL with the HTTP threads, writing
    to our stdout and stderr. The children are in sessions of their own, so a Ctrl-C in the terminal
    reaches only us, and tied to us (they get SIGTERM if we die). SIGTERM or
    Ctrl-C stops them in order: the fronts first, which let the requests in
    flight finish while the worker still answers them, then the worker, which
    answers the batch it holds, then Redis. Returns the exit status: 1 when a
    child failed (its own log line says why)."""
    stop = stop_on_signals(STOPPING)
    with contextlib.ExitStack() as cleanup:
        settings, private_redis = ensure_redis(settings)
        if private_redis:
            cleanup.callback(private_redis.close)
        # One prometheus-client multiprocess directory for every child, so the
        # front's /metrics shows the worker's batches beside its requests.
        env = child_environment(settings, metrics_directory(cleanup))
        worker = child("model worker", WORKER_COMMAND, {**env, "KERAS_SERVER_ROLE": "worker"})
        cleanup.callback(worker.stop, settings.result_timeout + 30)
        deployment = Deployment.from_settings(settings, models)
        served = [deployment.models[spec.name] for spec in models.serving(settings.serve)]
        while not all(model.live_workers() for model in served):
            if not worker.alive():
                return 1  # it logged why (a model that cannot load, ...)
            if stop.wait(0.1):
                return 0
        return watch([worker, *start_fronts(settings, env, cleanup)], stop)
    return 0


def run_web(settings: Settings) -> int:
    """--role web with --grpc-port: the HTTP front and the gRPC front, child
    processes of this one, stopped together (SIGTERM or Ctrl-C: each lets
    its requests in flight finish). 1 when either exits by itself."""
    stop = stop_on_signals(STOPPING)
    with contextlib.ExitStack() as cleanup:
        env = child_environment(settings, metrics_directory(cleanup))
        return watch(start_fronts(settings, env, cleanup), stop)
    return 0


def start_fronts(
    settings: Settings, env: dict[str, str], cleanup: contextlib.ExitStack
) -> list[Child]:
    """The HTTP front, and the gRPC front with --grpc-port, stopped together
    by `cleanup` (both get SIGTERM at once, and each its own time to finish)."""
    log.info("starting the HTTP front (granian) on %s:%d", settings.host, settings.port)
    fronts = [child("HTTP front", FRONT_COMMAND, env)]
    if settings.grpc_port:
        log.info("starting the gRPC front on %s:%d", settings.host, settings.grpc_port)
        fronts.append(child("gRPC front", GRPC_COMMAND, env))

    def stop_fronts() -> None:
        for front in fronts:
            front.terminate()
        for front in fronts:
            front.stop(settings.result_timeout + 10)

    cleanup.callback(stop_fronts)
    return fronts


def metrics_directory(cleanup: contextlib.ExitStack) -> str:
    directory = tempfile.mkdtemp(prefix="keras-server-metrics-")
    cleanup.callback(shutil.rmtree, directory, ignore_errors=True)
    return directory


def watch(children: list[Child], stop: threading.Event) -> int:
    """Until `stop` is set (0) or a child exits by itself (1, logged)."""
    while not stop.wait(0.2):
        for running in children:
            if not running.alive():
                log.error("the %s exited (status %s): stopping", running.name, running.returncode)
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
# request, bounded by what requests held at once (the decode budget). The one
# malloc policy of the server: no process changes it with mallopt.
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


def child(name: str, command: Sequence[str], env: dict[str, str]) -> Child:
    """`command` run by this Python as a child process, started: writing to
    our stdout and stderr (one log), in a session of its own (Ctrl-C is ours
    to pass on, in order), tied to us (SIGTERM if we die)."""
    return Child(
        name, [sys.executable, *command], env=env, new_session=True, tied=True, shared_output=True
    ).start()


def exec_front(settings: Settings) -> None:
    """Replace this process with the HTTP front (web/front.py: granian
    serving the web tier), configured like --role all's children."""
    env = child_environment(settings, tempfile.mkdtemp(prefix="keras-server-metrics-"))
    log.info("starting the HTTP front (granian) on %s:%d", settings.host, settings.port)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *FRONT_COMMAND], env)
