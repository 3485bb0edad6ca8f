"""Serve Keras image classifiers as a REST API, batching through Redis.

Modules, each owning one thing:
    settings        every knob: CLI > environment > default
    logs            logging set-up, with the request id in every line
    catalog         model specs: built-in names, .keras files, labels, models file
    labels          the ImageNet class names, shipped
    protocol        Redis key names and the messages between web and worker
    queue           the Redis queue: push / wait, crash-safe claims, heartbeats
    shards          several Redis instances: pick one per request, skip dead ones
    routing         the models a web server routes to, and their input sizes
    images          upload -> RGB uint8 array at the model's input size, memory-bounded
    web             the Flask app factory: request log, auth, blueprints, errors
    api             the JSON routes (/predict, /models, probes, /metrics) and their app state
    fanout          uploads to answers: decode within the memory budget, queue, await
    v2              the Open Inference Protocol (KServe v2, REST) under /v2
    auth            API keys (--api-keys): checked before every route
    uploads         the files of a multipart upload (python-multipart)
    client          client side: shrink a large photo before upload
    ui              the upload page at / and the OpenAPI description
    metrics         Prometheus metrics
    predictor       the one engine interface (Predictor), top_k, warm_up, fidelity
    engines         which engine and precision serve a model (--engine auto picks)
    model           the keras engine: loading and running Keras models
    onnx_engine     --engine onnx: the model exported to ONNX, run by ONNX Runtime
    openvino_engine --engine openvino: compiled for the CPU at fp32, bf16 or int8
    calibration     int8 calibration images (--calibration-dir) and quantization
    conversion_cache converted models on disk, checksummed (--cache-dir)
    preprocess      the models' input preprocessing, in numpy, for every engine
    simulated       --model sim: a stand-in that only sleeps, for load tests
    worker          the batch loop: claim, one forward pass, answer each
    redis_launcher  a private redis-server when none is running
    processes       child processes: start with a log, wait until ready, stop, log tail
    gunicorn_conf   gunicorn's settings for --role web, derived from ours
    cli             the entry point behind run_keras_server.py (cheroot for --role all)
"""
