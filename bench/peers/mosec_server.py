"""mosec serving the project's graph, as its documentation builds a pipeline.

    BENCH_PEER_...=... python -m bench.peers.mosec_server --port 8000

Two stages, each its own process: `Decode` takes the request body (the
multipart upload wrk sends; mosec hands a worker the raw bytes, without
headers) and decodes it (`graph.decode`: plain Pillow, or keras-server's
`load_image`); `Infer` takes up to `batch_size` decoded images, waiting at
most `wait_ms` for them to gather, runs the OpenVINO predictor and answers
each with /predict's JSON body. The route is mosec's own, /inference. The
model and the decode come from the environment (`PeerConfig`).
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np
from mosec import Server, ValidationError, Worker
from werkzeug.formparser import MultiPartParser

from bench.peers.graph import PeerConfig, answers, decode, load
from keras_server.images import ImageError

log = logging.getLogger(__name__)


def image_field(body: bytes) -> bytes:
    """The `image` file of a multipart/form-data body. The boundary is the body's
    first line (RFC 7578), since mosec passes no Content-Type header along;
    Werkzeug's parser is the one Flask parses keras-server's uploads with."""
    first = body.split(b"\r\n", 1)[0]
    if not first.startswith(b"--") or len(first) < 3:
        raise ValidationError("expected a multipart/form-data body with an 'image' file")
    _, files = MultiPartParser().parse(io.BytesIO(body), first[2:], len(body))
    upload = files.get("image")
    if upload is None:
        raise ValidationError("no 'image' file in the upload")
    return upload.read()


class Decode(Worker):
    """Upload -> uint8 RGB array (mosec pickles it to the next stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = PeerConfig.from_env()

    def deserialize(self, data: bytes) -> bytes:
        return image_field(data)

    def forward(self, data: bytes) -> np.ndarray:
        try:
            return decode(data, self.config)
        except ImageError as exc:
            raise ValidationError(str(exc)) from None


class Infer(Worker):
    """A batch of decoded images -> one answer each."""

    def __init__(self) -> None:
        super().__init__()
        self.predictor = load(PeerConfig.from_env())

    def forward(self, data: list[np.ndarray]) -> list[dict[str, Any]]:
        return answers(self.predictor, data)

    def serialize(self, data: dict[str, Any]) -> bytes:
        # mosec's default indents its JSON; /predict's body is compact.
        return json.dumps(data).encode()


def main() -> None:
    config = PeerConfig.from_env()
    server = Server()
    server.append_worker(Decode, num=1)
    server.append_worker(
        Infer, num=1, max_batch_size=config.batch_size, max_wait_time=round(config.wait_ms)
    )
    server.run()  # mosec reads --port and its other flags from the command line


if __name__ == "__main__":
    main()
