"""Decoding per format: Pillow (`images.load_image` before libspng) against the other
decoders, CPU time per image side by side in one run.

Every candidate produces what the model gets, a (224, 224, 3) uint8 array,
from the same bytes, and is timed with `time.thread_time` (CPU of this thread
only, so a busy machine slows the clock less than it would a wall clock) in
turns: `--rounds` rounds, each running every candidate `--repeat` times on
every image, the median round kept. Beside the time, the mean absolute
difference of each candidate's pixels from Pillow's (in 1/255 units: 1.0 is
the budget a replacement may spend).

The candidates, each as it would sit in `images.py` (the header still read by
Pillow, which the checks and EXIF need; only the pixel decode replaced):

- `pillow`: `load_image` before this comparison, Pillow alone (JPEG drafted
  by DCT scaling to at least twice the target, box-reduced, bicubic); the
  reference of the pixel differences;
- `load_image`: `images.load_image` as it is now (plain PNGs through libspng,
  the resize OpenCV's area filter where it shrinks);
- `simplejpeg`: JPEG pixels from simplejpeg (libjpeg-turbo, DCT-scaled via
  min_width/min_height), then the same reduce and bicubic resize;
- `turbojpeg`: the same through PyTurboJPEG (needs the system libturbojpeg);
- `opencv`: `cv2.imdecode` (JPEG with IMREAD_REDUCED_COLOR_2/4/8, PNG and
  WebP at full size), then the same reduce and bicubic resize;
- `pyspng`: PNG pixels from libspng, then the same reduce and resize;
- `wuffs`: PNG pixels from Wuffs (pywuffs, not a dependency: it has no
  wheels, so it builds from source with a C++ compiler; install it to see
  it), then the same reduce and resize;
- `decode-only/...`: the pixel decode alone, without reduce and resize, to
  show what share of each candidate the decode is.

A decoder that is not installed is skipped. Images: the four samples, and
generated photo-like images: JPEGs from 0.3 to 12 MP (phone photos are 12 MP,
where DCT scaling matters), a progressive JPEG, PNGs (RGB and RGBA) and a WebP.

    python -m bench.decoders
    python -m bench.decoders --json bench/results/decoders.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, features

from bench import cpu
from keras_server import images

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
SIZE = (224, 224)
MAX_PIXELS = 50_000_000

Decode = Callable[[bytes], np.ndarray]


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like RGB array: smooth shapes, fine texture, sensor noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    image = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16
    )
    texture = np.asarray(
        Image.fromarray(
            rng.integers(0, 256, (max(1, height // 4), max(1, width // 4), 3), dtype=np.uint8)
        ).resize((width, height), Image.Resampling.BILINEAR),
        dtype=np.int16,
    )
    noisy = image + (texture - 128) // 3 + rng.integers(-6, 7, image.shape, dtype=np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def encoded(pixels: np.ndarray, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **params)
    return buffer.getvalue()


def uploads() -> dict[str, bytes]:
    files = {name: (ROOT / "images" / name).read_bytes() for name in SAMPLES}
    for width, height in ((640, 480), (1600, 1200), (4000, 3000)):
        files[f"jpeg {width}x{height} q92"] = encoded(
            photo(width, height, width), "JPEG", quality=92
        )
    files["jpeg 4000x3000 progressive"] = encoded(
        photo(4000, 3000, 7), "JPEG", quality=85, progressive=True
    )
    medium = photo(1024, 768, 3)
    files["png 1024x768 rgb"] = encoded(medium, "PNG")
    alpha = np.dstack([medium, np.full(medium.shape[:2], 200, np.uint8)])
    files["png 1024x768 rgba"] = encoded(alpha, "PNG")
    if features.check("webp"):  # a Pillow built without libwebp (pillow-simd here) has none
        files["webp 1024x768 q90"] = encoded(medium, "WEBP", quality=90)
    return files


def _finish(pixels: np.ndarray) -> np.ndarray:
    """What `load_image` does after the decode, for an RGB(A) array that the
    candidate decoded: box-reduce, white under alpha, bicubic to SIZE."""
    image = Image.fromarray(pixels)
    small, white = images._reduced(image, SIZE)
    rgb = images._to_rgb(small, white)
    return np.asarray(rgb.resize(SIZE, Image.Resampling.BICUBIC), dtype=np.uint8)


def _header(data: bytes) -> Image.Image:
    """The header read that every candidate keeps: size check, format, EXIF."""
    image = Image.open(io.BytesIO(data), formats=images.FORMATS)
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise images.ImageTooLarge("too many pixels")
    if image.format != "PNG" or "exif" in image.info:
        images._orientation(image)  # a PNG's getexif() without it would decode the image
    return image


def _jpeg_scale(width: int, height: int) -> int:
    """The DCT scale denominator Pillow's draft() picks: the largest of
    1, 2, 4, 8 that keeps the image at least twice SIZE."""
    scale = 1
    while (
        scale < 8 and width // (scale * 2) >= 2 * SIZE[0] and height // (scale * 2) >= 2 * SIZE[1]
    ):
        scale *= 2
    return scale


def pillow_only(data: bytes) -> np.ndarray:
    """`load_image` as it was before libspng and the resize's reducing gap:
    Pillow decodes everything, bicubic from the reduced copy."""
    spng, gap = images._spng_format, images._REDUCING_GAP
    images._spng_format, images._REDUCING_GAP = (lambda image, data: None), None
    try:
        return images.load_image(data, SIZE, MAX_PIXELS)
    finally:
        images._spng_format, images._REDUCING_GAP = spng, gap


def load_image(data: bytes) -> np.ndarray:
    """Today's `images.load_image`."""
    return images.load_image(data, SIZE, MAX_PIXELS)


