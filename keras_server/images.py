"""Turn an uploaded file into the model's input image, with Pillow.

Whatever the file holds (any mode, EXIF-rotated, animated, 16-bit,
transparent) comes out as an RGB uint8 array of the requested size, or as an
ImageError a person can read.

Memory is bounded: a file that is small on the wire can be huge once decoded
(a 100 KB PNG can declare 8000x6000 16-bit pixels). Before any pixel is
decoded, `decode_cost` estimates from the header the bytes the decode will
hold at its peak, and the decode runs only once a `DecodeBudget` (one per
process) has room for it; otherwise `DecoderBusy` (503, retry shortly), or
`ImageTooLarge` (413) when even an empty budget could not hold it. The decode
itself stays lean: JPEGs are decoded at the smallest DCT scale that still
covers twice the model's input (libjpeg-turbo, Pillow's draft()), every other
image is box-reduced (Pillow's reduce()) right after decoding, and colour
conversion, EXIF rotation and the final resize all work on that small copy,
so only the decoded image itself is ever full size. The final resize is
OpenCV's area filter (SIMD) where the image shrinks, Pillow's bicubic where
it grows (`_resized`); an upright RGB PNG that shrinks, under four times the
input's size (`_reduced` leaves it whole), goes from libspng's array to
OpenCV's resize directly, without the copies into Pillow and back.

Pillow reads every header (the checks above, EXIF) and decodes every format
but one: a plain 8-bit PNG (grey, RGB or RGBA; no palette, colour key or
animation) is decoded by libspng (pyspng), measured 2-4x faster than
Pillow's PNG decode on the same CPU (BENCHMARKS.md, "Decoding per format"),
to the same pixels; OpenCV's imdecode was slower than both here (pyspng on
the sample PNGs, Pillow's drafted JPEG decode), so it decodes nothing.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from typing import ClassVar

import cv2
import numpy as np
import pyspng
from PIL import ExifTags, Image, UnidentifiedImageError

SUPPORTED = "JPEG, PNG, GIF, BMP, TIFF or WebP"
# The Pillow plugins that may parse an upload: SUPPORTED, whose decode cost
# `decode_cost` knows. Any other plugin (PSD, FITS, EPS through Ghostscript,
# ...) is attack surface nobody asked for. A multi-picture JPEG (MPO) opens
# through the JPEG plugin.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")

MB = 1024 * 1024

# Bytes per pixel of Pillow's own storage: 8-bit modes take one byte, 16-bit
# ones two, everything else (RGB included) four.
_ONE_BYTE = frozenset({"1", "L", "P"})

# Bytes per pixel that decoders hold beyond the image itself (measured with
# Pillow 13): libwebp decodes into its own RGBA buffer, which Pillow copies
# into a bytes object before unpacking it; a TIFF strip may be the whole image.
_DECODER_BYTES = {"WEBP": 12, "TIFF": 4}

# Multi-picture JPEGs (some cameras) are JPEGs to libjpeg too.
_JPEG = frozenset({"JPEG", "MPO"})

# The PNG modes libspng decodes to the same pixels as Pillow (see _spng_format).
_SPNG_MODES = frozenset({"L", "RGB", "RGBA"})

# Pillow's resize reducing_gap (see _resized).
_REDUCING_GAP = 1.5

# Small working copies (the reduced image, its RGB and float versions) and the
# decoder's row buffers: a few MB at most, counted once per decode.
_WORKING_BYTES = 8 * MB

# EXIF orientation -> the transpose that shows the image upright (what
# ImageOps.exif_transpose does, applied here to the small copy instead).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(ValueError):
    """The upload cannot be used as an image; `status` is the HTTP status,
    `headers` what goes with it."""

    status = 400
    headers: ClassVar[dict[str, str]] = {}


class ImageTooLarge(ImageError):
    status = 413


class DecoderBusy(ImageError):
    """The decode budget is spent by uploads in flight: retry shortly."""

    status = 503
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class DecodeBudget:
    """Bytes of decoded pixels this process may hold at once, across threads.

    A reservation is refused at once rather than queued: a request waiting
    for memory would hold its upload meanwhile, and a client retrying after
    Retry-After spreads the load just as well.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    @contextlib.contextmanager
    def reserve(self, cost: int, what: str = "the image") -> Iterator[None]:
        """Hold `cost` bytes of the budget while the block runs; `what` names
        what needs them in the 413."""
        if cost > self.limit:
            raise ImageTooLarge(
                f"{what} needs {cost / MB:,.0f} MB to decode; the server's decode "
                f"memory is {self.limit / MB:,.0f} MB"
            )
        with self._lock:
            if self._used + cost > self.limit:
                raise DecoderBusy(
                    "the server is decoding other large images right now; retry shortly"
                )
            self._used += cost
        try:
            yield
        finally:
            with self._lock:
                self._used -= cost


