"""Client side: what talks to a running server over HTTP, never a server part.

    batch      `keras-server classify PATH...`: a folder of images against a
               server, with a progress bar, resumable, and a summary
    http       the batch client's HTTP: a session per thread, retries as asked
    results    the batch client's results file: JSON lines or CSV, read back to resume
    downscale  shrink a large photo before upload (also simple_request.py --downscale)

Imports neither the web tier, the broker, an engine nor the worker (an import
contract in pyproject.toml says so): `pip install keras-server[client]`
installs all it needs.
"""
