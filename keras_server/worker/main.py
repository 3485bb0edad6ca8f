"""The model-worker process, assembled: each model it serves loaded by its
engine and warmed up, its claim loops built (one per Redis shard and
`--parallel-batches`), then run until SIGTERM.

`keras-server --role worker` runs `run`; `--role all` starts that role as a
child process (cli.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from keras_server import cpuinfo, metrics, tracing
from keras_server.broker import messages
from keras_server.broker.request_queue import RequestQueue
from keras_server.broker.shards import label
from keras_server.catalog import SIM, Models, ModelSpec, model_specs
from keras_server.engines.predictor import Predictor, parallel_batches_for, timed_warm_up
from keras_server.processes import stop_on_signals
from keras_server.settings import Settings
from keras_server.worker.callbacks import CallbackSender
from keras_server.worker.loop import FairLock, Worker, serve

log = logging.getLogger(__name__)


def loader(settings: Settings, spec: ModelSpec) -> Callable[[], Predictor]:
    """How to build a model: the engines are imported only for a real model, so
    the web role and `--model sim` never load TensorFlow (nor does a model
    served from the conversion cache)."""
    if spec.source == SIM:
        from keras_server.engines.simulated import SimulatedModel

        return lambda: SimulatedModel(settings.sim_batch_ms, settings.sim_image_ms, spec.top_k)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_server.engines.choice import EngineOptions, load_predictor

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
    callbacks: CallbackSender | None = None,
) -> list[Worker]:
    """The claim loops of one model (default: the default model): for each
    Redis shard, and each queue partition there, `--parallel-batches` of
    them (its 0: what `parallel_batches_for` picks for the engine, the
    number the engine was compiled for), all sharing the model, taking turns
    (that many at once). `models`:
    the entry point's, else read from `settings`; `callbacks`: the process's
    sender of job callbacks (default: one of their own)."""
    specs = models or model_specs(settings)
    name = model or specs.default
    spec = specs.find(name)
    version = spec.version if spec else ""
    keys = messages.Keys.for_model(settings.queue_name, name, specs.default)
    parts = keys.partitions(settings.queue_partitions)
    # Several queues (shards, partitions): their claim loops take turns
    # with the model, so each queue is served in turn.
    batches = parallel_batches_for(settings.parallel_batches, predictor.engine)
    if not settings.parallel_batches:
        log.info(
            "%d batch(es) at once (--parallel-batches 0: the %s engine on %d cores; one per "
            "core for openvino on a CPU with AMX, else 1)",
            batches, predictor.engine, cpuinfo.cores(),
        )  # fmt: skip
    loops = len(settings.redis_urls) * len(parts)
    turn = FairLock(batches) if loops > 1 else None
    callbacks = callbacks or callback_sender(settings)
    workers = []
    for url, part in [(u, p) for u in settings.redis_urls for p in parts]:
        # The process's one Shard for `url`: the web tier of --role all and
        # every model's worker share its connections and its health.
        # Its version's own queue first, then the model's (RequestQueue).
        queue = RequestQueue.open(
            url,
            part,
            timeout=settings.redis_timeout,
            levels=settings.priority_levels,
            version=version,
            registry=messages.Keys(settings.queue_name).models,
        )
        for _ in range(batches):
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
            log.info("worker %s: model %r, queue %r at %s", worker.id, name, part.queue, label(url))
            workers.append(worker)
    return workers


def callback_sender(settings: Settings) -> CallbackSender:
    """The job callbacks' sender: one per worker process, its pool shared by
    every claim loop."""
    return CallbackSender(
        settings.callback_hosts, settings.callback_secret, public_url=settings.public_url
    )


def build_workers(
    settings: Settings, models: Models, callbacks: CallbackSender | None = None
) -> list[Worker]:
    """Load and warm up every model this process serves (`--serve`); their
    claim loops, sharing `callbacks` (default: a sender of their own)."""
    callbacks = callbacks or callback_sender(settings)
    workers = []
    for spec in models.serving(settings.serve):
        predictor = loader(settings, spec)()
        timed_warm_up(predictor, settings.batch_size)
        metrics.record_engine(spec.name, predictor)
        workers += make_workers(settings, predictor, spec.name, models, callbacks)
    return workers


def run(settings: Settings, models: Models) -> None:
    """The worker role: load and warm up its models, then claim batches until
    SIGTERM (or Ctrl-C), which lets the batch in hand finish and be answered."""
    callbacks = callback_sender(settings)
    workers = build_workers(settings, models, callbacks)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.host)
        log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    stop = stop_on_signals("finishing the current batch, then stopping")  # Ctrl-C too
    tracing.configure(settings, "worker")
    try:
        serve(workers, stop)
    finally:
        callbacks.close()  # the tries under way end; the pending stay in Redis
        tracing.shutdown()  # the last batches' spans go out before we exit
