"""What runs a model: the one interface, and every engine that implements it.

    predictor       the one engine interface (Predictor), top_k, warm_up, fidelity
    choice          which engine and precision serve a model (--engine auto picks)
    conversion      a Keras model converted for onnx or openvino in a child process; its cache key
    opening         a converted model opened and held to Keras's outputs (the fidelity check)
    keras_engine    the keras engine: loading and running Keras models
    onnx_engine     --engine onnx: the model exported to ONNX, run by ONNX Runtime
    openvino_engine --engine openvino: compiled for the CPU at fp32, bf16 or int8
    calibration     int8 calibration images (--calibration-dir) and quantization
    conversion_cache converted models on disk, checksummed (--cache-dir)
    preprocess      the models' input preprocessing steps, for every engine
    simulated       --model sim: a stand-in that only sleeps, for load tests

Imports neither the web tier nor Redis (the broker): an engine takes a batch
of pixels and gives probabilities, wherever they came from.
"""
