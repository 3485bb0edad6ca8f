"""Turn an uploaded file into the model's input image, with Pillow.

Whatever the file holds (any mode, EXIF-rotated, animated, 16-bit,
transparent) comes out as an RGB uint8 array of the requested size, or as an
ImageError a person can read.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED = "JPEG, PNG, GIF, BMP, TIFF or WebP"


class ImageError(ValueError):
    """The upload cannot be used as an image; `status` is the HTTP status."""

    status = 400


class ImageTooLarge(ImageError):
    status = 413


def load_image(data: bytes, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """Decode `data` into a (height, width, 3) uint8 array of `size` (w, h)."""
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; Pillow's warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageTooLarge(
                        f"the image has too many pixels: {width}x{height} = {width * height:,}; "
                        f"the limit is {max_pixels:,}"
                    )
                # A JPEG can be decoded at 1/2..1/8 scale for a fraction of the
                # cost; keep at least twice the target so resizing still smooths.
                image.draft(image.mode, (2 * size[0], 2 * size[1]))
                upright = ImageOps.exif_transpose(image)
                rgb = _to_rgb(upright)
                return np.asarray(rgb.resize(size, Image.Resampling.BICUBIC), dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"the image has too many pixels ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError(f"the file is not an image we can read ({SUPPORTED})") from None
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        # Pillow reports truncated and corrupt data through all of these.
        raise ImageError(f"the image is truncated or corrupt ({exc})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(image)
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent areas show as white, as in a browser, not as whatever
        # colour happens to sit under alpha 0.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale: scale to 8 bits instead of clipping at 255."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode != "F":
        top = 65535.0 if values.max(initial=0) > 255 or "16" in image.mode else 255.0
        values = values / top * 255.0
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
