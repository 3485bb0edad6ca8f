"""Serve a Keras image classifier as a REST API, batching through Redis.

Modules, each owning one thing:
    settings        every knob: CLI > environment > default
    protocol        Redis key names and the messages between web and worker
    queue           the Redis queue: push / wait for a result, claim a batch
    images          upload -> RGB uint8 array at the model's input size
    web             the Flask app factory (never imports TensorFlow)
    ui              the upload page at / and the OpenAPI description
    model           the Keras model (the only module importing it)
    onnx_engine     --engine onnx: the same model run by ONNX Runtime
    worker          the batch loop: claim, one forward pass, answer each
    redis_launcher  a private redis-server when none is running
    cli             the entry point behind run_keras_server.py
"""
