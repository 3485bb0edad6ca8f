"""Client-side shrinking (simple_request.py --downscale, keras-server classify):
by a whole factor only, never below twice the model's input, upright, on
white, and what the model sees hardly changes."""

import io

import numpy as np
from conftest import png_bytes
from PIL import Image

from keras_server.client.downscale import downscale_for_upload
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


def test_a_large_photo_shrinks_by_its_dct_scale_and_the_model_sees_the_same() -> None:
    original = png_bytes(photo(4000, 3000), "JPEG", quality=92)
    small = downscale_for_upload(original, SIZE)
    shrunk = opened(small)
    assert shrunk.format == "JPEG"
    # 1/4 scale: 1/8 (500x375) would be under twice the input.
    assert shrunk.size == (1000, 750)
    assert len(small) < len(original) / 5
    seen_before = load_image(original, SIZE, 50_000_000).astype(np.float64)
    seen_after = load_image(small, SIZE, 50_000_000).astype(np.float64)
    # The server drafts the original to the same 1/4 scale: only the
    # re-encode differs.
    assert np.abs(seen_before - seen_after).mean() < 1


def test_a_large_png_is_box_reduced_keeping_its_shape() -> None:
    original = png_bytes(photo(2000, 1500))
    shrunk = opened(downscale_for_upload(original, SIZE))
    assert shrunk.format == "JPEG"
    assert shrunk.size == (667, 500), "reduced by 3 (the largest factor keeping 448 each way)"
    seen_before = load_image(original, SIZE, 50_000_000).astype(np.float64)
    seen_after = load_image(png_bytes(shrunk, "PNG"), SIZE, 50_000_000).astype(np.float64)
    assert np.abs(seen_before - seen_after).mean() < 2


def test_a_photo_taken_sideways_goes_upright() -> None:
    halves = Image.new("RGB", (3000, 2000), (0, 0, 255))
    halves.paste((255, 0, 0), (0, 0, 1500, 2000))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: red on top
    shrunk = opened(downscale_for_upload(png_bytes(halves, "JPEG", exif=exif.tobytes()), SIZE))
    assert shrunk.size == (500, 750), "1/4 scale, then upright"
    assert shrunk.getpixel((250, 100))[0] > 200
    assert shrunk.getpixel((250, 650))[2] > 200
    assert shrunk.getexif().get(0x0112) is None, "no orientation left to apply twice"


def test_transparency_becomes_white() -> None:
    clear = png_bytes(Image.new("RGBA", (2000, 2000), (255, 0, 0, 0)))
    shrunk = np.asarray(opened(downscale_for_upload(clear, SIZE)))
    assert shrunk.min() >= 250


def test_what_it_cannot_shrink_faithfully_goes_as_it_is() -> None:
    small = png_bytes(photo(600, 400))
    assert downscale_for_upload(small, SIZE) == small, "already small"
    # Under twice the floor (448) in a side: no whole factor shrinks it, and
    # a re-encode would only cost the client's CPU and some fidelity.
    middling = png_bytes(photo(1600, 800), "JPEG")
    assert downscale_for_upload(middling, SIZE) == middling, "800 < 2 x 448"
    deep = png_bytes(Image.fromarray(np.full((2000, 2000), 40000, dtype=np.uint16)))
    assert downscale_for_upload(deep, SIZE) == deep, "16-bit: the server scales it"
    assert downscale_for_upload(b"not an image", SIZE) == b"not an image"
