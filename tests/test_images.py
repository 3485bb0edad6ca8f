"""Upload decoding: every mode to RGB, EXIF rotation, first frame, clear errors."""

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import IMAGES, ROOT, png_bytes
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageOps

from keras_server import images
from keras_server.broker.redis_server import RedisServer
from keras_server.images import ImageError, ImageTooLarge, load_image

SIZE = (224, 224)
LIMIT = 50_000_000


def load(data: bytes) -> np.ndarray:
    array = load_image(data, SIZE, LIMIT)
    assert array.shape == (224, 224, 3)
    assert array.dtype == np.uint8
    return array


def _sample_photos() -> list[Path]:
    """The repository's sample photos and the workplace's shared ones
    (../shared/images beside the checkout, where there is one), each file once."""
    found: dict[bytes, Path] = {}
    for folder in (IMAGES, ROOT.parent / "shared" / "images"):
        for path in sorted(folder.glob("*.*g")):
            found.setdefault(hashlib.sha256(path.read_bytes()).digest(), path)
    return list(found.values())


@pytest.mark.parametrize("path", _sample_photos(), ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_sample_photos_stay_within_one_level_of_pillows_upright_bicubic(path: Path) -> None:
    """OpenCV's area resize (the photos all shrink) against Pillow's bicubic
    of the upright RGB photo: at most 1/255 apart on average."""
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
        expected = np.asarray(upright.resize(SIZE, Image.Resampling.BICUBIC), dtype=np.int16)
    assert np.abs(load(path.read_bytes()) - expected).mean() <= 1.0


@pytest.mark.parametrize("name", ["chelsea.png", "coffee.png", "astronaut.png"])
def test_a_plain_rgb_png_goes_from_libspng_to_the_resize_without_pillows_copy(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upright, RGB, under four times the input's size: the same pixels as
    through a Pillow image, without one."""
    data = (IMAGES / name).read_bytes()
    with Image.open(IMAGES / name) as image:
        assert image.mode == "RGB"
        expected = images._resized(image.convert("RGB"), SIZE)

    def no_copy(*args: object, **kwargs: object) -> Image.Image:
        raise AssertionError("copied into a Pillow image")

    monkeypatch.setattr(images.Image, "fromarray", no_copy)
    np.testing.assert_array_equal(load(data), expected)


def test_an_enlarged_image_is_pillows_bicubic_exactly() -> None:
    """Smaller than the model's input on an axis: Pillow's bicubic, as before."""
    pixels = np.random.default_rng(3).integers(0, 256, (300, 100, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    expected = np.asarray(image.resize(SIZE, Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(load(png_bytes(image)), expected)


@pytest.mark.parametrize(
    ("mode", "colour", "dithered"),
    [
        ("1", (135, 135, 135), True),
        ("L", (135, 135, 135), False),
        ("P", (200, 120, 40), True),
        ("RGB", (200, 120, 40), False),
        ("CMYK", (200, 120, 40), False),
        ("YCbCr", (200, 120, 40), False),
        ("I", (135, 135, 135), False),
        ("F", (135, 135, 135), False),
    ],
)
def test_modes_become_rgb(mode: str, colour: tuple[int, int, int], dithered: bool) -> None:
    """An orange square in each mode comes out orange, or the grey of its
    luminance (135) from a greyscale mode; 1-bit and palette images are
    dithered, so only their average colour is the same."""
    image = Image.new("RGB", (50, 40), (200, 120, 40)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "YCbCr", "I", "F") else "PNG"
    pixels = load(png_bytes(image, fmt)).reshape(-1, 3).astype(int)
    np.testing.assert_allclose(pixels.mean(axis=0), colour, atol=3)
    if not dithered:
        assert (pixels == pixels[0]).all(), "a plain colour stays plain"


def test_transparency_is_white() -> None:
    rgba = Image.new("RGBA", (30, 30), (255, 0, 0, 0))
    assert (load(png_bytes(rgba)) == 255).all()
    la = Image.new("LA", (30, 30), (0, 0))
    assert (load(png_bytes(la)) == 255).all()
    palette = Image.new("P", (30, 30), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert (load(png_bytes(palette)) == 255).all()


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    grey = np.full((20, 20), 32768, dtype=np.uint16)
    image = Image.fromarray(grey)
    out = load(png_bytes(image))
    assert 120 <= int(out.mean()) <= 135, "mid-grey in 16 bits is mid-grey in 8 bits"


def test_exif_orientation_is_applied() -> None:
    # Left half red, right half blue; orientation 6 says "rotate 90 degrees
    # clockwise to display", which puts red on top.
    image = Image.new("RGB", (80, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load(png_bytes(image, "JPEG", exif=exif.tobytes(), quality=95))
    top, bottom = out[20, 112], out[200, 112]
    assert top[0] > 200 and top[2] < 60, f"top should be red, got {top}"
    assert bottom[2] > 200 and bottom[0] < 60, f"bottom should be blue, got {bottom}"


def test_animated_image_uses_first_frame() -> None:
    red = Image.new("RGB", (20, 20), (255, 0, 0))
    blue = Image.new("RGB", (20, 20), (0, 0, 255))
    data = png_bytes(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    with Image.open(__import__("io").BytesIO(data)) as check:
        assert check.n_frames == 2
    out = load(data)
    assert out[..., 0].min() > 200 and out[..., 2].max() < 60


def test_large_jpeg_is_decoded_close_to_full_resolution() -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    big = Image.fromarray(base).resize((3200, 2400), Image.Resampling.BICUBIC)
    data = png_bytes(big, "JPEG", quality=95)
    full = np.asarray(big.resize(SIZE, Image.Resampling.BICUBIC), dtype=np.float64)
    assert np.abs(load(data) - full).mean() < 4


def test_not_an_image() -> None:
    with pytest.raises(ImageError, match="not an image"):
        load(b"%PDF-1.4 definitely not a picture")


def test_truncated_image() -> None:
    data = (IMAGES / "chelsea.png").read_bytes()
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load(data[: len(data) // 2])


def test_corrupt_jpeg() -> None:
    data = bytearray((IMAGES / "rocket.jpg").read_bytes())
    data[600:4000] = bytes(3400)
    with pytest.raises(ImageError):
        # Either the decoder notices, or nothing at all is refused: both would
        # be fine for JPEG, but the zeroed Huffman tables make it fail.
        load(bytes(data[:5000]))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A 100-byte PNG that declares enormous dimensions: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(64))
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def test_too_many_pixels_is_refused_before_decoding() -> None:
    with pytest.raises(ImageTooLarge, match="too many pixels"):
        load(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageTooLarge) as caught:
        load_image(png_bytes(Image.new("1", (3000, 3000))), SIZE, max_pixels=1_000_000)
    assert caught.value.status == 413


def test_errors_carry_http_status() -> None:
    assert ImageError("x").status == 400
    assert ImageTooLarge("x").status == 413


def _fits() -> bytes:
    """A minimal 8x8 FITS image (Pillow reads FITS; it is no upload format)."""
    cards = ["SIMPLE  = T", "BITPIX  = 8", "NAXIS   = 2", "NAXIS1  = 8", "NAXIS2  = 8", "END"]
    header = "".join(card.ljust(80) for card in cards).ljust(2880).encode()
    return header + bytes(range(64)).ljust(2880, b"\0")


@pytest.mark.parametrize(
    "data",
    [
        png_bytes(Image.new("RGB", (8, 8)), "PPM"),
        png_bytes(Image.new("RGB", (8, 8)), "TGA"),
        png_bytes(Image.new("RGB", (8, 8)), "PCX"),
        _fits(),
    ],
    ids=["ppm", "tga", "pcx", "fits"],
)
def test_only_the_advertised_formats_are_parsed(data: bytes) -> None:
    with Image.open(io.BytesIO(data)):
        pass  # Pillow itself reads it ...
    with pytest.raises(ImageError, match=r"not an image we can read \(JPEG, PNG, GIF"):
        load_image(data, (4, 4), 10**6)  # ... the service does not


# Plain 8-bit PNGs decode through libspng (images._spng_format); everything
# else through Pillow. Both must give the same pixels and follow the same rules.


def _pillow_only(data: bytes, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    with monkeypatch.context() as patch:
        patch.setattr(images, "_spng_format", lambda image, data: None)
        return load(data)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_plain_pngs_decode_through_libspng_to_pillows_pixels(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (300, 500, len(mode)), dtype=np.uint8)
    data = png_bytes(Image.fromarray(pixels.squeeze(), mode))
    with Image.open(io.BytesIO(data)) as image:
        assert images._spng_format(image, data) == mode
    np.testing.assert_array_equal(load(data), _pillow_only(data, monkeypatch))


def test_pngs_libspng_would_decode_otherwise_stay_with_pillow() -> None:
    cases = {
        "16-bit": Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)),
        "palette": Image.new("P", (8, 8)),
        "grey with alpha": Image.new("LA", (8, 8)),
        "colour key": Image.new("RGB", (8, 8)),
    }
    for name, image in cases.items():
        params = {"transparency": (0, 0, 0)} if name == "colour key" else {}
        data = png_bytes(image, **params)
        with Image.open(io.BytesIO(data)) as opened:
            assert images._spng_format(opened, data) is None, name


def _exif_after_pixels(data: bytes, exif: bytes) -> bytes:
    """`data` (a PNG) with an eXIf chunk moved after IDAT, as some writers put it."""
    end = data.rindex(b"IEND") - 4
    return data[:end] + _chunk(b"eXIf", exif) + data[end:]


@pytest.mark.parametrize("where", ["before the pixels", "after the pixels"])
def test_png_exif_orientation_is_applied_wherever_the_chunk_is(where: str) -> None:
    image = Image.new("RGB", (80, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    if where == "before the pixels":
        data = png_bytes(image, exif=exif.tobytes())
        with Image.open(io.BytesIO(data)) as opened:
            assert images._spng_format(opened, data) == "RGB"
    else:
        data = _exif_after_pixels(png_bytes(image), exif.tobytes()[6:])  # no "Exif\0\0"
        with Image.open(io.BytesIO(data)) as opened:
            assert images._spng_format(opened, data) is None
    out = load(data)
    top, bottom = out[20, 112], out[200, 112]
    assert top[0] > 200 and top[2] < 60, f"top should be red, got {top}"
    assert bottom[2] > 200 and bottom[0] < 60, f"bottom should be blue, got {bottom}"


@given(
    st.lists(
        st.tuples(st.sampled_from([b"IDAT", b"tEXt", b"eXIf", b"zTXt", b"IEND"]), st.binary()),
        max_size=8,
    ),
    st.integers(0, 64),
)
def test_the_chunk_walk_finds_what_a_full_parse_finds(
    chunks: list[tuple[bytes, bytes]], cut: int
) -> None:
    """images._has_chunk hops over chunk data (which may hold the name itself)
    and stops at IEND; on a truncated file it answers without raising."""
    data = b"\x89PNG\r\n\x1a\n" + b"".join(_chunk(kind, body) for kind, body in chunks)
    kinds = [kind for kind, _ in chunks]
    before_end = kinds[: kinds.index(b"IEND")] if b"IEND" in kinds else kinds
    assert images._has_chunk(data, b"eXIf") == (b"eXIf" in before_end)
    images._has_chunk(data[: len(data) - cut], b"eXIf")


def test_a_corrupt_plain_png_is_refused() -> None:
    data = bytearray(png_bytes(Image.new("RGB", (64, 64), (1, 2, 3))))
    start = data.index(b"IDAT") + 4
    data[start : start + 8] = bytes(8)  # the CRC no longer matches
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load(bytes(data))


def test_resize_stays_within_one_level_of_a_bicubic_from_the_reduced_copy() -> None:
    """The resize's reducing gap costs at most 1/255 on average against the
    bicubic resize straight from the reduced copy (the pixels before it)."""
    rng = np.random.default_rng(5)
    coarse = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for size in ((1600, 1200), (1024, 768), (900, 700)):
        big = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
        noisy = np.asarray(big, dtype=np.int16) + rng.integers(-8, 9, (size[1], size[0], 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        small, _ = images._reduced(image, SIZE)
        before = np.asarray(small.resize(SIZE, Image.Resampling.BICUBIC), dtype=np.int16)
        assert np.abs(load(png_bytes(image)) - before).mean() <= 1.0, size


def _plain_png(mode: str) -> bytes:
    pixels = np.random.default_rng(9).integers(0, 256, (24, 32, len(mode)), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels.squeeze(), mode))


PLAIN_PNGS = [_plain_png(mode) for mode in ("L", "RGB", "RGBA")]


@given(
    st.sampled_from(PLAIN_PNGS),
    st.lists(st.tuples(st.integers(8, 4000), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 4000),
)
def test_a_damaged_plain_png_decodes_or_raises_image_error(
    data: bytes, changes: list[tuple[int, int]], keep: int
) -> None:
    """libspng on damaged bytes (past the signature, so most still open as a
    PNG and reach it): an image of the right shape, or ImageError."""
    damaged = bytearray(data)
    for at, value in changes:
        if at < len(damaged):
            damaged[at] = value
    try:
        out = load_image(bytes(damaged[: max(keep, 33)]), SIZE, LIMIT)
    except ImageError:
        return
    assert out.shape == (224, 224, 3)


def test_a_web_process_resizes_with_one_opencv_thread(redis_server: RedisServer) -> None:
    """Its request threads resize at once already; OpenCV's own pool would
    only hand work between threads."""
    import cv2

    from keras_server.settings import Settings
    from keras_server.web.app import create_app

    cv2.setNumThreads(4)
    create_app(Settings(redis_url=redis_server.url, redis_url_given=True))
    assert cv2.getNumThreads() == 1
