"""Canvas geometry: the image as the model saw it, patch cells on it, painting and reading back.

Every overlay is the image as the model saw it (the processor's resize + crop/pad, from the crop's
mapping record), scaled to ``rows * cell`` x ``cols * cell`` pixels (the crop's grid as the trace
records it: square for LLaVA-1.5 / NeXT crops, any (rows, cols) otherwise), patch (row, col) occupying
``[row*cell, (row+1)*cell) x [col*cell, (col+1)*cell)``. Each cell is tinted with its category
colour (alpha blended: ``base + (colour - base) * alpha``, the alpha from the overlay's opacity
and the category's weight, see :mod:`mustdrop.vis.palette`) and carries a centre dot of ``dot`` x ``dot`` pixels in the EXACT colour, so
a test (or a curious user) reads every decision back from the pixels with :func:`decode_categories`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .palette import BACKGROUND


@dataclass(frozen=True)
class Geometry:
    rows: int
    cols: int
    cell: int

    @property
    def grid(self) -> int:
        """The side of a square grid (rows; the views that assume square crops read this)."""
        return self.rows

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def size(self) -> int:
        """Canvas height in pixels (its width too for a square grid; see ``width``)."""
        return self.rows * self.cell

    @property
    def width(self) -> int:
        return self.cols * self.cell

    @property
    def dot(self) -> int:
        return max(3, self.cell // 3)

    def centre(self, row: int, col: int) -> tuple[int, int]:
        """(y, x) of the centre pixel of a patch cell."""
        return row * self.cell + self.cell // 2, col * self.cell + self.cell // 2

    def patch_at(self, x: float, y: float) -> tuple[int, int] | None:
        """(row, col) of the canvas pixel (x, y), or None outside the grid."""
        col, row = int(x) // self.cell, int(y) // self.cell
        if 0 <= row < self.rows and 0 <= col < self.cols and x >= 0 and y >= 0:
            return row, col
        return None


def geometry(trace, target: int = 672, crop: int = 0) -> Geometry:
    """Cells sized so that the crop's longer side is about ``target`` pixels."""
    rows, cols = trace.crop_grid(crop)
    return Geometry(rows, cols, max(8, int(round(target / max(rows, cols)))))


