"""The asked objects of a sample given by its table row: boxes or a mask in the original image's
pixels, turned into the per-patch coverage the failure attribution and the recall read.

Why: the scene world knows its objects' pixels; any other dataset can say where the asked objects
are only in its own rows. A box is just a mask: the row's boxes (``object_boxes``) and mask file
(``object_mask``) are rasterised into one boolean mask of the original image, and each patch's
coverage is the share of its pixels in the original image (its box there, through the trace's own
mapping, :func:`mustdrop.vis.geometry.original_box`) that the mask covers, as the scene world's
``patch_fractions`` is on its 336-pixel images (where the two agree exactly).

The row is untrusted: boxes must be a list of at most MAX_BOXES [x0, y0, x1, y1] finite numbers with
x0 < x1 and y0 < y1 (clipped to the image), the mask a PNG inside the run folder of exactly the
image's size. A row that breaks a rule gives no mask (the sample gets every other view) and a
note naming the field, never an exception.
"""

from __future__ import annotations

import json
import math

import numpy as np

MAX_BOXES = 256
MAX_MASK_BYTES = 64 << 20
MAX_MASK_PIXELS = 16_000_000     # the largest image a supported processor takes (mustdrop.images)
BOXES, MASK = "object_boxes", "object_mask"


class ObjectsError(ValueError):
    """A row's object_boxes / object_mask that cannot be used, with a message naming the field."""


def parse_boxes(value, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The row's ``object_boxes`` as integer pixel boxes clipped to the image (partly covered pixels
    count as covered). ``value``: a list, or its JSON text (CSV-friendly tables)."""
    if isinstance(value, str):
        if len(value) > 64 * MAX_BOXES:
            raise ObjectsError(f"{BOXES}: the text is {len(value)} characters; too long")
        try:
            value = json.loads(value)
        except ValueError:
            raise ObjectsError(f"{BOXES}: not JSON") from None
    if not isinstance(value, (list, tuple)):
        raise ObjectsError(f"{BOXES}: expected a list of [x0, y0, x1, y1], got {type(value).__name__}")
    if len(value) > MAX_BOXES:
        raise ObjectsError(f"{BOXES}: {len(value)} boxes; at most {MAX_BOXES}")
    out = []
    for n, box in enumerate(value):
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise ObjectsError(f"{BOXES}[{n}]: expected four numbers [x0, y0, x1, y1]")
        if not all(math.isfinite(v) for v in box):
            raise ObjectsError(f"{BOXES}[{n}]: not a finite number")
        x0, y0, x1, y1 = (float(v) for v in box)
        if x1 <= x0 or y1 <= y0:
            raise ObjectsError(f"{BOXES}[{n}]: needs x0 < x1 and y0 < y1")
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
        b = (int(math.floor(x0)), int(math.floor(y0)), int(math.ceil(x1)), int(math.ceil(y1)))
        if b[2] > b[0] and b[3] > b[1]:          # a box wholly outside the image covers nothing
            out.append(b)
    return out


def read_mask(path, width: int, height: int) -> np.ndarray:
    """A mask PNG (any mode; nonzero = object) of exactly width x height pixels -> (H, W) bool."""
    from PIL import Image

    from ..images import MAX_PIXELS

    if path is None or not path.is_file():
        raise ObjectsError(f"{MASK}: not a file inside the run folder")
    if path.stat().st_size > MAX_MASK_BYTES:
        raise ObjectsError(f"{MASK}: the file is over {MAX_MASK_BYTES >> 20} MB")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise ObjectsError(f"{MASK}: not a PNG")
            if im.size != (width, height):
                raise ObjectsError(f"{MASK}: {im.size[0]} x {im.size[1]} pixels; the image is {width} x {height}")
            a = np.asarray(im.convert("L")) > 0
    except ObjectsError:
        raise
    except Exception:  # noqa: BLE001 - any undecodable file (truncated, bomb) is one message
        raise ObjectsError(f"{MASK}: not a readable PNG") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return a


def pixel_mask(boxes, mask, width: int, height: int) -> np.ndarray:
    """The union of the boxes and the mask as one (H, W) bool mask of the original image."""
    pix = np.zeros((height, width), bool) if mask is None else mask.copy()
    for x0, y0, x1, y1 in boxes:
        pix[y0:y1, x0:x1] = True
    return pix


def patch_coverage(trace, pix: np.ndarray, crop: int = 0) -> np.ndarray:
    """(rows, cols) float32: the share of each patch's original-image pixels the mask covers (0 for
    a patch that shows no pixel of the image, e.g. padding), through the trace's mapping."""
    from ..vis.geometry import original_box

    rows, cols = trace.crop_grid(crop)
    h, w = pix.shape
    integral = np.zeros((h + 1, w + 1), np.int32)        # counts up to MAX_MASK_PIXELS fit
    integral[1:, 1:] = pix.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
    out = np.zeros((rows, cols), np.float32)
    for r in range(rows):
        for c in range(cols):
            box = original_box(trace, r, c, crop)
            if box is None:
                continue
            x0, y0 = int(round(box[0])), int(round(box[1]))
            x1, y1 = min(w, int(round(box[2]))), min(h, int(round(box[3])))
            if x1 <= x0 or y1 <= y0:
                continue
            s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
            out[r, c] = s / ((x1 - x0) * (y1 - y0))
    return out


def scene_coverage(trace, scene, ids=None) -> np.ndarray:
    """Patch coverage (crop 0) of a scene-world scene's objects ``ids`` (all when None). The scene
    stores it for its 24 x 24 grid of 14-pixel patches on its 336-pixel image, which is the trace's
    grid wherever the two shapes agree; any other grid (OneVision's 27 x 27 base crop, a Qwen image
    resized) gets the objects' pixel masks through the trace's own mapping."""
    stored = scene.union_patch_mask(None if ids is None else list(ids)).astype(np.float32)
    if stored.shape == trace.crop_grid(0):
        return stored
    chosen = scene.objects if ids is None else [scene.objects[i] for i in ids]
    pix = np.zeros(scene.image.shape[:2], bool)
    for o in chosen:
        pix |= o.pixel_mask
    return patch_coverage(trace, pix, 0)


def row_coverage(ts, row: dict, trace) -> np.ndarray | None:
    """Patch coverage (crop 0) of the asked objects a row gives, or None when it gives none.
    Raises ObjectsError naming the field when what it gives cannot be used."""
    boxes, mask = _present(row.get(BOXES)), _present(row.get(MASK))
    if boxes is None and mask is None:
        return None
    img = trace.meta["input"]["image"]
    width, height = int(img["width"]), int(img["height"])
    if not 0 < width * height <= MAX_MASK_PIXELS:
        raise ObjectsError(f"{BOXES}/{MASK}: the image is {width} x {height} pixels; masks are drawn up to "
                           f"{MAX_MASK_PIXELS:,}")
    parsed = parse_boxes(boxes, width, height) if boxes is not None else []
    m = None
    if mask is not None:
        if not isinstance(mask, str):
            raise ObjectsError(f"{MASK}: expected a path inside the run folder")
        m = read_mask(ts.path_of(mask), width, height)
    cov = patch_coverage(trace, pixel_mask(parsed, m, width, height), 0)
    return cov if cov.any() else None          # nothing of the image marked: as if no mask was given


def _present(v):
    """None for a missing cell (pandas fills absent columns with None or NaN)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v