def _wuffs(data: bytes) -> np.ndarray:
    """A plain PNG's pixels from Wuffs, in its own layout (grey, RGB or RGBA)."""
    from pywuffs import ImageDecoderType, PixelFormat
    from pywuffs.aux import ImageDecoder, ImageDecoderConfig

    formats = {"L": PixelFormat.Y, "RGB": PixelFormat.RGB, "RGBA": PixelFormat.RGBA_NONPREMUL}
    mode = _header(data).mode
    config = ImageDecoderConfig()
    config.enabled_decoders = [ImageDecoderType.PNG]
    config.pixel_format = formats[mode]
    pixels = ImageDecoder(config).decode(data).pixbuf
    return pixels.reshape(pixels.shape[:2]) if mode == "L" else pixels


def _png_candidates() -> dict[str, dict[str, Decode]]:
    """libspng's and Wuffs' PNG decodes, each where it is installed."""
    found: dict[str, dict[str, Decode]] = {}
    try:
        import pyspng

        found["pyspng"] = {"PNG": lambda data: (_header(data), _finish(pyspng.load(data)))[1]}
        found["decode-only/pyspng"] = {"PNG": pyspng.load}
    except ImportError:
        pass
    if importlib.util.find_spec("pywuffs") is not None:
        found["wuffs"] = {"PNG": lambda data: _finish(_wuffs(data))}
        found["decode-only/wuffs"] = {"PNG": _wuffs}
    return found


