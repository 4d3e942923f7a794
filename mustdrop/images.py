"""Turning whatever a user hands us into one upright RGB image, or a clear refusal.

Decoding is PIL's job; this module only decides what is acceptable and says why not.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 50_000_000     # larger images are refused before decoding (decompression bombs)
MIN_SIDE = 2


def pixel_sha256(img) -> str:
    """The hash a trace records for its image: SHA-256 of the decoded RGB pixels (the image as
    load_image returns it), so the same picture matches whatever file format or metadata it came in.
    The one definition: traces, the app's vanilla cache and the examples' ground truth all use it."""
    return hashlib.sha256(np.asarray(img).tobytes()).hexdigest()


class ImageInputError(ValueError):
    """An image that cannot be used, with a message that names the problem."""


def load_image(source) -> Image.Image:
    """Open a path, bytes, numpy array or PIL image as an upright 8-bit RGB image."""
    if source is None:
        raise ImageInputError("no image given: upload or choose an image")
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray):
        img = _from_array(source)
    else:
        if isinstance(source, (bytes, bytearray)):
            data, name = bytes(source), "the uploaded data"
        elif not isinstance(source, (str, Path)):
            raise ImageInputError(f"cannot use a {type(source).__name__} as an image: give a file path, bytes, "
                                  "a numpy array or a PIL image")
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageInputError(f"image file not found: {path}")
            data, name = path.read_bytes(), path.name
        if not data:
            raise ImageInputError(f"{name} is empty (0 bytes), not an image")
        img = _open(data, name)
    return to_rgb(img)


def _open(data: bytes, name: str) -> Image.Image:
    """Decode with this module's limits whatever PIL's globals say: another library in the process
    (lmms-eval's import sets ImageFile.LOAD_TRUNCATED_IMAGES) must not make a truncated file pass."""
    from PIL import ImageFile

    previous, previous_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = MAX_PIXELS, False
    try:
        img = Image.open(io.BytesIO(data))
        _check_size(img.size, name)
        img.load()
        return img
    except UnidentifiedImageError:
        raise ImageInputError(f"{name} is not an image PIL can read (PNG, JPEG, GIF, WebP, BMP, TIFF ...)") from None
    except Image.DecompressionBombError:
        raise ImageInputError(f"{name} is too large to decode safely (limit {MAX_PIXELS:,} pixels)") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageInputError):
            raise
        raise ImageInputError(f"{name} could not be decoded (truncated or corrupt image: {e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = previous, previous_truncated


def _check_size(size, name="the image"):
    w, h = size
    if w * h > MAX_PIXELS:
        raise ImageInputError(f"{name} is {w} x {h} pixels; images above {MAX_PIXELS:,} pixels are refused")
    if min(w, h) < MIN_SIDE:
        raise ImageInputError(f"{name} is {w} x {h} pixels; both sides must be at least {MIN_SIDE} pixels")


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise ImageInputError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.isfinite(a).all():
            raise ImageInputError("the image array holds NaN or infinite values")
        hi = 65535.0 if a.dtype == np.uint16 else (1.0 if a.max() <= 1.0 else 255.0)
        a = np.clip(a.astype(np.float64) / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return Image.fromarray(a)


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright (EXIF orientation applied), first frame, 8-bit RGB; alpha composited on white."""
    _check_size(img.size)
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")
