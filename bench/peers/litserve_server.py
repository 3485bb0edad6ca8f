"""LitServe serving the project's graph, as its documentation builds a LitAPI.

    BENCH_PEER_...=... python -m bench.peers.litserve_server --port 8000

One uvicorn API server (FastAPI) parses the multipart upload and queues it;
one inference worker process decodes each request (`decode_request`, with
`graph.decode`: plain Pillow, or keras-server's `load_image`), gathers up to
`batch_size` of them within `wait_ms` (LitServe's `max_batch_size` /
`batch_timeout`), runs the OpenVINO predictor and answers each with
/predict's JSON body at /predict. The model and the decode come from the
environment (`PeerConfig`).
"""

# No `from __future__ import annotations`: LitServe reads decode_request's
# annotation at run time, and only the class Request (not the string
# "Request") makes it parse the form before queueing the request.
import argparse
import logging
from typing import Any

import litserve as ls
import numpy as np
from fastapi import HTTPException, Request

from bench.peers.graph import TIMEOUT_S, PeerConfig, answers, decode, load
from keras_server.images import ImageError

log = logging.getLogger(__name__)


class Classifier(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.config = PeerConfig.from_env()
        self.predictor = load(self.config)

    def decode_request(self, request: Request) -> np.ndarray:
        # With a multipart body, LitServe hands over the parsed form.
        upload = request["image"]  # type: ignore[index]
        try:
            return decode(upload.file.read(), self.config)
        except ImageError as exc:
            raise HTTPException(status_code=exc.status, detail=str(exc)) from None

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return inputs

    def predict(self, x: list[np.ndarray]) -> list[dict[str, Any]]:
        return answers(self.predictor, x)

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    config = PeerConfig.from_env()
    api = Classifier(max_batch_size=config.batch_size, batch_timeout=config.wait_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=TIMEOUT_S)
    server.run(port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
