"""Serve Keras image classifiers as a REST API, batching through Redis.

Its kinds of process, a sub-package each, and what they share at the top:

    serving/    the serving core, transport-neutral: models, traffic, admission, cache,
                the one pipeline (decode, queue, await) and its failures
    web/        the web process: HTTP adapters over the core (never an engine)
    rpc/        the gRPC front: the v2 protocol over gRPC (--grpc-port), over the core
    broker/     Redis between them: messages and key names, the queue, shards
    engines/    what runs a model: the interface, keras, onnx, openvino, sim
    worker/     the model worker: claim a batch, one forward pass, answer each
    client/     `keras-server classify`, the batch client: HTTP only, no server part

    cli         the command line: `keras-server`, `python -m keras_server`, run_keras_server.py
    __main__    `python -m keras_server`
    settings    every knob: CLI > environment > default
    logs        logging set-up, with the request id in every line
    metrics     Prometheus metrics
    tracing     OpenTelemetry traces through the queue, off unless asked for
    catalog     model specs: built-in names, .keras files, labels, models file
    labels      the ImageNet class names, shipped
    images      image file -> RGB uint8 array at the model's input size, memory-bounded
    processes   child processes: start with a log, wait until ready, stop, log tail;
                the SIGTERM / SIGINT our processes stop on
    callbacks   a job's completion callback: signed, retried, allowed hosts only
    cpuinfo     the CPU we run on (/proc/cpuinfo): model, vendor, feature flags

Each sub-package's docstring lists its modules.
"""

from importlib.metadata import version as _version

__version__ = _version("keras-server")