def load_image(
    data: bytes, size: tuple[int, int], max_pixels: int, budget: DecodeBudget | None = None
) -> np.ndarray:
    """Decode `data` into a (height, width, 3) uint8 array of `size` (w, h).

    With a `budget`, the decode waits for nothing: it runs within the budget
    or raises DecoderBusy (503) / ImageTooLarge (413).
    """
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; Pillow's warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageTooLarge(
                        f"the image has too many pixels: {width}x{height} = {width * height:,}; "
                        f"the limit is {max_pixels:,}"
                    )
                declared = image.size
                if image.format in _JPEG:
                    # libjpeg-turbo decodes at 1/2, 1/4 or 1/8 scale for less
                    # IDCT work; keep at least twice the target so the bicubic
                    # resize still smooths. (Measured: drafting down to the
                    # target itself saves 10 % on a 12 MP photo but triples the
                    # error against a full decode.) A JPEG's EXIF is read at
                    # open: no decode yet.
                    target = _upright_target(size, _orientation(image))
                    image.draft(image.mode, (2 * target[0], 2 * target[1]))
                spng = _spng_format(image, data)
                cost = decode_cost(image, declared, spng=spng is not None)
                with budget.reserve(cost) if budget else nullcontext():
                    if spng is not None:
                        # Its EXIF, if any, came before the pixels and was read
                        # at open (a PNG's getexif() would decode the image).
                        orientation = _orientation(image) if "exif" in image.info else 1
                        pixels = _spng_load(data, spng)
                        if spng == "RGB" and orientation == 1 and _directly(image.size, size):
                            # The plain photo: resized straight from libspng's
                            # array, no copy into Pillow and back (about a
                            # tenth of the decode's CPU on the sample PNGs),
                            # to the pixels the path below gives.
                            return _area(pixels, size)
                        decoded = Image.fromarray(pixels)
                    else:
                        image.load()
                        # Only now: a PNG's getexif() decodes the whole image.
                        orientation = _orientation(image)
                        decoded = image
                    small, white = _reduced(decoded, _upright_target(size, orientation))
                    del decoded
                if orientation in _UPRIGHT:
                    small = small.transpose(_UPRIGHT[orientation])
                return _resized(_to_rgb(small, white), size)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"the image has too many pixels ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError(f"the file is not an image we can read ({SUPPORTED})") from None
    except ImageError:
        raise
    except MemoryError:
        # The budget is there so that this never happens; if it does, the
        # process is fine (the allocation failed) and a retry may succeed.
        raise DecoderBusy("the server is short of memory for this image; retry shortly") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        # Pillow reports truncated and corrupt data through all of these.
        raise ImageError(f"the image is truncated or corrupt ({exc})") from None


def _resized(rgb: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """`rgb` at `size` (w, h) as a uint8 array.

    Shrinking both ways (every photo larger than the model's input), OpenCV's
    area resize (`_area`); an image enlarged on either axis keeps Pillow's
    bicubic, whose pixels the tests hold exactly: the area filter only
    averages when it shrinks.
    """
    if _shrinks(rgb.size, size):
        return _area(np.asarray(rgb, dtype=np.uint8), size)
    # reducing_gap: an axis still shrinking is box-reduced first down to at
    # least 1.5x the target (what _reduced left is up to 4x).
    resized = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=_REDUCING_GAP)
    return np.asarray(resized, dtype=np.uint8)


