"""Turning whatever a user hands us into one upright RGB image, or a clear refusal.

Decoding is PIL's job; this module only decides what is acceptable and says why not. Every limit
is checked on the size PIL reads from the file's header, before a pixel is decoded: the size in
pixels (decompression bombs), the aspect ratio, and the size the model's image processor would
resize the image to (``processed_pixels``): a 758-byte 2 x 100000 PNG is cheap to decode, but
CLIP's shortest-edge resize makes it 336 x 16,800,000 pixels (gigabytes).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 50_000_000     # larger images are refused before decoding (decompression bombs)
MIN_SIDE = 2
# Long side : short side. Phone panoramas stop near 10:1 (a 360-degree sweep at a 36-degree vertical
# field); 20:1 keeps them and long screenshots of up to 20 screens' width with a factor 2 to spare.
# CLIP's shortest-edge resize then makes at most 336 x 6720 pixels (2.3 M, 27 MB as float32).
MAX_ASPECT = 20
# Pixels the image processor may make of one image (all its resized copies together). The published
# configs reach 0.15 M (SigLIP 384 x 384), 0.56 M (LLaVA-NeXT: 672 x 672 plus the 336 x 336 base
# image), 2.3 M (CLIP-336 at 20:1); Qwen2-VL's published max_pixels is 12,845,056. 16 M pixels are
# 200 MB as float32: a processor setting we have not met cannot take the machine.
MAX_PROCESSED_PIXELS = 16_777_216


def pixel_sha256(img) -> str:
    """The hash a trace records for its image: SHA-256 of the decoded RGB pixels (the image as
    load_image returns it), so the same picture matches whatever file format or metadata it came in.
    The one definition: traces, the app's vanilla cache and the examples' ground truth all use it."""
    return hashlib.sha256(np.asarray(img).tobytes()).hexdigest()


class ImageInputError(ValueError):
    """An image that cannot be used, with a message that names the problem."""


def load_image(source, processor=None) -> Image.Image:
    """Open a path, bytes, numpy array or PIL image as an upright 8-bit RGB image.

    ``processor``: the model's processor (or image processor); with it, an image it would resize to
    more than MAX_PROCESSED_PIXELS is refused before decoding."""
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
        img = _open(data, name, processor)
    return to_rgb(img, processor)


def _open(data: bytes, name: str, processor=None) -> Image.Image:
    """Decode with this module's limits whatever PIL's globals say: another library in the process
    (lmms-eval's import sets ImageFile.LOAD_TRUNCATED_IMAGES) must not make a truncated file pass."""
    from PIL import ImageFile

    previous, previous_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = MAX_PIXELS, False
    try:
        img = Image.open(io.BytesIO(data))
        _check_size(img.size, name, processor)      # from the header: nothing is decoded yet
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


def _check_size(size, name="the image", processor=None):
    w, h = size
    if w * h > MAX_PIXELS:
        raise ImageInputError(f"{name} is {w} x {h} pixels; images above {MAX_PIXELS:,} pixels are refused")
    if min(w, h) < MIN_SIDE:
        raise ImageInputError(f"{name} is {w} x {h} pixels; both sides must be at least {MIN_SIDE} pixels")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageInputError(f"{name} is {w} x {h} pixels: aspect ratio {_ratio(w, h)} exceeds the limit of "
                              f"{MAX_ASPECT}:1 (the model would see a sliver of it); crop it to a less elongated part")
    if processor is not None:
        sizes = processed_sizes(processor, w, h)
        total = sum(pw * ph for pw, ph in sizes)
        if total > MAX_PROCESSED_PIXELS:
            made = " + ".join(f"{pw} x {ph}" for pw, ph in sizes)
            raise ImageInputError(f"{name} is {w} x {h} pixels: the model's image processor would resize it to {made} "
                                  f"({total:,} pixels), above the limit of {MAX_PROCESSED_PIXELS:,}")


def _ratio(w, h) -> str:
    r = max(w, h) / min(w, h)
    return f"{r:.0f}:1" if r >= 10 else f"{r:.1f}:1"


def processed_sizes(processor, w: int, h: int) -> list[tuple[int, int]]:
    """(width, height) of every image the processor resizes a w x h image to, from its own settings and
    transformers' own size functions (no pixel is touched):

    - any-res (LLaVA-NeXT, ``image_grid_pinpoints``): the best pinpoint resolution (the resized image
      padded to it) and the base image at the processor's size;
    - min/max pixels (Qwen2-VL, ``merge_size``; size.shortest_edge / longest_edge are pixel counts there):
      transformers' smart_resize;
    - otherwise the backend's resize rules: shortest_edge (+ longest_edge), max_height / max_width, or a
      fixed height x width (SigLIP); a centre crop after the resize does not lower the peak, so it is
      not counted.
    """
    ip = getattr(processor, "image_processor", processor)
    size = getattr(ip, "size", None)
    if size is None or not getattr(ip, "do_resize", True):
        return [(w, h)]
    get = (lambda k: getattr(size, k, None)) if not isinstance(size, dict) else size.get
    pinpoints = getattr(ip, "image_grid_pinpoints", None)
    if pinpoints:
        from transformers.image_processing_utils import select_best_resolution

        bh, bw = select_best_resolution((h, w), pinpoints)
        base = (get("width"), get("height")) if get("height") and get("width") else (get("shortest_edge"),) * 2
        return [(int(bw), int(bh)), tuple(int(x) for x in base)]
    if getattr(ip, "merge_size", None) and getattr(ip, "patch_size", None):
        import importlib

        module = importlib.import_module(type(ip).__module__)
        rh, rw = module.smart_resize(h, w, factor=ip.patch_size * ip.merge_size,
                                     min_pixels=get("shortest_edge") or get("min_pixels"),
                                     max_pixels=get("longest_edge") or get("max_pixels"))
        return [(int(rw), int(rh))]
    return [_backend_resize(get, w, h)]


def _backend_resize(get, w, h) -> tuple[int, int]:
    """What transformers' backend ``resize`` makes of a w x h image for these size settings."""
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.image_utils import ChannelDimension, get_image_size_for_max_height_width

    if get("shortest_edge") and get("longest_edge"):
        rh, rw = get_size_with_aspect_ratio((h, w), get("shortest_edge"), get("longest_edge"))
    elif get("shortest_edge"):
        shape_only = np.broadcast_to(np.zeros(1, bool), (1, h, w))      # a size, no memory
        rh, rw = get_resize_output_image_size(shape_only, get("shortest_edge"), default_to_square=False,
                                              input_data_format=ChannelDimension.FIRST)
    elif get("max_height") and get("max_width"):
        rh, rw = get_image_size_for_max_height_width((h, w), get("max_height"), get("max_width"))
    elif get("height") and get("width"):
        rh, rw = get("height"), get("width")
    else:
        return (w, h)
    return (int(rw), int(rh))


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


def to_rgb(img: Image.Image, processor=None) -> Image.Image:
    """Upright (EXIF orientation applied), first frame, 8-bit RGB; alpha composited on white."""
    _check_size(img.size, processor=processor)
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = ImageOps.exif_transpose(img) or img
    if processor is not None:
        _check_size(img.size, processor=processor)        # turned upright: the processor sees it so
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")
