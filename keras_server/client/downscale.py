"""Client side: shrink a large photo before it is uploaded.

A 12 MP phone photo is 3-5 MB on the wire and tens of milliseconds of the
server's CPU to decode, yet the model sees 224x224. `downscale_for_upload`
(used by `simple_request.py --downscale` and `keras-server classify`; the
upload page shrinks with a canvas in JavaScript) sends instead a JPEG whose
sides are still at least twice the model's input.

It shrinks only by a whole factor, as the server's own decode does
(keras_server.images): a JPEG is decoded at 1/2, 1/4 or 1/8 scale
(libjpeg's DCT scaling, Pillow's draft()), anything else is box-reduced
(Pillow's reduce()), and no resampling pass follows. That is the cheapest
shrink there is (a 12 MP JPEG costs a quarter-scale decode and a small
encode: no full decode, no Lanczos), and the server then resizes the pixels
it would have got from the original itself, less the re-encode's loss. A
photo no whole factor can shrink (a side under four times the model's
input) is already small and goes as it is, as does anything this cannot
shrink faithfully.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

# Modes that become RGB without a judgement call (16-bit, CMYK and the rest
# are left to the server, which knows how to scale them).
_SIMPLE_MODES = frozenset({"RGB", "L", "P", "RGBA", "LA", "PA"})
_JPEG = frozenset({"JPEG", "MPO"})
JPEG_QUALITY = 90


def downscale_for_upload(data: bytes, input_size: tuple[int, int]) -> bytes:
    """`data` re-encoded as a JPEG shrunk by the largest whole factor (a JPEG's
    DCT scale, or a box reduction) that keeps it at least twice `input_size`
    (w, h) each way, EXIF rotation applied, transparency on white; or `data`
    itself when no such factor shrinks it, or it is not an image this can
    shrink."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.mode not in _SIMPLE_MODES:
                    return data
                width, height = image.size
                upright_floor = (2 * input_size[0], 2 * input_size[1])
                turned_floor = upright_floor[::-1]
                if max(_factor(image.size, upright_floor), _factor(image.size, turned_floor)) < 2:
                    # Already small, either way up: the server decodes it as
                    # cheaply as it would the re-encode. (Decided before
                    # getexif(), which decodes a whole PNG.)
                    return data
                turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
                floor = turned_floor if turned else upright_floor  # the file's own way up
                factor = _factor(image.size, floor)
                if factor < 2:
                    return data
                if image.format in _JPEG:
                    # The smallest DCT scale still >= floor each way: the
                    # decode itself shrinks, by 2, 4 or 8.
                    image.draft(image.mode, floor)
                    if image.size == (width, height):
                        return data
                    image.load()
                    small = image
                else:
                    small = _box_reduced(image, factor)
                small = ImageOps.exif_transpose(small, in_place=False) if turned else small
                rgb = _on_white(small)
                buffer = io.BytesIO()
                rgb.save(buffer, "JPEG", quality=JPEG_QUALITY)
                return buffer.getvalue()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return data  # the server gives the precise error


def _factor(size: tuple[int, int], floor: tuple[int, int]) -> int:
    """The largest whole factor that keeps `size` at least `floor` each way."""
    return min(size[0] // floor[0], size[1] // floor[1])


def _box_reduced(image: Image.Image, factor: int) -> Image.Image:
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "PA":
        image = image.convert("RGBA")
    return image.reduce(factor)  # premultiplies RGBA and LA itself


def _on_white(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