def _shrinks(have: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether an image of `have` (w, h) is at least `size` both ways."""
    return have[0] >= size[0] and have[1] >= size[1]


def _directly(have: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether an RGB image of `have` (w, h) goes from its pixels to `size`
    in one area resize: it shrinks, and `_reduced` would leave it as it is
    (under four times `size` both ways: no whole factor keeps it at twice)."""
    return _shrinks(have, size) and have[0] < 4 * size[0] and have[1] < 4 * size[1]


def _area(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV's area resize of RGB `pixels` down to `size` (w, h), with the
    CPU's SIMD: 1.3-2.2x faster than Pillow's bicubic on the sample photos
    (timeit ratios on the AMX Xeon, shared with other work), within 0.9/255
    of it on average per image (tests/test_images.py holds it to 1/255)."""
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def single_threaded_resize() -> None:
    """One OpenCV thread per process: a web process runs a resize per request
    thread already, and there are several per core; OpenCV's own pool would
    only add hand-offs (idempotent)."""
    cv2.setNumThreads(1)


def decode_cost(image: Image.Image, declared: tuple[int, int], *, spng: bool = False) -> int:
    """Bytes the decode of `image` (opened, drafted, not yet loaded; `declared`
    is its size before draft()) holds at its peak in `_reduced`: the decoded
    pixels, the decoder's own buffers, and the full-size copy a mode needs
    before it can be reduced. `spng`: decoded by libspng into an array (one
    byte per channel) that Pillow then copies."""
    width, height = image.size
    pixels = width * height
    mode = image.mode
    cost = pixels * (1 if mode in _ONE_BYTE else 2 if mode.startswith("I;16") else 4)
    if spng:
        cost += pixels * len(mode)
    cost += pixels * _DECODER_BYTES.get(image.format or "", 0)
    if image.format in _JPEG and image.info.get("progressive"):
        cost += _jpeg_coefficient_bytes(image, declared)
    if mode == "1":
        cost += pixels  # to L
    elif mode.startswith("I;16") or mode in ("P", "PA", "RGBA", "LA"):
        # I;16 to I, a palette to RGB(A), and reduce() premultiplies alpha
        # into a copy; a palette with alpha does both.
        cost += pixels * (8 if mode == "PA" or "transparency" in image.info else 4)
    return cost + _WORKING_BYTES


def _spng_format(image: Image.Image, data: bytes) -> str | None:
    """The pyspng output format ("L", "RGB", "RGBA": Pillow's mode) for a PNG
    that libspng decodes to Pillow's own pixels, None for any other image:
    8 bits per sample (Pillow keeps only the high byte of 16-bit colour), no
    palette, no colour key (tRNS), no grey with alpha (pyspng 0.1 refuses
    it), one frame, and its EXIF, if any, read at open (an eXIf chunk after
    the pixels only Pillow's decode finds)."""
    if image.format != "PNG" or image.mode not in _SPNG_MODES:
        return None
    # The IHDR chunk comes first (Pillow checked it): bit depth at byte 24.
    if data[12:16] != b"IHDR" or data[24] != 8:
        return None
    if "transparency" in image.info or getattr(image, "is_animated", False):
        return None
    if "exif" not in image.info and _has_chunk(data, b"eXIf"):
        return None
    return image.mode


# A PNG chunk's header: its data's length, then its type.
_PNG_CHUNK = struct.Struct(">I4s")


def _has_chunk(data: bytes, kind: bytes) -> bool:
    """Whether the PNG `data` has a chunk of type `kind` before IEND, found by
    hopping from chunk header to chunk header (a few dozen hops) rather than
    searching every byte for the name (0.1-0.2 ms of a request's CPU on the
    sample photos, issue 23). A length that leads past the end ends the walk:
    such a file is corrupt, and libspng refuses it."""
    offset = 8  # past the signature
    while offset + _PNG_CHUNK.size <= len(data):
        length, name = _PNG_CHUNK.unpack_from(data, offset)
        if name == kind:
            return True
        if name == b"IEND":
            return False
        offset += _PNG_CHUNK.size + length + 4  # the header, the data, the CRC
    return False


def _spng_load(data: bytes, fmt: str) -> np.ndarray:
    try:
        return pyspng.load(data, fmt)
    except RuntimeError as exc:
        # libspng reports truncated and corrupt data (CRC, zlib) this way.
        raise ImageError(f"the image is truncated or corrupt ({exc})") from None


def _jpeg_coefficient_bytes(image: Image.Image, declared: tuple[int, int]) -> int:
    """A progressive JPEG keeps every DCT coefficient (two bytes each) of the
    whole image in memory until its last scan, whatever scale it is decoded at."""
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * len(image.getbands())
    h_max = max(layer[1] for layer in layers)
    v_max = max(layer[2] for layer in layers)
    samples = sum(
        math.ceil(declared[0] * h / h_max) * math.ceil(declared[1] * v / v_max)
        for _, h, v, _ in layers
    )
    return samples * 2


def _upright_target(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """`size` as the stored image sees it, before its EXIF rotation."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except (ValueError, TypeError, OSError, SyntaxError):
        return 1  # a broken EXIF block: show the image as stored


def _reduced(image: Image.Image, target: tuple[int, int]) -> tuple[Image.Image, float | None]:
    """Box-reduce the decoded `image`, per axis, by the largest whole factor
    that keeps it at least twice `target`, so that what comes back is at most
    about four times `target` each way; and the white point of a high-depth
    image, which only the full image knows (see `_to_rgb`)."""
    white = _white_point(image)
    factors = (max(1, image.size[0] // (2 * target[0])), max(1, image.size[1] // (2 * target[1])))
    if factors == (1, 1):
        return image, white
    mode = image.mode
    if mode == "1":
        full = image.convert("L")
    elif mode.startswith("I;16"):
        full = image.convert("I")
    elif mode in ("P", "PA"):
        full = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
    else:
        full = image  # reduce() premultiplies RGBA and LA itself
    return full.reduce(factors), white


def _white_point(image: Image.Image) -> float | None:
    """The value that becomes 255: 16-bit images scale from 65535, 32-bit
    integer ones too if any value needs more than 8 bits; None otherwise."""
    if image.mode.startswith("I;16"):
        return 65535.0
    if image.mode == "I":
        top = image.getextrema()[1]
        return 65535.0 if isinstance(top, (int, float)) and top > 255 else 255.0
    return None


def _to_rgb(image: Image.Image, white: float | None) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(image, white)
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent areas show as white, as in a browser, not as whatever
        # colour happens to sit under alpha 0.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image, white: float | None) -> Image.Image:
    """16-bit and 32-bit greyscale: scale to 8 bits instead of clipping at 255
    (floats are taken as 0..255). Runs on the reduced copy: the array is small."""
    values = np.asarray(image, dtype=np.float64)
    if white is not None:
        values = values / white * 255.0
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
