"""Trace -> pictures: per-stage overlays, heatmaps, the token-count curve, answers, slide figures.

Everything here reads a :class:`mustdrop.trace.Trace` (and, for the background only, the image the
run saw); nothing touches a model. The ``patch.*`` maps of the trace are already in original-patch
coordinates (G x G), so no view re-maps token ids.

Canvas geometry (every overlay): the image as the model saw it (the processor's resize + crop/pad,
taken from the crop's mapping record, ``meta["crops"][c]["mapping"]`` or ``meta["input"]["mapping"]``;
LLaVA-NeXT traces hold a base image and tiles, every view takes ``crop=``), scaled to a square of
``G * cell`` pixels, patch
(row, col) occupying ``[row*cell, (row+1)*cell) x [col*cell, (col+1)*cell)``. Each patch cell is
tinted with its category colour (alpha blended) and carries a centre dot of ``dot`` x ``dot``
pixels painted in the EXACT category colour, so a test (or a curious user) can read every
decision back from the pixels: :func:`decode_dots` does that. Colours are colour-blind-safe
(Okabe-Ito for categories, viridis / cividis for scores).

From the shell: ``python -m mustdrop.vis TRACE [--vanilla V] [--image IMG] --out DIR`` writes the
slide figure (PNG + PDF) of a stored trace.
"""

from __future__ import annotations

import hashlib
import html
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import accounting
from .stages import DROPPED, KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY, STATUS_NAMES

# ----------------------------------------------------------------------------- colours
# Okabe-Ito, colour-blind safe. Every category colour is unique so that pixels decode unambiguously.
NOT_ENTERING = -1
STATUS_COLOURS: dict[int, tuple[int, int, int]] = {
    KEPT_BOTH: (0, 114, 178),          # blue
    KEPT_GLOBAL: (86, 180, 233),       # sky blue
    KEPT_INDIVIDUAL: (0, 158, 115),    # bluish green
    KEPT_KEY: (240, 228, 66),          # yellow
    DROPPED: (213, 94, 0),             # vermillion
    NOT_ENTERING: (96, 96, 96),        # dark grey: dropped at an earlier prune layer
}
STATUS_LABELS = dict(STATUS_NAMES)
STATUS_LABELS[NOT_ENTERING] = "not entering: dropped at an earlier prune layer"

NO_TOKEN_CODE = -2
NO_TOKEN = (0, 0, 0)                   # black: the patch reaches the LLM in no token (LLaVA-NeXT tile padding)
NO_TOKEN_LABEL = "no token: padding the processor removed (LLaVA-NeXT unpadding)"

KV_CACHED, KV_TRIMMED, KV_ABSENT = 1, 2, 0
KV_COLOURS = {
    KV_CACHED: (0, 114, 178),          # blue: in this layer's KV cache after prefill
    KV_TRIMMED: (230, 159, 0),         # orange: processed in prefill, removed by the stage-3 trim
    KV_ABSENT: (96, 96, 96),           # grey: dropped before this layer in prefill, never cached
}
KV_LABELS = {
    KV_CACHED: "cached: this layer keeps the patch's K/V for decoding",
    KV_TRIMMED: "trimmed (stage 3): processed in prefill, then removed from this layer's cache",
    KV_ABSENT: "absent: dropped before this layer (stage 2), never computed here",
}
KEY_OUTLINE = (255, 255, 255)
UNMERGED_DOT = (255, 255, 255)
NAN_COLOUR = (96, 96, 96)
SELECT_OUTLINE = (255, 0, 255)
GT_OUTLINE = (255, 255, 255)
BACKGROUND = (150, 150, 150)           # canvas when the run's image is not at hand (trace replay)

HEATMAPS = {  # name -> (patch map, colormap, log scale, title)
    "similarity": ("similarity", "viridis", False, "Stage 1a: window similarity (mean pairwise cosine)"),
    "cls_attention": ("cls_attention", "cividis", True, "Stage 1b: CLS attention (head mean, log scale)"),
    "global_share": (None, "viridis", True, "Stage 2: global share (log scale)"),
    "individual_max": (None, "viridis", True, "Stage 2: individual max (log scale)"),
}