def candidates() -> dict[str, dict[str, Decode]]:
    """name -> format -> decode; formats not listed fall back to nothing (skipped)."""
    found: dict[str, dict[str, Decode]] = {
        "pillow": dict.fromkeys(("JPEG", "PNG", "WEBP"), pillow_only),
        "load_image": dict.fromkeys(("JPEG", "PNG", "WEBP"), load_image),
    }
    try:
        import simplejpeg

        def simple_pixels(data: bytes) -> np.ndarray:
            return simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_width=2 * SIZE[0], min_height=2 * SIZE[1]
            )

        found["simplejpeg"] = {
            "JPEG": lambda data: (_header(data), _finish(simple_pixels(data)))[1]
        }
        found["decode-only/simplejpeg"] = {"JPEG": simple_pixels}
    except ImportError:
        pass
    try:
        import turbojpeg

        jpeg = turbojpeg.TurboJPEG()

        def turbo_pixels(data: bytes) -> np.ndarray:
            width, height, _, _ = jpeg.decode_header(data)
            scale = _jpeg_scale(width, height)
            bgr = jpeg.decode(data, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=(1, scale))
            return bgr

        found["turbojpeg"] = {"JPEG": lambda data: (_header(data), _finish(turbo_pixels(data)))[1]}
        found["decode-only/turbojpeg"] = {"JPEG": turbo_pixels}
    except (ImportError, RuntimeError, OSError):
        pass  # PyTurboJPEG without the system's libturbojpeg
    try:
        import cv2

        cv2.setNumThreads(1)
        reduced = {
            1: cv2.IMREAD_COLOR,
            2: cv2.IMREAD_REDUCED_COLOR_2,
            4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8,
        }

        def cv_pixels(data: bytes, header: Image.Image | None = None) -> np.ndarray:
            flag = cv2.IMREAD_UNCHANGED
            if header is not None and header.format == "JPEG":
                flag = reduced[_jpeg_scale(*header.size)] | cv2.IMREAD_IGNORE_ORIENTATION
            pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
            if pixels.ndim == 3 and pixels.shape[2] == 4:
                return cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA)
            return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)

        def cv_full(data: bytes) -> np.ndarray:
            header = _header(data)
            return _finish(cv_pixels(data, header))

        found["opencv"] = dict.fromkeys(("JPEG", "PNG", "WEBP"), cv_full)
        found["decode-only/opencv"] = dict.fromkeys(
            ("JPEG", "PNG", "WEBP"),
            lambda data: cv_pixels(data, Image.open(io.BytesIO(data))),
        )
    except ImportError:
        pass
    found.update(_png_candidates())

    def pillow_pixels(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data), formats=images.FORMATS) as image:
            if image.format == "JPEG":
                image.draft(image.mode, (2 * SIZE[0], 2 * SIZE[1]))
            image.load()
            return np.asarray(image)

    found["decode-only/pillow"] = dict.fromkeys(("JPEG", "PNG", "WEBP"), pillow_pixels)
    return found


def cpu_ms(decode: Decode, data: bytes, repeat: int) -> float:
    started = time.thread_time()
    for _ in range(repeat):
        decode(data)
    return (time.thread_time() - started) / repeat * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="decodes per image per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    files = uploads()
    found = candidates()
    formats = {name: Image.open(io.BytesIO(data)).format for name, data in files.items()}
    today = {name: pillow_only(data) for name, data in files.items()}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, data in files.items():
            for candidate, by_format in found.items():
                decode = by_format.get(formats[name] or "")
                if decode is not None:
                    decode(data)  # warm
                    times.setdefault((candidate, name), []).append(
                        cpu_ms(decode, data, args.repeat)
                    )
    rows: list[dict[str, Any]] = []
    for (candidate, name), samples in times.items():
        decode = found[candidate][formats[name] or ""]
        difference = None
        if not candidate.startswith("decode-only/"):
            out = decode(files[name]).astype(np.int16)
            difference = round(float(np.abs(out - today[name]).mean()), 3)
        rows.append(
            {
                "image": name,
                "bytes": len(files[name]),
                "decoder": candidate,
                "cpu_ms": round(statistics.median(samples), 3),
                "mean_abs_diff": difference,
            }
        )
    print(cpu.describe(cpu.model(), cpu.vector_flags()))
    versions = _versions()
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"{args.rounds} rounds x {args.repeat} decodes, median round; CPU ms per image (thread)")
    names = list(found)
    print(f"{'image':30s} {'KB':>6s} " + " ".join(f"{n[-14:]:>14s}" for n in names))
    for name, data in files.items():
        cells = []
        for candidate in names:
            row = next((r for r in rows if r["image"] == name and r["decoder"] == candidate), None)
            if row is None:
                cells.append(f"{'-':>14s}")
            elif row["mean_abs_diff"] is None:
                cells.append(f"{row['cpu_ms']:14.2f}")
            else:
                cells.append(f"{row['cpu_ms']:7.2f} ({row['mean_abs_diff']:.2f})")
        print(f"{name:30s} {len(data) / 1024:6.0f} " + " ".join(cells))
    print("(in brackets: mean absolute difference from pillow's pixels, 0..255)")
    if args.json:
        report = {
            "cpu": cpu.describe(cpu.model(), cpu.vector_flags()),
            "versions": versions,
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in (
        "pillow",
        "pillow-simd",
        "simplejpeg",
        "PyTurboJPEG",
        "opencv-python-headless",
        "pyspng",
        "pywuffs",
    ):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


if __name__ == "__main__":
    sys.exit(main())
