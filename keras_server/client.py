"""Client side: shrink a large photo before it is uploaded.

A 12 MP phone photo is 3-5 MB on the wire and tens of milliseconds of the
server's CPU to decode, yet the model sees 224x224. `downscale_for_upload`
(used by `simple_request.py --downscale`; the upload page does the same in
JavaScript) sends instead a JPEG whose sides are still at least twice the
model's input, which leaves the server's bicubic resize the same smoothing
to do. Anything it cannot shrink faithfully goes as it is.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

# Modes that become RGB without a judgement call (16-bit, CMYK and the rest
# are left to the server, which knows how to scale them).
_SIMPLE_MODES = frozenset({"RGB", "L", "P", "RGBA", "LA", "PA"})
JPEG_QUALITY = 90


def downscale_for_upload(data: bytes, input_size: tuple[int, int]) -> bytes:
    """`data` re-encoded as a JPEG no smaller than twice `input_size` (w, h)
    each way, EXIF rotation applied, transparency on white; or `data` itself
    when it is already that small, or not an image this can shrink."""
    floor = (2 * input_size[0], 2 * input_size[1])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.mode not in _SIMPLE_MODES:
                    return data
                turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
                width, height = image.size[::-1] if turned else image.size
                scale = max(floor[0] / width, floor[1] / height)
                if scale >= 1:
                    return data
                size = (max(floor[0], round(width * scale)), max(floor[1], round(height * scale)))
                # A JPEG decodes at the smallest DCT scale still >= size.
                image.draft(image.mode, size[::-1] if turned else size)
                upright = ImageOps.exif_transpose(image)
                small = upright.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
                rgb = _on_white(small)
                buffer = io.BytesIO()
                rgb.save(buffer, "JPEG", quality=JPEG_QUALITY)
                return buffer.getvalue()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return data  # the server gives the precise error


def _on_white(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
