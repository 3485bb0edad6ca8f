"""The original design this project grew from, reproduced to benchmark against.

It is the well-known "Keras + Redis + Flask" blog-post server (PyImageSearch,
2018), kept to its behaviour:

- the web handler decodes the upload, resizes it, runs ImageNet preprocessing
  and RPUSHes `{"id", "image"}` where `image` is the base64 of the float32
  (1, 224, 224, 3) array, then polls `GET <id>` every `CLIENT_SLEEP` s and
  DELETEs the answer it finds;
- one model thread loops: LRANGE 0..BATCH_SIZE-1, decode and stack, one
  `model.predict`, SET each top-5 under the request id, LTRIM what it took,
  then sleeps `SERVER_SLEEP` s. The sleep ends every loop iteration, empty
  queue or not, as in the post.

What differs, and why: the Redis URL, port, queue name and batch size are
flags (the harness needs free ports and its own Redis); ResNet50 has random
weights (nothing can be downloaded here, and the forward pass costs the
same); the top-5 labels come from keras_server's shipped class index because
`decode_predictions` downloads its own; `base64.decodestring` is now
`decodebytes`; `predict(verbose=0)` is Keras 2's default spelled out for
Keras 3; the model is loaded before the port opens (the post loads it in the
thread while Flask already listens), so the harness knows when it is up; Flask
runs threaded, as `app.run()` does since Flask 1.0. Errors are not handled,
as in the post.

    python -m bench.seed_server --port 5001 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flask
import keras
import numpy as np
import redis
from keras.applications import imagenet_utils
from PIL import Image

from keras_server.labels import imagenet_labels

log = logging.getLogger(__name__)

IMAGE_WIDTH = 224
IMAGE_HEIGHT = 224
IMAGE_CHANS = 3
IMAGE_DTYPE = "float32"
SERVER_SLEEP = 0.25
CLIENT_SLEEP = 0.25


def base64_encode_image(a: np.ndarray) -> str:
    return base64.b64encode(a).decode("utf-8")


def base64_decode_image(a: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.decodebytes(bytes(a, encoding="utf-8")), dtype=dtype).reshape(shape)


def prepare_image(image: Image.Image, target: tuple[int, int]) -> np.ndarray:
    """The post's preprocessing, in the web handler: float32 (1, h, w, 3), caffe-style."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = image.resize(target)
    array = keras.utils.img_to_array(image)
    array = np.expand_dims(array, axis=0)
    return imagenet_utils.preprocess_input(array)


def encode_request(request_id: str, image: np.ndarray) -> str:
    """One queue entry as the post writes it (the image must be C-contiguous)."""
    return json.dumps({"id": request_id, "image": base64_encode_image(image.copy(order="C"))})


def classify_process(
    db: redis.Redis, model: keras.Model, labels: list[str], queue: str, batch_size: int
) -> None:
    while True:
        entries = db.lrange(queue, 0, batch_size - 1)
        image_ids: list[str] = []
        batch = None
        for entry in entries:
            q = json.loads(entry.decode("utf-8"))
            image = base64_decode_image(
                q["image"], IMAGE_DTYPE, (1, IMAGE_HEIGHT, IMAGE_WIDTH, IMAGE_CHANS)
            )
            batch = image if batch is None else np.vstack([batch, image])
            image_ids.append(q["id"])
        if image_ids:
            log.info("* Batch size: %s", batch.shape)
            preds = model.predict(batch, verbose=0)
            for image_id, probabilities in zip(image_ids, preds, strict=True):
                best = np.argsort(-probabilities)[:5]
                output = [
                    {"label": labels[i], "probability": float(probabilities[i])} for i in best
                ]
                db.set(image_id, json.dumps(output))
            db.ltrim(queue, len(image_ids), -1)
        time.sleep(SERVER_SLEEP)


def create_app(db: redis.Redis, queue: str) -> flask.Flask:
    app = flask.Flask(__name__)

    @app.route("/predict", methods=["POST"])
    def predict() -> flask.Response:
        data: dict[str, object] = {"success": False}
        if flask.request.files.get("image"):
            raw = flask.request.files["image"].read()
            image = prepare_image(Image.open(io.BytesIO(raw)), (IMAGE_WIDTH, IMAGE_HEIGHT))
            k = str(uuid.uuid4())
            db.rpush(queue, encode_request(k, image))
            while True:
                output = db.get(k)
                if output is not None:
                    data["predictions"] = json.loads(output.decode("utf-8"))
                    db.delete(k)
                    break
                time.sleep(CLIENT_SLEEP)
            data["success"] = True
        return flask.jsonify(data)

    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--redis-url", default="redis://localhost:6379/0")
    parser.add_argument("--queue-name", default="image_queue")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    db = redis.Redis.from_url(args.redis_url)
    log.info("* Loading model...")
    model = keras.applications.ResNet50(weights=None)
    log.info("* Model loaded")
    threading.Thread(
        target=classify_process,
        args=(db, model, imagenet_labels(), args.queue_name, args.batch_size),
        daemon=True,
    ).start()
    log.info("* Starting web service...")
    create_app(db, args.queue_name).run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
