"""Client-side shrinking (simple_request.py --downscale): never below twice the
model's input, upright, on white, and what the model sees hardly changes."""

import io

import numpy as np
from conftest import png_bytes
from PIL import Image

from keras_server.client import downscale_for_upload
from keras_server.images import load_image

SIZE = (224, 224)


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def photo(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(5)
    coarse = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def test_a_large_photo_shrinks_to_twice_the_input_and_the_model_sees_the_same() -> None:
    original = png_bytes(photo(4000, 3000), "JPEG", quality=92)
    small = downscale_for_upload(original, SIZE)
    shrunk = opened(small)
    assert shrunk.format == "JPEG"
    assert shrunk.size == (597, 448)
    assert len(small) < len(original) / 10
    seen_before = load_image(original, SIZE, 50_000_000).astype(np.float64)
    seen_after = load_image(small, SIZE, 50_000_000).astype(np.float64)
    assert np.abs(seen_before - seen_after).mean() < 2


def test_a_photo_taken_sideways_goes_upright() -> None:
    halves = Image.new("RGB", (3000, 2000), (0, 0, 255))
    halves.paste((255, 0, 0), (0, 0, 1500, 2000))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: red on top
    shrunk = opened(downscale_for_upload(png_bytes(halves, "JPEG", exif=exif.tobytes()), SIZE))
    assert shrunk.size == (448, 672)
    assert shrunk.getpixel((224, 100))[0] > 200
    assert shrunk.getpixel((224, 572))[2] > 200
    assert shrunk.getexif().get(0x0112) is None, "no orientation left to apply twice"


def test_transparency_becomes_white() -> None:
    clear = png_bytes(Image.new("RGBA", (2000, 2000), (255, 0, 0, 0)))
    shrunk = np.asarray(opened(downscale_for_upload(clear, SIZE)))
    assert shrunk.min() >= 250


def test_what_it_cannot_shrink_faithfully_goes_as_it_is() -> None:
    small = png_bytes(photo(600, 400))
    assert downscale_for_upload(small, SIZE) == small, "already small"
    deep = png_bytes(Image.fromarray(np.full((2000, 2000), 40000, dtype=np.uint16)))
    assert downscale_for_upload(deep, SIZE) == deep, "16-bit: the server scales it"
    assert downscale_for_upload(b"not an image", SIZE) == b"not an image"
