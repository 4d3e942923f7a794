"""Trace -> pictures: per-stage overlays, heatmaps, the token-count curve, answers, slide figures.

Everything here reads a :class:`mustdrop.trace.Trace` (and, for the background only, the image the
run saw); nothing touches a model. The ``patch.*`` maps of the trace are already in original-patch
coordinates (G x G), so no view re-maps token ids.

Canvas geometry (every overlay): the image as the model saw it (the processor's resize + crop/pad,
taken from ``trace.meta["input"]["mapping"]``), scaled to a square of ``G * cell`` pixels, patch
(row, col) occupying ``[row*cell, (row+1)*cell) x [col*cell, (col+1)*cell)``. Each patch cell is
tinted with its category colour (alpha blended) and carries a centre dot of ``dot`` x ``dot``
pixels painted in the EXACT category colour, so a test (or a curious user) can read every
decision back from the pixels: :func:`decode_dots` does that. Colours are colour-blind-safe
(Okabe-Ito for categories, viridis / cividis for scores).
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


def model_view(image, trace, size: int | None = None) -> np.ndarray:
    """The image as the model saw it (processor resize + centre crop or pad), as a size x size RGB array.

    ``image`` is a PIL image or an (H, W, 3) uint8 array of the ORIGINAL image of the run; None gives
    a flat grey canvas (a trace replayed without its image).
    """
    import cv2

    m = trace.meta["input"]["mapping"]
    processed = int(m.get("processed") or trace.meta["model"]["vision"]["image_size"])
    size = size or processed
    if image is None:
        return np.full((size, size, 3), BACKGROUND, np.uint8)
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    a = np.ascontiguousarray(a[:, :, :3]).astype(np.uint8)
    k = size / processed
    s = float(m["scale"]) * k
    ox, oy = (float(v) * k for v in m["offset"])
    M = np.array([[s, 0, ox], [0, s, oy]], np.float64)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return cv2.warpAffine(a, M, (size, size), flags=interp, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=BACKGROUND)


def base_canvas(image, trace, geom: Geometry | None = None, view: np.ndarray | None = None) -> np.ndarray:
    """The model-view image at canvas size, slightly dimmed so overlay colours read well.

    ``view`` is a ready model view (from :func:`model_view`) to use instead of ``image``.
    """
    import cv2

    geom = geom or geometry(trace)
    if view is not None:
        v = cv2.resize(np.ascontiguousarray(view[:, :, :3]).astype(np.uint8), (geom.size, geom.size),
                       interpolation=cv2.INTER_AREA if view.shape[0] > geom.size else cv2.INTER_LINEAR)
    else:
        v = model_view(image, trace, geom.size)
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


def _gt(img, geom, gt_masks):
    """Outline ground-truth objects given as (k, G, G) patch-coverage masks or (k, H, W) boolean masks."""
    if gt_masks is None:
        return img
    dark, light = _gt_rings(geom, np.asarray(gt_masks))
    img = img.copy()
    img[dark] = (0, 0, 0)
    img[light] = GT_OUTLINE
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


def _prepare(trace, image, base):
    """Geometry and background: from a ready canvas (its size sets the cell) or from the image."""
    if base is not None:
        return Geometry(trace.grid, max(1, base.shape[0] // trace.grid)), base
    geom = geometry(trace)
    return geom, base_canvas(image, trace, geom)


def _finish(img, geom, selected=None, gt_masks=None):
    return _select(_gt(img, geom, gt_masks), geom, selected)


# ----------------------------------------------------------------------------- stage views
def merge_overlay(trace, image=None, *, selected=None, gt_masks=None, base=None) -> np.ndarray:
    """Stage 1a: each merged window tinted with its group's random colour (exact colour dot);
    unmerged patches keep the image and a white dot."""
    geom, base = _prepare(trace, image, base)
    G = trace.grid
    token = trace.patch("token")
    merged = trace.patch("merged").astype(bool)
    colours = np.empty((G, G, 3), np.uint8)
    colours[:] = UNMERGED_DOT
    for t in np.unique(token[merged]):
        colours[token == t] = group_colour(int(t))
    alpha = np.where(merged, 0.55, 0.0).astype(np.float32)
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


def heatmap_values(trace, name: str, layer: int | None = None) -> np.ndarray | None:
    """The (G, G) values a heatmap shows, or None when the trace has none (stage off)."""
    if name in ("global_share", "individual_max"):
        if layer is None or layer not in trace.prune_layers:
            return None
        return trace.patch(f"stage2.L{layer}.{name}")
    key = f"patch.{HEATMAPS[name][0]}"
    return trace.arrays.get(key)


def heatmap_overlay(trace, name: str, image=None, layer: int | None = None, *, selected=None,
                    gt_masks=None, base=None, outline_key: bool | None = None) -> np.ndarray:
    """A score as a colour-blind-safe heatmap over the image; key patches outlined on the CLS map."""
    geom, base = _prepare(trace, image, base)
    values = heatmap_values(trace, name, layer)
    G = trace.grid
    if values is None:
        colours = np.full((G, G, 3), NAN_COLOUR, np.uint8)
        img = paint(base, geom, colours, 0.25)
    else:
        _, cmap, log, _ = HEATMAPS[name]
        colours, _, finite = heat_colours(values, cmap, log)
        img = paint(base, geom, colours, np.where(finite, 0.6, 0.3).astype(np.float32))
    if outline_key or (outline_key is None and name == "cls_attention"):
        img = outline(img, geom, trace.patch("key").astype(bool), KEY_OUTLINE, width=2)
    return _finish(img, geom, selected, gt_masks)


def key_overlay(trace, image=None, **kw) -> np.ndarray:
    """Stage 1b: CLS attention heatmap with the key token set outlined in white."""
    return heatmap_overlay(trace, "cls_attention", image, outline_key=True, **kw)


def status_map(trace, layer: int) -> np.ndarray:
    """(G, G) stage-2 status codes at a prune layer (NOT_ENTERING where the patch's token had gone)."""
    return trace.patch(f"stage2.L{layer}.status").astype(np.int64)


def processed_map(trace, layer: int) -> np.ndarray:
    """(G, G) bool: the patch's token was still in the sequence when ``layer`` ran in prefill."""
    d = trace.patch("dropped_after_layer")
    return (d < 0) | (d >= layer)


def prune_layer_for(trace, layer: int) -> int | None:
    """The prune layer a slider position shows: the layer itself or the last prune layer before it."""
    before = [p for p in trace.prune_layers if p <= layer]
    return before[-1] if before else None


def filter_overlay(trace, layer: int, image=None, *, selected=None, gt_masks=None, base=None) -> np.ndarray:
    """Stage 2 at prune layer ``layer``: kept (and why) vs dropped, exact colours in STATUS_COLOURS."""
    geom, base = _prepare(trace, image, base)
    codes = status_map(trace, layer)
    colours = np.zeros(codes.shape + (3,), np.uint8)
    for code, rgb in STATUS_COLOURS.items():
        colours[codes == code] = rgb
    alpha = np.where(codes == DROPPED, 0.65, np.where(codes == NOT_ENTERING, 0.75, 0.35)).astype(np.float32)
    return _finish(paint(base, geom, colours, alpha), geom, selected, gt_masks)


def kv_map(trace, layer: int) -> np.ndarray:
    """(G, G) KV_CACHED / KV_TRIMMED / KV_ABSENT for one LLM layer."""
    cached = trace.patch("kv_cached")[layer].astype(bool)
    processed = processed_map(trace, layer)
    out = np.full(cached.shape, KV_ABSENT, np.int64)
    out[processed] = KV_TRIMMED
    out[cached] = KV_CACHED
    return out


def kv_overlay(trace, layer: int, image=None, *, selected=None, gt_masks=None, base=None) -> np.ndarray:
    """Stage 3: which image patches LLM layer ``layer`` still holds in its KV cache after prefill."""
    geom, base = _prepare(trace, image, base)
    codes = kv_map(trace, layer)
    colours = np.zeros(codes.shape + (3,), np.uint8)
    for code, rgb in KV_COLOURS.items():
        colours[codes == code] = rgb
    alpha = np.where(codes == KV_CACHED, 0.3, 0.7).astype(np.float32)
    return _finish(paint(base, geom, colours, alpha), geom, selected, gt_masks)


def kept_patches(trace, layer: int) -> np.ndarray:
    """(G, G) bool: patches whose token survives prune layer ``layer`` (the truth views are tested against)."""
    toks = trace.arrays[f"stage2.L{layer}.tokens"]
    status = trace.arrays[f"stage2.L{layer}.status"]
    kept_tokens = set(int(t) for t, s in zip(toks, status) if s != DROPPED)
    token = trace.patch("token")
    return np.isin(token, list(kept_tokens)) if kept_tokens else np.zeros(token.shape, bool)


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


def legend_html(kind: str, trace=None, layer: int | None = None, inspected: bool = True) -> str:
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
            v = heatmap_values(trace, kind, layer)
            if v is not None and np.isfinite(v).any():
                _, (a, b), _ = heat_colours(v, cmap, log)
                lo, hi = (f"{10 ** a:.2g}", f"{10 ** b:.2g}") if log else (f"{a:.3g}", f"{b:.3g}")
        parts = [html.escape(title) + ": ", _gradient(cmap, lo, hi), _swatch(NAN_COLOUR, "no value (stage off or not entering)")]
        if kind == "cls_attention":
            parts.append(_swatch(KEY_OUTLINE, "white outline: key token set (never dropped)"))
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
    if inspected:
        parts.append(_swatch(SELECT_OUTLINE, "magenta outline: inspected patch"))
    return '<div style="font-size:0.9em;line-height:1.6">' + "".join(parts) + "</div>"


# ----------------------------------------------------------------------------- lifecycle
def patch_lifecycle(trace, row: int, col: int) -> dict:
    """Everything the trace knows about one original patch, stage by stage (plain data)."""
    G = trace.grid
    if not (isinstance(row, (int, np.integer)) and isinstance(col, (int, np.integer))):
        raise ValueError(f"row and column must be integers, got {row!r}, {col!r}")
    if not (0 <= row < G and 0 <= col < G):
        raise ValueError(f"patch ({row}, {col}) is outside the {G} x {G} grid (rows and columns 0..{G - 1})")
    m = trace.meta
    tok = int(trace.patch("token")[row, col])
    groups = trace.arrays["tokens.groups"]
    members = [int(x) for x in groups[tok] if x >= 0] if tok >= 0 else []
    out = {"patch": int(row * G + col), "row": int(row), "col": int(col), "token": tok,
           "merged": bool(trace.patch("merged")[row, col]), "group": members,
           "key": bool(trace.patch("key")[row, col]),
           "dropped_after_layer": int(trace.patch("dropped_after_layer")[row, col])}
    if "patch.similarity" in trace.arrays:
        out["window_similarity"] = float(trace.patch("similarity")[row, col])
    if "patch.cls_attention" in trace.arrays:
        v = float(trace.patch("cls_attention")[row, col])
        out["cls_attention"] = None if math.isnan(v) else v
    cfg = m["config"]
    stages2 = []
    for layer in trace.prune_layers:
        s = int(trace.patch(f"stage2.L{layer}.status")[row, col])
        g = float(trace.patch(f"stage2.L{layer}.global_share")[row, col])
        i = float(trace.patch(f"stage2.L{layer}.individual_max")[row, col])
        stages2.append({"layer": layer, "status": s, "status_name": STATUS_LABELS.get(s, str(s)),
                        "global_share": None if math.isnan(g) else g,
                        "individual_max": None if math.isnan(i) else i,
                        "global_thr": cfg["global_thr"], "individual_thr": cfg["individual_thr"]})
    out["stage2"] = stages2
    cached = trace.patch("kv_cached")[:, row, col].astype(bool)
    out["kv_cached_layers"] = [int(x) for x in np.nonzero(cached)[0]]
    return out


def _fmt(v):
    return "–" if v is None else f"{v:.3g}"


def lifecycle_markdown(trace, row: int, col: int) -> str:
    """The lifecycle of one patch as Markdown for the patch inspector."""
    d = patch_lifecycle(trace, row, col)
    m = trace.meta
    L = trace.num_layers
    lines = [f"### Patch ({d['row']}, {d['col']}) — patch id {d['patch']}"]
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
        lines.append(f"- **Stage 1b:** CLS attention {_fmt(d.get('cls_attention'))}; "
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
        for i, p in enumerate(gen["tokens"]):
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
def slide_figure(trace, image=None, vanilla=None, layer: int | None = None, gt_masks=None, view=None):
    """A projector-readable multi-panel matplotlib figure: one panel per stage plus the count curve."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 15, "axes.titlesize": 17, "axes.labelsize": 15, "legend.fontsize": 12})
    geom = geometry(trace, target=336)
    base = base_canvas(image, trace, geom, view=view)
    prune = trace.prune_layers
    pl = prune_layer_for(trace, layer) if layer is not None else None
    if pl is None and prune:   # the prune layer that dropped the most
        pl = max(trace.meta["stage2"], key=lambda s: s["dropped"])["layer"]
    kv_layer = layer if layer is not None and 0 <= layer < trace.num_layers else (prune[0] if prune else 0)
    panels = [("1a  local spatial merge", merge_overlay(trace, base=base, gt_masks=gt_masks)),
              ("1b  CLS attention + key set", key_overlay(trace, base=base, gt_masks=gt_masks))]
    if pl is not None:
        s2 = next(s for s in trace.meta["stage2"] if s["layer"] == pl)
        panels.append((f"2  filter after layer {pl}: {s2['dropped']} of {s2['entering']} dropped",
                       filter_overlay(trace, pl, base=base, gt_masks=gt_masks)))
    else:
        panels.append(("2  dual-attention filter: off", base))
    panels.append((f"3  KV cache of layer {kv_layer}", kv_overlay(trace, kv_layer, base=base, gt_masks=gt_masks)))
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
    fig, axes = plt.subplots(2, 3, figsize=(19.2, 10.8), dpi=100)
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
        ax.text(0.0, 0.02, "white contours: ground-truth objects", fontsize=12, transform=ax.transAxes)
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
                view=None):
    """Write the slide figure as PNG and PDF into ``folder``; return both paths."""
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fig = slide_figure(trace, image, vanilla, layer, gt_masks, view=view)
    png, pdf = folder / f"{stem}.png", folder / f"{stem}.pdf"
    try:
        fig.savefig(png, dpi=100)
        fig.savefig(pdf)
    finally:
        plt.close(fig)
    return png, pdf