def _lut(name: str) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return np.round(cmap(np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


_LUTS: dict[str, np.ndarray] = {}


def lut(name: str) -> np.ndarray:
    """(256, 3) uint8 colours of a matplotlib colormap (the exact colours heatmap dots use)."""
    if name not in _LUTS:
        _LUTS[name] = _lut(name)
    return _LUTS[name]


def group_colour(token: int) -> tuple[int, int, int]:
    """ToMe-style random colour of a merge group, fixed per merged-token id (bright, never grey)."""
    rng = np.random.default_rng(1000 + int(token))
    hue = rng.random()
    sat = 0.55 + 0.45 * rng.random()
    val = 0.75 + 0.25 * rng.random()
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    grid: int
    cell: int

    @property
    def size(self) -> int:
        return self.grid * self.cell

    @property
    def dot(self) -> int:
        return max(3, self.cell // 3)

    def centre(self, row: int, col: int) -> tuple[int, int]:
        """(y, x) of the centre pixel of a patch cell."""
        return row * self.cell + self.cell // 2, col * self.cell + self.cell // 2

    def patch_at(self, x: float, y: float) -> tuple[int, int] | None:
        """(row, col) of the canvas pixel (x, y), or None outside the grid."""
        col, row = int(x) // self.cell, int(y) // self.cell
        if 0 <= row < self.grid and 0 <= col < self.grid and x >= 0 and y >= 0:
            return row, col
        return None


def geometry(trace, target: int = 672) -> Geometry:
    g = trace.grid
    return Geometry(g, max(8, int(round(target / g))))


def n_crops(trace) -> int:
    """How many crops (images the vision tower saw) the trace holds: 1, or base + tiles for LLaVA-NeXT."""
    crops = trace.meta.get("crops")
    return len(crops) if isinstance(crops, list) and crops else 1


def crop_name(trace, crop: int = 0) -> str:
    crops = trace.meta.get("crops")
    if isinstance(crops, list) and 0 <= crop < len(crops) and isinstance(crops[crop], dict):
        return str(crops[crop].get("name", f"crop {crop}"))
    return "image"


def crop_mapping(trace, crop: int = 0) -> dict:
    """processed (u, v) = (x * sx + ox, y * sy + oy) of one crop, from the trace's mapping record."""
    crops = trace.meta.get("crops")
    if isinstance(crops, list) and 0 <= crop < len(crops) and isinstance(crops[crop], dict) \
            and isinstance(crops[crop].get("mapping"), dict):
        return crops[crop]["mapping"]
    return trace.meta["input"]["mapping"]


def _scale_xy(m: dict) -> tuple[float, float]:
    sxy = m.get("scale_xy")
    if isinstance(sxy, (list, tuple)) and len(sxy) == 2:
        return float(sxy[0]), float(sxy[1])
    return float(m["scale"]), float(m["scale"])


def pmap(trace, name: str, crop: int = 0) -> np.ndarray:
    """A patch map (G x G, or L x G x G for kv_cached) of one crop: ``patch.NAME`` or ``patch.c{crop}.NAME``."""
    pre = "patch." if crop == 0 else f"patch.c{crop}."
    return trace.arrays[pre + name]


def has_pmap(trace, name: str, crop: int = 0) -> bool:
    return (("patch." if crop == 0 else f"patch.c{crop}.") + name) in trace.arrays


def model_view(image, trace, size: int | None = None, crop: int = 0) -> np.ndarray:
    """The image as the model saw it (processor resize + centre crop or pad), as a size x size RGB array.

    ``image`` is a PIL image or an (H, W, 3) uint8 array of the ORIGINAL image of the run; None gives
    a flat grey canvas (a trace replayed without its image).
    """
    import cv2

    m = crop_mapping(trace, crop)
    processed = int(m.get("processed") or trace.meta["model"]["vision"]["image_size"])
    size = size or processed
    if image is None:
        return np.full((size, size, 3), BACKGROUND, np.uint8)
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    a = np.ascontiguousarray(a[:, :, :3]).astype(np.uint8)
    k = size / processed
    sx, sy = (v * k for v in _scale_xy(m))
    ox, oy = (float(v) * k for v in m["offset"])
    M = np.array([[sx, 0, ox], [0, sy, oy]], np.float64)
    interp = cv2.INTER_AREA if min(sx, sy) < 1 else cv2.INTER_LINEAR
    return cv2.warpAffine(a, M, (size, size), flags=interp, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=BACKGROUND)


def base_canvas(image, trace, geom: Geometry | None = None, view: np.ndarray | None = None,
                crop: int = 0) -> np.ndarray:
    """The model-view image at canvas size, slightly dimmed so overlay colours read well.

    ``view`` is a ready model view (from :func:`model_view`) to use instead of ``image``.
    """
    import cv2

    geom = geom or geometry(trace)
    if view is not None:
        v = cv2.resize(np.ascontiguousarray(view[:, :, :3]).astype(np.uint8), (geom.size, geom.size),
                       interpolation=cv2.INTER_AREA if view.shape[0] > geom.size else cv2.INTER_LINEAR)
    else:
        v = model_view(image, trace, geom.size, crop)
    return (v.astype(np.float32) * 0.85).astype(np.uint8)


# ----------------------------------------------------------------------------- painting
_DOT_MASKS: dict = {}


def _dot_mask(geom: Geometry) -> np.ndarray:
    if geom not in _DOT_MASKS:
        c, d = geom.cell, geom.dot
        lo = c // 2 - d // 2
        mask = np.zeros((c, c), bool)
        mask[lo:lo + d, lo:lo + d] = True
        _DOT_MASKS[geom] = np.tile(mask, (geom.grid, geom.grid))
    return _DOT_MASKS[geom]


def _up(a: np.ndarray, geom: Geometry) -> np.ndarray:
    """Nearest-neighbour upscale of a (G, G[, k]) map to the canvas (G*cell, G*cell[, k])."""
    import cv2

    return cv2.resize(np.ascontiguousarray(a), (geom.size, geom.size), interpolation=cv2.INTER_NEAREST)


def paint(base: np.ndarray, geom: Geometry, colours: np.ndarray, alpha: np.ndarray | float = 0.45,
          dots: np.ndarray | None = None) -> np.ndarray:
    """Tint each patch cell with colours[r, c] (G, G, 3) at alpha, then paint exact centre dots.

    ``dots`` (G, G) bool says which cells get a dot (default all). Returns a new uint8 array.
    """
    c = geom.cell
    col = _up(colours.astype(np.uint8), geom)
    a = np.asarray(alpha, np.float32)
    if a.ndim == 2:
        a = _up(a, geom)[:, :, None]
    out = base.astype(np.float32)
    out += (col.astype(np.float32) - out) * a
    out = (out + 0.5).astype(np.uint8)
    out[::c] = out[::c] // 4 * 3          # faint grid lines
    out[:, ::c] = out[:, ::c] // 4 * 3
    m = _dot_mask(geom)
    if dots is not None:
        m = m & _up(dots.astype(np.uint8), geom).astype(bool)
    out[m] = col[m]
    return out


def outline(img: np.ndarray, geom: Geometry, cells: np.ndarray, colour, width: int = 2) -> np.ndarray:
    """Draw a square border of ``width`` pixels in ``colour`` inside every cell where cells[r, c]."""
    c = geom.cell
    w = max(1, min(width, c // 4))
    ring = np.zeros((c, c), bool)
    ring[:w, :] = ring[-w:, :] = ring[:, :w] = ring[:, -w:] = True
    m = np.tile(ring, (geom.grid, geom.grid)) & np.repeat(np.repeat(cells.astype(bool), c, 0), c, 1)
    img = img.copy()
    img[m] = colour
    return img


def decode_dots(img: np.ndarray, geom: Geometry) -> np.ndarray:
    """(G, G, 3) colours of the centre pixel of each patch cell."""
    ys = np.arange(geom.grid) * geom.cell + geom.cell // 2
    return np.asarray(img)[ys][:, ys, :3]


def decode_categories(img: np.ndarray, geom: Geometry, palette: dict) -> np.ndarray:
    """(G, G) category code whose exact colour sits at each cell centre; -99 where none matches."""
    dots = decode_dots(img, geom).astype(np.int32)
    out = np.full((geom.grid, geom.grid), -99, np.int64)
    for code, rgb in palette.items():
        out[(dots == np.array(rgb)).all(-1)] = code
    return out


def _select(img, geom, selected):
    if selected is None:
        return img
    r, c = selected
    cells = np.zeros((geom.grid, geom.grid), bool)
    if 0 <= r < geom.grid and 0 <= c < geom.grid:
        cells[r, c] = True
    return outline(img, geom, cells, SELECT_OUTLINE, width=3)


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """Object masks of a scene: (k, G, G) patch coverage or (k, H, W) boolean pixel masks, and the
    ids of the objects the question asks about (outlined in GT_TARGET instead of GT_OUTLINE)."""

    masks: np.ndarray
    targets: tuple = ()


GT_TARGET = (240, 228, 66)


def _gt(img, geom, gt_masks):
    """Outline ground-truth objects: a GroundTruth, or bare (k, G, G) / (k, H, W) masks."""
    if gt_masks is None:
        return img
    gt = gt_masks if isinstance(gt_masks, GroundTruth) else GroundTruth(np.asarray(gt_masks))
    masks = np.asarray(gt.masks)
    if masks.ndim == 2:
        masks = masks[None]
    targets = [int(i) for i in gt.targets if 0 <= int(i) < len(masks)]
    others = [i for i in range(len(masks)) if i not in targets]
    img = img.copy()
    for ids, colour in ((others, GT_OUTLINE), (targets, GT_TARGET)):
        if not ids:
            continue
        dark, light = _gt_rings(geom, masks[ids])
        img[dark] = (0, 0, 0)
        img[light] = colour
    return img


_GT_CACHE: dict = {}


def _gt_rings(geom: Geometry, masks: np.ndarray):
    """Pixel masks of the dark (4 px) and light (2 px) contour lines of every object (memoised)."""
    import cv2

    key = (geom, masks.shape, hashlib.sha1(np.ascontiguousarray(masks).tobytes()).hexdigest())
    if key in _GT_CACHE:
        return _GT_CACHE[key]
    if masks.ndim == 2:
        masks = masks[None]
    dark = np.zeros((geom.size, geom.size), np.uint8)
    light = np.zeros_like(dark)
    for m in masks:
        m = np.asarray(m, np.float32)
        m = cv2.resize((m > (0.25 if m.shape[0] == geom.grid else 0.5)).astype(np.uint8) * 255,
                       (geom.size, geom.size), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(dark, contours, -1, 1, 4)
        cv2.drawContours(light, contours, -1, 1, 2)
    if len(_GT_CACHE) > 64:
        _GT_CACHE.clear()
    _GT_CACHE[key] = (dark.astype(bool), light.astype(bool))
    return _GT_CACHE[key]


def _prepare(trace, image, base, crop=0):
    """Geometry and background: from a ready canvas (its size sets the cell) or from the image."""
    if base is not None:
        return Geometry(trace.grid, max(1, base.shape[0] // trace.grid)), base
    geom = geometry(trace)
    return geom, base_canvas(image, trace, geom, crop=crop)


def _finish(img, geom, selected=None, gt_masks=None):
    return _select(_gt(img, geom, gt_masks), geom, selected)


# ----------------------------------------------------------------------------- stage views
def merge_overlay(trace, image=None, *, selected=None, gt_masks=None, base=None,
        crop: int = 0) -> np.ndarray:
    """Stage 1a: each merged window tinted with its group's random colour (exact colour dot);
    unmerged patches keep the image and a white dot."""
    geom, base = _prepare(trace, image, base, crop)
    G = trace.grid
    token = pmap(trace, "token", crop)
    merged = pmap(trace, "merged", crop).astype(bool)
    colours = np.empty((G, G, 3), np.uint8)
    colours[:] = UNMERGED_DOT
    for t in np.unique(token[merged]):
        colours[token == t] = group_colour(int(t))
    colours[token < 0] = NO_TOKEN
    alpha = np.where(merged, 0.55, np.where(token < 0, 0.7, 0.0)).astype(np.float32)
    return _finish(paint(base, geom, colours, alpha), geom, selected, gt_masks)


def heat_colours(values: np.ndarray, cmap: str, log: bool, vmin=None, vmax=None):
    """Map (G, G) values to exact LUT colours; NaN -> NAN_COLOUR. Returns colours, (vmin, vmax), finite mask."""
    v = np.asarray(values, np.float64)
    finite = np.isfinite(v)
    if log:
        v = np.where(finite & (v > 0), v, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.log10(v)
        finite = np.isfinite(v)
    if finite.any():
        lo = np.nanmin(v[finite]) if vmin is None else vmin
        hi = np.nanmax(v[finite]) if vmax is None else vmax
    else:
        lo, hi = 0.0, 1.0
    span = hi - lo if hi > lo else 1.0
    idx = np.zeros(v.shape, np.int64)
    idx[finite] = np.clip(np.round((v[finite] - lo) / span * 255), 0, 255).astype(np.int64)
    colours = lut(cmap)[idx]
    colours[~finite] = NAN_COLOUR
    return colours, (float(lo), float(hi)), finite


def heatmap_values(trace, name: str, layer: int | None = None, crop: int = 0) -> np.ndarray | None:
    """The (G, G) values a heatmap shows, or None when the trace has none (stage off)."""
    if name in ("global_share", "individual_max"):
        if layer is None or layer not in trace.prune_layers:
            return None
        return pmap(trace, f"stage2.L{layer}.{name}", crop)
    key = HEATMAPS[name][0]
    return pmap(trace, key, crop) if has_pmap(trace, key, crop) else None


def heatmap_overlay(trace, name: str, image=None, layer: int | None = None, *, selected=None,
                    gt_masks=None, base=None, outline_key: bool | None = None, crop: int = 0) -> np.ndarray:
    """A score as a colour-blind-safe heatmap over the image; key patches outlined on the CLS map."""
    geom, base = _prepare(trace, image, base, crop)
    values = heatmap_values(trace, name, layer, crop)
    G = trace.grid
    if values is None:
        colours = np.full((G, G, 3), NAN_COLOUR, np.uint8)
        img = paint(base, geom, colours, 0.25)
    else:
        _, cmap, log, _ = HEATMAPS[name]
        colours, _, finite = heat_colours(values, cmap, log)
        img = paint(base, geom, colours, np.where(finite, 0.6, 0.3).astype(np.float32))
    if outline_key or (outline_key is None and name == "cls_attention"):
        img = outline(img, geom, pmap(trace, "key", crop).astype(bool), KEY_OUTLINE, width=2)
    return _finish(img, geom, selected, gt_masks)


def key_overlay(trace, image=None, **kw) -> np.ndarray:
    """Stage 1b: CLS attention heatmap with the key token set outlined in white."""
    return heatmap_overlay(trace, "cls_attention", image, outline_key=True, **kw)


def status_map(trace, layer: int, crop: int = 0) -> np.ndarray:
    """(G, G) stage-2 status codes at a prune layer (NOT_ENTERING where the patch's token had gone,
    NO_TOKEN_CODE where the patch reaches the LLM in no token)."""
    out = pmap(trace, f"stage2.L{layer}.status", crop).astype(np.int64)
    out[pmap(trace, "token", crop) < 0] = NO_TOKEN_CODE
    return out


def processed_map(trace, layer: int, crop: int = 0) -> np.ndarray:
    """(G, G) bool: the patch's token was still in the sequence when ``layer`` ran in prefill."""
    d = pmap(trace, "dropped_after_layer", crop)
    return ((d < 0) | (d >= layer)) & (pmap(trace, "token", crop) >= 0)


def prune_layer_for(trace, layer: int) -> int | None:
    """The prune layer a slider position shows: the layer itself or the last prune layer before it."""
    before = [p for p in trace.prune_layers if p <= layer]
    return before[-1] if before else None


def filter_overlay(trace, layer: int, image=None, *, selected=None, gt_masks=None, base=None,
        crop: int = 0) -> np.ndarray:
    """Stage 2 at prune layer ``layer``: kept (and why) vs dropped, exact colours in STATUS_COLOURS."""
    geom, base = _prepare(trace, image, base, crop)
    codes = status_map(trace, layer, crop)
    colours = np.zeros(codes.shape + (3,), np.uint8)
    for code, rgb in STATUS_COLOURS.items():
        colours[codes == code] = rgb
    colours[codes == NO_TOKEN_CODE] = NO_TOKEN
    alpha = np.where(codes == DROPPED, 0.65, np.where(codes < 0, 0.75, 0.35)).astype(np.float32)
    return _finish(paint(base, geom, colours, alpha), geom, selected, gt_masks)


def kv_map(trace, layer: int, crop: int = 0) -> np.ndarray:
    """(G, G) KV_CACHED / KV_TRIMMED / KV_ABSENT (/ NO_TOKEN_CODE) for one LLM layer."""
    cached = pmap(trace, "kv_cached", crop)[layer].astype(bool)
    processed = processed_map(trace, layer, crop)
    out = np.full(cached.shape, KV_ABSENT, np.int64)
    out[processed] = KV_TRIMMED
    out[cached] = KV_CACHED
    out[pmap(trace, "token", crop) < 0] = NO_TOKEN_CODE
    return out


def kv_overlay(trace, layer: int, image=None, *, selected=None, gt_masks=None, base=None,
        crop: int = 0) -> np.ndarray:
    """Stage 3: which image patches LLM layer ``layer`` still holds in its KV cache after prefill."""
    geom, base = _prepare(trace, image, base, crop)
    codes = kv_map(trace, layer, crop)
    colours = np.zeros(codes.shape + (3,), np.uint8)
    for code, rgb in KV_COLOURS.items():
        colours[codes == code] = rgb
    colours[codes == NO_TOKEN_CODE] = NO_TOKEN
    alpha = np.where(codes == KV_CACHED, 0.3, 0.7).astype(np.float32)
    return _finish(paint(base, geom, colours, alpha), geom, selected, gt_masks)


def kept_patches(trace, layer: int, crop: int = 0) -> np.ndarray:
    """(G, G) bool: patches whose token survives prune layer ``layer``, from the token-level records."""
    toks = trace.arrays[f"stage2.L{layer}.tokens"]
    status = trace.arrays[f"stage2.L{layer}.status"]
    groups = trace.arrays["tokens.groups"]
    G = trace.grid
    kept = np.zeros(G * G, bool)
    for t in toks[status != DROPPED]:
        ids = groups[t][groups[t] >= 0] - crop * G * G
        kept[ids[(ids >= 0) & (ids < G * G)]] = True
    return kept.reshape(G, G)


# ----------------------------------------------------------------------------- legends
def _swatch(rgb, label):
    return (f'<span style="display:inline-flex;align-items:center;margin:2px 10px 2px 0">'
            f'<span style="display:inline-block;width:14px;height:14px;border:1px solid #333;'
            f'background:rgb{tuple(rgb)};margin-right:5px"></span>{html.escape(label)}</span>')


def _gradient(cmap, lo_label, hi_label):
    stops = ", ".join(f"rgb{tuple(int(x) for x in lut(cmap)[i])}" for i in range(0, 256, 32)) \
        + f", rgb{tuple(int(x) for x in lut(cmap)[255])}"
    return (f'<span style="display:inline-flex;align-items:center;margin:2px 10px 2px 0">{html.escape(lo_label)}'
            f'<span style="display:inline-block;width:140px;height:12px;margin:0 6px;'
            f'background:linear-gradient(to right, {stops})"></span>{html.escape(hi_label)}</span>')


def object_coverage(trace, gt, layer: int, crop: int = 0) -> dict | None:
    """How many patches of the asked-about objects (a GroundTruth with targets, patch-level masks) the
    given LLM layer still processes in prefill and still holds in its KV cache."""
    if not isinstance(gt, GroundTruth) or not gt.targets:
        return None
    masks = np.asarray(gt.masks)
    if masks.ndim != 3 or masks.shape[1:] != (trace.grid, trace.grid):
        return None
    ids = [int(i) for i in gt.targets if 0 <= int(i) < len(masks)]
    if not ids:
        return None
    obj = (masks[ids] > 0.25).any(0)
    n = int(obj.sum())
    return {"patches": n, "processed": int((processed_map(trace, layer, crop) & obj).sum()),
            "cached": int(((kv_map(trace, layer, crop) == KV_CACHED) & obj).sum())}


def has_untokened(trace) -> bool:
    """Whether some patch reaches the LLM in no token (LLaVA-NeXT tiles' unpadded borders)."""
    return any((pmap(trace, "token", c) < 0).any() for c in range(n_crops(trace)))


def legend_html(kind: str, trace=None, layer: int | None = None, inspected: bool = True, crop: int = 0) -> str:
    """What each colour of a view means (HTML, shown under the view)."""
    parts = []
    if kind == "merge":
        parts = [_swatch(group_colour(7), "merged window (one colour per group, random, ToMe-style)"),
                 _swatch(UNMERGED_DOT, "white dot: patch not merged, its own token")]
        if trace is not None:
            s = trace.meta["stage1a"]
            parts.append(f"window {s['window']}, threshold {s['threshold']}, "
                         f"{len(s['merged_windows'])} windows merged, N0 = {trace.meta['sequence']['N0']}")
    elif kind in HEATMAPS:
        _, cmap, log, title = HEATMAPS[kind]
        lo, hi = "low", "high"
        if trace is not None:
            v = heatmap_values(trace, kind, layer, crop)
            if v is not None and np.isfinite(v).any():
                _, (a, b), _ = heat_colours(v, cmap, log)
                lo, hi = (f"{10 ** a:.2g}", f"{10 ** b:.2g}") if log else (f"{a:.3g}", f"{b:.3g}")
        parts = [html.escape(title) + ": ", _gradient(cmap, lo, hi), _swatch(NAN_COLOUR, "no value (stage off or not entering)")]
        if kind == "cls_attention":
            parts.append(_swatch(KEY_OUTLINE, "white outline: key token set (never dropped)"))
            if trace is not None and trace.meta["stage1b"].get("score"):
                parts.append(f"key score: {html.escape(str(trace.meta['stage1b']['score']))}")
        if trace is not None and kind in ("global_share", "individual_max"):
            c = trace.meta["config"]
            thr = c["global_thr"] if kind == "global_share" else c["individual_thr"]
            parts.append(f"threshold {thr:g} (a token is dropped only when BOTH scores are below their thresholds)")
        if trace is not None and kind == "similarity":
            parts.append(f"merge threshold {trace.meta['stage1a']['threshold']}")
    elif kind == "filter":
        parts = [_swatch(STATUS_COLOURS[k], STATUS_LABELS[k]) for k in
                 (KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY, DROPPED, NOT_ENTERING)]
    elif kind == "kv":
        parts = [_swatch(KV_COLOURS[k], KV_LABELS[k]) for k in (KV_CACHED, KV_TRIMMED, KV_ABSENT)]
    if kind in ("merge", "filter", "kv") and trace is not None and has_untokened(trace):
        parts.append(_swatch(NO_TOKEN, NO_TOKEN_LABEL))
    if inspected:
        parts.append(_swatch(SELECT_OUTLINE, "magenta outline: inspected patch"))
    return '<div style="font-size:0.9em;line-height:1.6">' + "".join(parts) + "</div>"


# ----------------------------------------------------------------------------- lifecycle
def patch_lifecycle(trace, row: int, col: int, crop: int = 0) -> dict:
    """Everything the trace knows about one original patch, stage by stage (plain data)."""
    G = trace.grid
    if not (isinstance(row, (int, np.integer)) and isinstance(col, (int, np.integer))):
        raise ValueError(f"row and column must be integers, got {row!r}, {col!r}")
    if not (0 <= row < G and 0 <= col < G):
        raise ValueError(f"patch ({row}, {col}) is outside the {G} x {G} grid (rows and columns 0..{G - 1})")
    if not 0 <= crop < n_crops(trace):
        raise ValueError(f"crop {crop} is outside the trace's {n_crops(trace)} crop(s)")
    m = trace.meta

    def at(name):
        return pmap(trace, name, crop)[row, col]

    tok = int(at("token"))
    groups = trace.arrays["tokens.groups"]
    members = [int(x) for x in groups[tok] if x >= 0] if 0 <= tok < len(groups) else []
    out = {"patch": int(crop * G * G + row * G + col), "row": int(row), "col": int(col), "crop": int(crop),
           "crop_name": crop_name(trace, crop), "token": tok,
           "merged": bool(at("merged")), "group": members, "key": bool(at("key")),
           "dropped_after_layer": int(at("dropped_after_layer"))}
    if has_pmap(trace, "similarity", crop):
        out["window_similarity"] = float(at("similarity"))
    if has_pmap(trace, "cls_attention", crop):
        v = float(at("cls_attention"))
        out["cls_attention"] = None if math.isnan(v) else v
    cfg = m["config"]
    stages2 = []
    for layer in trace.prune_layers:
        s = int(at(f"stage2.L{layer}.status"))
        g = float(at(f"stage2.L{layer}.global_share"))
        i = float(at(f"stage2.L{layer}.individual_max"))
        stages2.append({"layer": layer, "status": s, "status_name": STATUS_LABELS.get(s, str(s)),
                        "global_share": None if math.isnan(g) else g,
                        "individual_max": None if math.isnan(i) else i,
                        "global_thr": cfg["global_thr"], "individual_thr": cfg["individual_thr"]})
    out["stage2"] = stages2
    cached = pmap(trace, "kv_cached", crop)[:, row, col].astype(bool)
    out["kv_cached_layers"] = [int(x) for x in np.nonzero(cached)[0]]
    return out


def original_box(trace, row: int, col: int, crop: int = 0):
    """(x0, y0, x1, y1) of a patch in the original image's pixels (clipped to it), from the mapping."""
    try:
        m = crop_mapping(trace, crop)
        p = float(m["processed"]) / trace.grid
        sx, sy = _scale_xy(m)
        ox, oy = (float(v) for v in m["offset"])
        w, h = trace.meta["input"]["image"]["width"], trace.meta["input"]["image"]["height"]
    except (KeyError, TypeError, ValueError):
        return None
    if sx <= 0 or sy <= 0:
        return None
    x0, x1 = (col * p - ox) / sx, ((col + 1) * p - ox) / sx
    y0, y1 = (row * p - oy) / sy, ((row + 1) * p - oy) / sy
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
    return None if x1 <= x0 or y1 <= y0 else (x0, y0, x1, y1)


def _fmt(v):
    return "–" if v is None else f"{v:.3g}"


def lifecycle_markdown(trace, row: int, col: int, crop: int = 0) -> str:
    """The lifecycle of one patch as Markdown for the patch inspector."""
    d = patch_lifecycle(trace, row, col, crop)
    m = trace.meta
    L = trace.num_layers
    where = f" of {d['crop_name']}" if n_crops(trace) > 1 else ""
    lines = [f"### Patch ({d['row']}, {d['col']}){where} — patch id {d['patch']}"]
    box = original_box(trace, row, col, crop)
    if box is not None:
        x0, y0, x1, y1 = box
        lines.append(f"Covers original-image pixels x {x0:.0f}–{x1:.0f}, y {y0:.0f}–{y1:.0f} "
                     f"({m['input']['image']['width']} x {m['input']['image']['height']} image).")
    if d["token"] < 0:
        lines.append(f"- **No token:** {NO_TOKEN_LABEL}; the language model never sees this patch.")
        return "\n".join(lines)
    s1a = m["stage1a"]
    if not s1a["enabled"]:
        lines.append("- **Stage 1a (local spatial merge):** off")
    elif d["merged"]:
        lines.append(f"- **Stage 1a:** merged with {len(d['group']) - 1} neighbours into vision token "
                     f"{d['token']} (window similarity {_fmt(d.get('window_similarity'))} "
                     f">= threshold {s1a['threshold']}); group patches {d['group']}")
    else:
        sim = d.get("window_similarity")
        lines.append(f"- **Stage 1a:** not merged (window similarity {_fmt(sim)} < threshold "
                     f"{s1a['threshold']}); its own vision token {d['token']}")
    if not m["stage1b"]["enabled"]:
        lines.append("- **Stage 1b (key token set):** off")
    else:
        score = m["stage1b"].get("score", "CLS attention")
        lines.append(f"- **Stage 1b:** key score {_fmt(d.get('cls_attention'))} ({score}); "
                     + ("**key token** — protected from every later drop" if d["key"] else "not a key token"))
    if not d["stage2"]:
        lines.append("- **Stage 2 (dual-attention filter):** off / no prune layers")
    else:
        lines.append("- **Stage 2:**\n\n| prune layer | global share (thr) | individual max (thr) | decision |\n|---|---|---|---|")
        for s in d["stage2"]:
            lines.append(f"| {s['layer']} | {_fmt(s['global_share'])} ({s['global_thr']:g}) | "
                         f"{_fmt(s['individual_max'])} ({s['individual_thr']:g}) | {s['status_name']} |")
        lines.append("")
    if d["dropped_after_layer"] >= 0:
        lines.append(f"- **Dropped** after LLM layer {d['dropped_after_layer']}: both its global share and "
                     "its individual max were below their thresholds; later layers never see it.")
    else:
        lines.append("- **Never dropped:** the token reaches the last LLM layer.")
    cached = d["kv_cached_layers"]
    lines.append(f"- **Stage 3 (KV cache after prefill):** cached in {len(cached)} of {L} layers"
                 + (f": {_ranges(cached)}" if cached else ""))
    return "\n".join(lines)


def _ranges(xs):
    out, start, prev = [], None, None
    for x in xs:
        if start is None:
            start = prev = x
        elif x == prev + 1:
            prev = x
        else:
            out.append(f"{start}" if start == prev else f"{start}–{prev}")
            start = prev = x
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}–{prev}")
    return ", ".join(out)


# ----------------------------------------------------------------------------- curves and numbers
def token_curve(trace, vanilla=None):
    """Plotly figure: vision tokens each LLM layer processes in prefill and holds in its KV cache."""
    import plotly.graph_objects as go

    L = trace.num_layers
    x = list(range(L))
    fig = go.Figure()
    if vanilla is not None:
        fig.add_trace(go.Scatter(x=x, y=vanilla.meta["vision_tokens_per_layer"], mode="lines+markers",
                                 name="vanilla: vision tokens", line=dict(color="rgb(96,96,96)", dash="dot")))
    fig.add_trace(go.Scatter(x=x, y=trace.meta["vision_tokens_per_layer"], mode="lines+markers",
                             name="MustDrop: vision tokens in prefill", line=dict(color="rgb(0,114,178)", width=3)))
    fig.add_trace(go.Scatter(x=x, y=trace.meta["kv"]["vision_entries_per_layer"], mode="lines+markers",
                             name="MustDrop: vision entries in KV cache", line=dict(color="rgb(230,159,0)", dash="dash")))
    for p in trace.prune_layers:
        fig.add_vline(x=p, line=dict(color="rgb(213,94,0)", width=1, dash="dot"))
    fig.update_layout(title=f"Vision tokens per LLM layer (prune layers {trace.prune_layers or 'none'})",
                      xaxis_title="LLM layer", yaxis_title="vision tokens", height=360,
                      margin=dict(l=50, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.25),
                      template="plotly_white")
    return fig


def kv_bytes_figure(trace, vanilla=None):
    """Plotly bars: KV-cache bytes per LLM layer after prefill (MustDrop vs vanilla)."""
    import plotly.graph_objects as go

    s = accounting.summarize(trace)
    x = list(range(trace.num_layers))
    fig = go.Figure()
    if vanilla is not None:
        fig.add_trace(go.Bar(x=x, y=accounting.summarize(vanilla)["kv"]["bytes_per_layer"], name="vanilla",
                             marker_color="rgb(160,160,160)"))
    fig.add_trace(go.Bar(x=x, y=s["kv"]["bytes_per_layer"], name="MustDrop", marker_color="rgb(0,114,178)"))
    fig.update_layout(title="KV-cache bytes per LLM layer after prefill", xaxis_title="LLM layer",
                      yaxis_title="bytes", barmode="group", height=300, template="plotly_white",
                      margin=dict(l=50, r=20, t=50, b=40))
    return fig


def _bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def summary_markdown(trace, vanilla=None) -> str:
    """Equivalent tokens (both conventions), FLOPs ratio with its formula, KV bytes, timings."""
    s = accounting.summarize(trace)
    e, f, kv, vt = s["equivalent_tokens"], s["flops"], s["kv"], s["vision_tokens"]
    t = trace.meta["timings"]
    cfg = trace.meta["config"]
    lines = [
        f"**Model** `{trace.meta['model']['id']}` · preset **{cfg.get('preset')}** · positions `{cfg['positions']}` · "
        f"stages: 1a {'on' if cfg['merge'] else 'off'}, 1b {'on' if cfg['key_set'] else 'off'}, "
        f"2 {'on' if cfg['filter'] else 'off'}, 3 {'on' if cfg['kv_trim'] else 'off'}",
        "",
        "| quantity | value | how it is counted |",
        "|---|---|---|",
        f"| vision tokens | {vt['patches']} patches → {vt['after_merge']} after merge → {vt['final']} at the last layer | per image |",
        f"| equivalent tokens, authors' convention | {e['authors']:.1f} | {e['authors_formula']} (printed by the authors' code; one layer off the compute) |",
        f"| equivalent tokens, compute convention | {e['compute']:.1f} | {e['compute_formula']} = mean over layers of the vision tokens processed |",
        f"| prefill FLOPs, image tokens only | {f['image_only']:.3g} ({100 * f['ratio_image_only']:.1f}% of vanilla {f['image_only_vanilla']:.3g}) | {accounting.FLOPS_FORMULA}, n = image tokens |",
        f"| prefill FLOPs, full sequence | {f['full_sequence']:.3g} ({100 * f['ratio_full_sequence']:.1f}% of vanilla) | same formula, n = {f['n_sys']} system + vision + {f['n_text']} text tokens |",
        f"| KV cache after prefill | {_bytes(kv['total_bytes'])} (vanilla {_bytes(kv['vanilla_total_bytes'])}); vision only {_bytes(kv['vision_bytes'])} (vanilla {_bytes(kv['vanilla_vision_bytes'])}) | K and V, all layers, {kv['bytes_per_entry']} bytes per entry per layer |",
        f"| time (MustDrop run) | vision {t['vision_s']:.2f} s · prefill {t['prefill_s']:.2f} s · decode {t['decode_s']:.2f} s · total {t['total_s']:.2f} s | wall clock on {trace.meta['model']['device']} |",
    ]
    if vanilla is not None:
        tv = vanilla.meta["timings"]
        lines.append(f"| time (vanilla run) | vision {tv['vision_s']:.2f} s · prefill {tv['prefill_s']:.2f} s · decode {tv['decode_s']:.2f} s · total {tv['total_s']:.2f} s | same machine |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- answers
def display_pieces(gen: dict) -> list[str]:
    """Token pieces with the spaces the answer text has between them (SentencePiece pieces decoded one
    by one lose their leading space): each piece is found in the answer and given the gap before it."""
    answer = str(gen.get("answer", ""))
    out, pos = [], 0
    for p in gen.get("tokens", []):
        p = str(p)
        core = p.strip()
        j = answer.find(core, pos) if core else -1
        if j >= 0 and answer[pos:j].strip() == "":
            out.append(answer[pos:j] + core if not p.startswith(" ") else p)
            pos = j + len(core)
        else:
            out.append(p)
    return out

def answer_diff(vanilla, trace) -> dict:
    """Token-level comparison of the two answers: highlighted pieces, first divergence, probabilities."""
    va = vanilla.meta["generation"] if vanilla is not None else {"token_ids": [], "tokens": [], "probs": []}
    md = trace.meta["generation"]
    first = None
    n = max(len(va["token_ids"]), len(md["token_ids"]))
    for i in range(n):
        a = va["token_ids"][i] if i < len(va["token_ids"]) else None
        b = md["token_ids"][i] if i < len(md["token_ids"]) else None
        if a != b:
            first = i
            break

    def pieces(gen):
        out = []
        for i, p in enumerate(display_pieces(gen)):
            label = None if first is None or i < first else "differs"
            out.append((p, label))
        return out

    rows = ["| step | vanilla token | p | MustDrop token | p |", "|---|---|---|---|---|"]
    for i in range(n):
        def cell(g):
            if i >= len(g["tokens"]):
                return "–", "–"
            return f"`{g['tokens'][i]!r}`", f"{g['probs'][i]:.3f}"
        a, pa = cell(va)
        b, pb = cell(md)
        mark = " ⟵ first divergence" if i == first else ""
        rows.append(f"| {i}{mark} | {a} | {pa} | {b} | {pb} |")
    if vanilla is None:
        text = "No vanilla run in this replay."
    elif first is None:
        text = "The two answers are **identical** token for token."
    else:
        text = f"First divergence at generated token **{first}**."
    return {"vanilla": pieces(va), "mustdrop": pieces(md), "first_divergence": first,
            "text": text, "table": "\n".join(rows)}


# ----------------------------------------------------------------------------- slides
SLIDE_RC = {"font.size": 15, "axes.titlesize": 17, "axes.labelsize": 15, "legend.fontsize": 12,
            "savefig.bbox": "standard", "savefig.dpi": 100, "figure.dpi": 100}


def slide_figure(trace, image=None, vanilla=None, layer: int | None = None, gt_masks=None, view=None,
                 crop: int = 0):
    """A projector-readable multi-panel matplotlib figure: one panel per stage plus the count curve."""
    import matplotlib

    with matplotlib.rc_context(SLIDE_RC):
        return _slide_figure(trace, image, vanilla, layer, gt_masks, view, crop)


def _slide_figure(trace, image, vanilla, layer, gt_masks, view, crop=0):
    """A projector-readable multi-panel matplotlib figure: one panel per stage plus the count curve."""
    from matplotlib.figure import Figure    # no pyplot: thread-safe in a server, no backend switching

    geom = geometry(trace, target=336)
    base = base_canvas(image, trace, geom, view=view, crop=crop)
    prune = trace.prune_layers
    pl = prune_layer_for(trace, layer) if layer is not None else None
    if pl is None and prune:   # the prune layer that dropped the most
        pl = max(trace.meta["stage2"], key=lambda s: s["dropped"])["layer"]
    kv_layer = layer if layer is not None and 0 <= layer < trace.num_layers else (prune[0] if prune else 0)
    kw = dict(base=base, gt_masks=gt_masks if crop == 0 else None, crop=crop)
    where = f" ({crop_name(trace, crop)})" if n_crops(trace) > 1 else ""
    panels = [("1a  local spatial merge" + where, merge_overlay(trace, **kw)),
              ("1b  key score + key set", key_overlay(trace, **kw))]
    if pl is not None:
        s2 = next(s for s in trace.meta["stage2"] if s["layer"] == pl)
        panels.append((f"2  filter after layer {pl}: {s2['dropped']} of {s2['entering']} dropped",
                       filter_overlay(trace, pl, **kw)))
    else:
        panels.append(("2  dual-attention filter: off", base))
    panels.append((f"3  KV cache of layer {kv_layer}", kv_overlay(trace, kv_layer, **kw)))
    from matplotlib.patches import Patch

    def handles(pairs):
        return [Patch(facecolor=np.array(rgb) / 255, edgecolor="0.2", label=lab) for rgb, lab in pairs]

    short = {KEPT_BOTH: "kept: both high", KEPT_GLOBAL: "kept: global share", KEPT_INDIVIDUAL: "kept: individual max",
             KEPT_KEY: "kept: key token", DROPPED: "dropped here", NOT_ENTERING: "dropped earlier"}
    legends = [
        handles([(group_colour(3), "merged window (group colour)"), (UNMERGED_DOT, "unmerged patch (white dot)")]),
        handles([(lut("cividis")[30], "low CLS attention"), (lut("cividis")[230], "high CLS attention"),
                 (KEY_OUTLINE, "white outline: key token")]),
        handles([(STATUS_COLOURS[k], short[k]) for k in short]),
        handles([(KV_COLOURS[KV_CACHED], "cached"), (KV_COLOURS[KV_TRIMMED], "trimmed (stage 3)"),
                 (KV_COLOURS[KV_ABSENT], "dropped in prefill")]),
    ]
    fig = Figure(figsize=(19.2, 10.8), dpi=100)
    axes = fig.subplots(2, 3)
    flat = axes.ravel()
    for ax, (title, img), hs in zip(flat, panels, legends):
        ax.imshow(img)
        ax.set_title(title)
        ax.set_axis_off()
        ax.legend(handles=hs, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=11,
                  frameon=False, handlelength=1.2, columnspacing=1.0)
    ax = flat[4]
    L = trace.num_layers
    if vanilla is not None:
        ax.plot(range(L), vanilla.meta["vision_tokens_per_layer"], ":", color="0.4", lw=2.5, label="vanilla")
    ax.plot(range(L), trace.meta["vision_tokens_per_layer"], "-o", color=(0, 114 / 255, 178 / 255), lw=3,
            label="MustDrop (prefill)")
    ax.plot(range(L), trace.meta["kv"]["vision_entries_per_layer"], "--", color=(230 / 255, 159 / 255, 0), lw=2.5,
            label="MustDrop (KV cache)")
    for p in prune:
        ax.axvline(p, color=(213 / 255, 94 / 255, 0), ls=":", lw=1.5)
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("vision tokens")
    ax.set_title("vision tokens per LLM layer")
    ax.legend(loc="upper right")
    ax.set_ylim(bottom=0)
    ax = flat[5]
    ax.set_axis_off()
    if gt_masks is not None:
        ax.text(0.0, 0.02, "contours: ground-truth objects (yellow: the one asked about)", fontsize=12,
                transform=ax.transAxes)
    s = accounting.summarize(trace)
    e, f = s["equivalent_tokens"], s["flops"]
    va = vanilla.answer if vanilla is not None else "(no vanilla run)"
    q = trace.meta["input"]["question"]
    text = (f"Q: {_clip(q, 48)}\n"
            f"vanilla:  {_clip(va, 40)}\nMustDrop: {_clip(trace.answer, 40)}\n\n"
            f"equivalent tokens\n  authors' conv.  {e['authors']:.1f}\n  compute conv.   {e['compute']:.1f}\n"
            f"FLOPs (image tokens, PDrop conv.)\n  {100 * f['ratio_image_only']:.1f}% of vanilla\n"
            f"KV cache  {100 * s['kv']['total_bytes'] / max(1, s['kv']['vanilla_total_bytes']):.1f}% of vanilla")
    ax.text(0.0, 1.0, text, va="top", ha="left", family="monospace", fontsize=15, transform=ax.transAxes)
    cfg = trace.meta["config"]
    fig.suptitle(f"MustDrop on {trace.meta['model']['id'] or 'model'} — preset {cfg.get('preset')}, "
                 f"positions '{cfg['positions']}', prune layers {prune or 'none'}\n"
                 "equivalent tokens: authors' = printed convention, compute = mean vision tokens per layer; "
                 "FLOPs: 4nd²+2n²d+3ndm per layer", fontsize=16)
    fig.tight_layout(rect=(0, 0, 1, 0.92), h_pad=2.5)
    return fig


def _clip(s, n):
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def save_slides(trace, folder, image=None, vanilla=None, layer=None, gt_masks=None, stem="mustdrop-slides",
                view=None, crop: int = 0):
    """Write the slide figure as PNG and PDF into ``folder``; return both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    import matplotlib

    png, pdf = folder / f"{stem}.png", folder / f"{stem}.pdf"
    with matplotlib.rc_context(SLIDE_RC):      # never touches the global rcParams of other figures
        fig = _slide_figure(trace, image, vanilla, layer, gt_masks, view, crop)
        fig.savefig(png, dpi=100, bbox_inches=None)
        fig.savefig(pdf, bbox_inches=None)
    return png, pdf


def main(argv=None) -> int:
    """python -m mustdrop.vis TRACE [--vanilla TRACE] [--image IMAGE] [--layer L] [--crop C] --out DIR"""
    import argparse

    from .images import load_image
    from .trace import Trace, TraceError

    ap = argparse.ArgumentParser(prog="python -m mustdrop.vis",
                                 description="Slide figure (PNG + PDF) of a stored MustDrop trace, no model needed.")
    ap.add_argument("trace")
    ap.add_argument("--vanilla", help="the vanilla trace of the same input (for the count curve and answers)")
    ap.add_argument("--image", help="the run's image, drawn under the overlays (grey without it)")
    ap.add_argument("--layer", type=int, default=None, help="LLM layer for the stage-2/3 panels")
    ap.add_argument("--crop", type=int, default=0, help="crop to draw (LLaVA-NeXT: 0 = base image, then tiles)")
    ap.add_argument("--out", default=".", help="folder for mustdrop-slides.png / .pdf")
    a = ap.parse_args(argv)
    try:
        t = Trace.load(a.trace)
        va = Trace.load(a.vanilla) if a.vanilla else None
        img = load_image(a.image) if a.image else None
        if not 0 <= a.crop < n_crops(t):
            raise ValueError(f"--crop {a.crop}: the trace holds {n_crops(t)} crop(s)")
        png, pdf = save_slides(t, a.out, image=img, vanilla=va, layer=a.layer, crop=a.crop)
    except (TraceError, ValueError, OSError) as e:
        print(f"error: {e}")
        return 2
    print(png)
    print(pdf)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
