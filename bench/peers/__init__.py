"""keras-server beside two peer servers, mosec and LitServe, on the same graph.

`python -m bench.peers` (bench/peers/run.py) serves the project's own
converted graph (ResNet50, random weights, from the conversion cache) three
ways: keras-server `--role all` as `make serve` starts it, mosec
(`mosec_server.py`: a Rust HTTP front, a decode process, a batching inference
process) and LitServe (`litserve_server.py`: FastAPI/uvicorn, a LitAPI with
batching). The peers decode with plain Pillow, as their users would write
it, or with `keras_server.images.load_image` (`graph.PeerConfig.decode`), run
the same OpenVINO predictor the worker runs (`graph.py`) and answer
/predict's body; wrk with bench/multipart.lua drives all three. After each
round the harness measures the limit (`bench.limit`) each system is held to.
"""