def geometry_of_canvas(trace, canvas: np.ndarray, crop: int = 0) -> Geometry:
    """The geometry of a ready canvas of the crop (its height sets the cell)."""
    rows, cols = trace.crop_grid(crop)
    return Geometry(rows, cols, max(1, canvas.shape[0] // rows))


def processed_wh(m: dict, default: int) -> tuple[float, float]:
    """(width, height) in pixels of the crop the processor produced: a mapping's ``processed`` is one
    side (square crops) or [width, height]."""
    p = m.get("processed") or default
    if isinstance(p, (list, tuple)) and len(p) == 2:
        return float(p[0]), float(p[1])
    return float(p), float(p)


def scale_xy(m: dict) -> tuple[float, float]:
    """(sx, sy) of a mapping record: its scale_xy when the resize squashes, else the one scale."""
    sxy = m.get("scale_xy")
    if isinstance(sxy, (list, tuple)) and len(sxy) == 2:
        return float(sxy[0]), float(sxy[1])
    return float(m["scale"]), float(m["scale"])


def model_view(image, trace, size: int | None = None, crop: int = 0) -> np.ndarray:
    """The image as the model saw it (processor resize + centre crop or pad), as a size x size RGB array.

    ``image`` is a PIL image or an (H, W, 3) uint8 array of the ORIGINAL image of the run; None gives
    a flat grey canvas (a trace replayed without its image).
    """
    import cv2

    m = trace.crop_mapping(crop)
    pw, ph = processed_wh(m, trace.meta["model"]["vision"]["image_size"])
    size = size or int(pw)
    height = int(round(size * ph / pw))
    if image is None:
        return np.full((height, size, 3), BACKGROUND, np.uint8)
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    a = np.ascontiguousarray(a[:, :, :3]).astype(np.uint8)
    k = size / pw
    sx, sy = (v * k for v in scale_xy(m))
    ox, oy = (float(v) * k for v in m["offset"])
    M = np.array([[sx, 0, ox], [0, sy, oy]], np.float64)
    interp = cv2.INTER_AREA if min(sx, sy) < 1 else cv2.INTER_LINEAR
    return cv2.warpAffine(a, M, (size, height), flags=interp, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=BACKGROUND)


def base_canvas(image, trace, geom: Geometry | None = None, view: np.ndarray | None = None,
                crop: int = 0) -> np.ndarray:
    """The model-view image at canvas size, slightly dimmed so overlay colours read well.

    ``view`` is a ready model view (from :func:`model_view`) to use instead of ``image``.
    """
    import cv2

    geom = geom or geometry(trace, crop=crop)
    if view is not None:
        v = cv2.resize(np.ascontiguousarray(view[:, :, :3]).astype(np.uint8), (geom.width, geom.size),
                       interpolation=cv2.INTER_AREA if view.shape[0] > geom.size else cv2.INTER_LINEAR)
    else:
        v = model_view(image, trace, geom.width, crop)
    return (v.astype(np.float32) * 0.85).astype(np.uint8)


def original_box(trace, row: int, col: int, crop: int = 0):
    """(x0, y0, x1, y1) of a patch in the original image's pixels (clipped to it), from the mapping."""
    try:
        m = trace.crop_mapping(crop)
        rows, cols = trace.crop_grid(crop)
        pw, ph = processed_wh(m, 0)
        px, py = pw / cols, ph / rows
        sx, sy = scale_xy(m)
        ox, oy = (float(v) for v in m["offset"])
        w, h = trace.meta["input"]["image"]["width"], trace.meta["input"]["image"]["height"]
    except (KeyError, TypeError, ValueError):
        return None
    if sx <= 0 or sy <= 0:
        return None
    x0, x1 = (col * px - ox) / sx, ((col + 1) * px - ox) / sx
    y0, y1 = (row * py - oy) / sy, ((row + 1) * py - oy) / sy
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
    return None if x1 <= x0 or y1 <= y0 else (x0, y0, x1, y1)


# ----------------------------------------------------------------------------- painting
_DOT_MASKS: dict = {}


def _dot_mask(geom: Geometry) -> np.ndarray:
    if geom not in _DOT_MASKS:
        c, d = geom.cell, geom.dot
        lo = c // 2 - d // 2
        mask = np.zeros((c, c), bool)
        mask[lo:lo + d, lo:lo + d] = True
        _DOT_MASKS[geom] = np.tile(mask, (geom.rows, geom.cols))
    return _DOT_MASKS[geom]


def upscale(a: np.ndarray, geom: Geometry) -> np.ndarray:
    """Nearest-neighbour upscale of a (rows, cols[, k]) map to the canvas (rows*cell, cols*cell[, k])."""
    import cv2

    return cv2.resize(np.ascontiguousarray(a), (geom.width, geom.size), interpolation=cv2.INTER_NEAREST)


def paint(base: np.ndarray, geom: Geometry, colours: np.ndarray, alpha: np.ndarray | float = 0.45,
          dots: np.ndarray | None = None) -> np.ndarray:
    """Tint each patch cell with colours[r, c] (rows, cols, 3) at alpha, then paint exact centre dots.

    ``dots`` (rows, cols) bool says which cells get a dot (default all). Returns a new uint8 array.
    """
    c = geom.cell
    col = upscale(colours.astype(np.uint8), geom)
    a = np.asarray(alpha, np.float32)
    if a.ndim == 2:
        a = upscale(a, geom)[:, :, None]
    out = base.astype(np.float32)
    out += (col.astype(np.float32) - out) * a
    out = (out + 0.5).astype(np.uint8)
    out[::c] = out[::c] // 4 * 3          # faint grid lines
    out[:, ::c] = out[:, ::c] // 4 * 3
    m = _dot_mask(geom)
    if dots is not None:
        m = m & upscale(dots.astype(np.uint8), geom).astype(bool)
    out[m] = col[m]
    return out


def outline(img: np.ndarray, geom: Geometry, cells: np.ndarray, colour, width: int = 2, inset: int = 0) -> np.ndarray:
    """Draw a square border of ``width`` pixels in ``colour`` inside every cell where cells[r, c],
    ``inset`` pixels in from the cell's edge."""
    c = geom.cell
    w = max(1, min(width, c // 4))
    i = max(0, min(int(inset), c // 2 - w - 1))
    ring = np.zeros((c, c), bool)
    ring[i:c - i, i:c - i] = True
    ring[i + w:c - i - w, i + w:c - i - w] = False
    m = np.tile(ring, (geom.rows, geom.cols)) & np.repeat(np.repeat(cells.astype(bool), c, 0), c, 1)
    img = img.copy()
    img[m] = colour
    return img


def decode_dots(img: np.ndarray, geom: Geometry) -> np.ndarray:
    """(rows, cols, 3) colours of the centre pixel of each patch cell."""
    ys = np.arange(geom.rows) * geom.cell + geom.cell // 2
    xs = np.arange(geom.cols) * geom.cell + geom.cell // 2
    return np.asarray(img)[ys][:, xs, :3]


def decode_categories(img: np.ndarray, geom: Geometry, palette: dict) -> np.ndarray:
    """(rows, cols) category code whose exact colour sits at each cell centre; -99 where none matches."""
    dots = decode_dots(img, geom).astype(np.int32)
    out = np.full((geom.rows, geom.cols), -99, np.int64)
    for code, rgb in palette.items():
        out[(dots == np.array(rgb)).all(-1)] = code
    return out
