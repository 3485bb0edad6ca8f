"""Send one image to the API and print its top predictions.

python simple_request.py [IMAGE] [--url URL] [--downscale]

--downscale shrinks a large photo before sending it, to no less than twice
the model's input size each way (asked from the server's /models), so the
server decodes a small JPEG instead of megabytes of pixels.
"""

from __future__ import annotations

import argparse
import re
import sys

import requests

from keras_server.client.downscale import downscale_for_upload


def model_input_size(predict_url: str, timeout: float) -> tuple[int, int] | None:
    """The input size of the model `predict_url` (.../predict or
    .../models/NAME/predict) serves, from GET /models; None when the server
    does not say."""
    match = re.fullmatch(r"(.*?)(?:/models/([^/]+))?/predict/?", predict_url)
    if match is None:
        return None
    base, name = match.groups()
    try:
        listing = requests.get(base + "/models", timeout=timeout).json()
        wanted = name or listing["default"]
        model = next(m for m in listing["models"] if m["name"] == wanted)
        width, height = model["input_size"]
        return int(width), int(height)
    except (requests.RequestException, ValueError, KeyError, TypeError, StopIteration):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", default="images/chelsea.png")
    parser.add_argument("--url", default="http://localhost:5000/predict")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait")
    parser.add_argument(
        "--downscale",
        action="store_true",
        help="shrink a large photo before sending it (never below twice the model's input)",
    )
    args = parser.parse_args(argv)

    try:
        with open(args.image, "rb") as f:
            data = f.read()
        size = model_input_size(args.url, args.timeout) if args.downscale else None
        if size is not None:
            data = downscale_for_upload(data, size)
        response = requests.post(
            args.url, files={"image": (args.image, data)}, timeout=args.timeout
        )
    except OSError as exc:  # a missing file, or requests' connection errors
        print(f"Request failed: {exc}", file=sys.stderr)
        return 1
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:200] or response.reason}
    if response.status_code != 200 or not body.get("success"):
        print(f"Request failed ({response.status_code}): {body.get('error')}", file=sys.stderr)
        return 1
    for rank, prediction in enumerate(body["predictions"], start=1):
        print(f"{rank}. {prediction['label']}: {prediction['probability']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
