"""Send one image to the API and print its top predictions.

python simple_request.py [IMAGE] [--url URL]
"""

from __future__ import annotations

import argparse
import sys

import requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", default="images/chelsea.png")
    parser.add_argument("--url", default="http://localhost:5000/predict")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait")
    args = parser.parse_args(argv)

    try:
        with open(args.image, "rb") as f:
            response = requests.post(args.url, files={"image": f}, timeout=args.timeout)
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
