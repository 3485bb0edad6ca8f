"""Benchmarks for keras-server: `python -m bench.run` (see BENCHMARKS.md).

raw            the forward pass alone, in process, per engine
serve          start a server as a subprocess and drive it with stress_test.py
seed_server    the original blog-post design, reproduced for comparison
redis_memory   Redis memory per queued image, per wire format
report         the Markdown table, the plot and BENCHMARKS.md
threads        does TF/ONNX Runtime thread tuning pay on this machine?
front          HTTP fronts and layouts side by side: throughput, 1 client, slow clients
run            the one command that runs all of it
"""
