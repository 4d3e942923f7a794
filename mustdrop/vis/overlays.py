"""Per-stage overlays: each a (size, size, 3) uint8 picture of one decision, painted on the image.

Every function reads a Trace (and, for the background only, the image the run saw or a ready
canvas ``base``); ``crop=`` picks a LLaVA-NeXT crop, ``selected=`` outlines an inspected patch,
``gt_masks=`` outlines ground-truth objects, ``opacity=`` sets how strongly the category colours
tint the image (palette.DEFAULT_OPACITY; the exact centre dots are the same at every opacity).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .geometry import Geometry, base_canvas, geometry, geometry_of_canvas, outline, paint
from .palette import (BLACK, DEFAULT_OPACITY, GT_OUTLINE, GT_TARGET, HEATMAPS, KEPT_STATUSES, KEY_OUTLINE,
                      KV_ABSENT, KV_CACHED, KV_COLOURS, KV_TRIMMED, NAN_COLOUR, NO_TOKEN, NO_TOKEN_CODE, SELECT_OUTLINE,
                      STATUS_COLOURS, UNMERGED_DOT, WEIGHT_KEPT, WEIGHT_REMOVED, WEIGHT_UNTOUCHED,
                      check_opacity, group_colour, heat_colours, window_shade)


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """Object masks of a scene: (k, G, G) patch coverage or (k, H, W) boolean pixel masks, and the
    ids of the objects the question asks about (outlined thicker, in GT_TARGET instead of GT_OUTLINE)."""

    masks: np.ndarray
    targets: tuple = ()


# ----------------------------------------------------------------------------- category maps
def status_map(trace, layer: int, crop: int = 0) -> np.ndarray:
    """(G, G) stage-2 status codes at a prune layer (NOT_ENTERING where the patch's token had gone,
    NO_TOKEN_CODE where the patch reaches the LLM in no token)."""
    out = trace.stage2_patch(layer, "status", crop).astype(np.int64)
    out[~trace.has_token(crop)] = NO_TOKEN_CODE
    return out


def kv_map(trace, layer: int, crop: int = 0) -> np.ndarray:
    """(G, G) KV_CACHED / KV_TRIMMED / KV_ABSENT (/ NO_TOKEN_CODE) for one LLM layer."""
    cached = trace.kv_cached_at(layer, crop)
    out = np.full(cached.shape, KV_ABSENT, np.int64)
    out[trace.processed_at(layer, crop)] = KV_TRIMMED
    out[cached] = KV_CACHED
    out[~trace.has_token(crop)] = NO_TOKEN_CODE
    return out


def heatmap_values(trace, name: str, layer: int | None = None, crop: int = 0) -> np.ndarray | None:
    """The (G, G) values a heatmap shows, or None when the trace has none (stage off)."""
    if name in ("global_share", "individual_max"):
        if layer is None or layer not in trace.prune_layers:
            return None
        return trace.stage2_patch(layer, name, crop)
    key = HEATMAPS[name][0]
    return trace.patch(key, crop) if trace.has_patch(key, crop) else None


def has_untokened(trace) -> bool:
    """Whether some patch reaches the LLM in no token (LLaVA-NeXT tiles' unpadded borders)."""
    return any((~trace.has_token(c)).any() for c in range(trace.n_crops))


# ----------------------------------------------------------------------------- outlines
def _select(img, geom, selected):
    """The inspected patch: a white square (3 px) with a black line inside it, readable on any colour."""
    if selected is None:
        return img
    r, c = selected
    cells = np.zeros(geom.shape, bool)
    if 0 <= r < geom.rows and 0 <= c < geom.cols:
        cells[r, c] = True
    img = outline(img, geom, cells, SELECT_OUTLINE, width=3)
    return outline(img, geom, cells, BLACK, width=1, inset=3)


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
    for ids, colour, thick in ((others, GT_OUTLINE, False), (targets, GT_TARGET, True)):
        if not ids:
            continue
        dark, light = _gt_rings(geom, masks[ids], thick)
        img[dark] = (0, 0, 0)
        img[light] = colour
    return img


_GT_CACHE: dict = {}


def _gt_rings(geom: Geometry, masks: np.ndarray, thick: bool = False):
    """Pixel masks of the dark (4 px; thick 7 px) and light (2 px; thick 4 px) contour lines of every
    object (memoised)."""
    import cv2

    wd, wl = (7, 4) if thick else (4, 2)
    key = (geom, thick, masks.shape, hashlib.sha1(np.ascontiguousarray(masks).tobytes()).hexdigest())
    if key in _GT_CACHE:
        return _GT_CACHE[key]
    if masks.ndim == 2:
        masks = masks[None]
    dark = np.zeros((geom.size, geom.width), np.uint8)
    light = np.zeros_like(dark)
    for m in masks:
        m = np.asarray(m, np.float32)
        m = cv2.resize((m > (0.25 if m.shape[0] == geom.rows else 0.5)).astype(np.uint8) * 255,
                       (geom.width, geom.size), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(dark, contours, -1, 1, wd)
        cv2.drawContours(light, contours, -1, 1, wl)
    if len(_GT_CACHE) > 64:
        _GT_CACHE.clear()
    _GT_CACHE[key] = (dark.astype(bool), light.astype(bool))
    return _GT_CACHE[key]


def _prepare(trace, image, base, crop=0):
    """Geometry and background: from a ready canvas (its size sets the cell) or from the image."""
    if base is not None:
        return geometry_of_canvas(trace, base, crop), base
    geom = geometry(trace, crop=crop)
    return geom, base_canvas(image, trace, geom, crop=crop)


def _finish(img, geom, selected=None, gt_masks=None):
    return _select(_gt(img, geom, gt_masks), geom, selected)


# ----------------------------------------------------------------------------- stage views
def merge_overlay(trace, image=None, *, selected=None, gt_masks=None, base=None, crop: int = 0,
                  opacity: float = DEFAULT_OPACITY) -> np.ndarray:
    """Stage 1a: each merged window tinted with its group's colour (the merge hue, light or dark by
    the window's checkerboard square; exact colour dot); unmerged patches keep the image and a white dot."""
    o = check_opacity(opacity)
    geom, base = _prepare(trace, image, base, crop)
    side = max(geom.shape)     # window_shade numbers patches on a square grid: any (rows, cols) fits in it
    token = trace.patch("token", crop)
    merged = trace.patch("merged", crop).astype(bool)
    w = int(trace.meta["crops"][crop].get("window_patches") or trace.meta["stage1a"].get("window") or 1)
    colours = np.empty(geom.shape + (3,), np.uint8)
    colours[:] = UNMERGED_DOT
    rows, cols = np.nonzero(merged)
    for r, c in zip(rows, cols):
        colours[r, c] = group_colour(int(token[r, c]), window_shade(r * side + c, side, w))
    colours[token < 0] = NO_TOKEN
    alpha = np.where(merged | (token < 0), WEIGHT_REMOVED, WEIGHT_UNTOUCHED) * o
    return _finish(paint(base, geom, colours, alpha.astype(np.float32)), geom, selected, gt_masks)


def heatmap_overlay(trace, name: str, image=None, layer: int | None = None, *, selected=None,
                    gt_masks=None, base=None, outline_key: bool | None = None, crop: int = 0,
                    opacity: float = DEFAULT_OPACITY) -> np.ndarray:
    """A score on the score ramp over the image (exact colour dots; cells with no value in NAN_COLOUR at
    half the tint); key patches outlined in the key yellow on the key-score map."""
    o = check_opacity(opacity)
    geom, base = _prepare(trace, image, base, crop)
    values = heatmap_values(trace, name, layer, crop)
    if values is None:
        colours = np.full(geom.shape + (3,), NAN_COLOUR, np.uint8)
        img = paint(base, geom, colours, o * WEIGHT_KEPT)
    else:
        _, cmap, log, _ = HEATMAPS[name]
        colours, _, finite = heat_colours(values, cmap, log)
        img = paint(base, geom, colours, (np.where(finite, WEIGHT_REMOVED, WEIGHT_KEPT) * o).astype(np.float32))
    if outline_key or (outline_key is None and name == "key_score"):
        img = outline(img, geom, trace.patch("key", crop).astype(bool), KEY_OUTLINE, width=2)
    return _finish(img, geom, selected, gt_masks)


def key_overlay(trace, image=None, **kw) -> np.ndarray:
    """Stage 1b: the key score as a heatmap with the key token set outlined in the key yellow."""
    return heatmap_overlay(trace, "key_score", image, outline_key=True, **kw)


def _category_alpha(codes: np.ndarray, weights: dict, opacity: float) -> np.ndarray:
    alpha = np.full(codes.shape, WEIGHT_REMOVED, np.float32)
    for code, w in weights.items():
        alpha[codes == code] = w
    return alpha * np.float32(opacity)


def filter_overlay(trace, layer: int, image=None, *, selected=None, gt_masks=None, base=None,
                   crop: int = 0, opacity: float = DEFAULT_OPACITY) -> np.ndarray:
    """Stage 2 at prune layer ``layer``: kept (and why) vs dropped, exact colours in STATUS_COLOURS;
    kept cells tinted at half the opacity, so what was dropped stands out."""
    o = check_opacity(opacity)
    geom, base = _prepare(trace, image, base, crop)
    codes = status_map(trace, layer, crop)
    colours = np.zeros(codes.shape + (3,), np.uint8)
    for code, rgb in STATUS_COLOURS.items():
        colours[codes == code] = rgb
    colours[codes == NO_TOKEN_CODE] = NO_TOKEN
    alpha = _category_alpha(codes, {k: WEIGHT_KEPT for k in KEPT_STATUSES}, o)
    return _finish(paint(base, geom, colours, alpha), geom, selected, gt_masks)


def kv_overlay(trace, layer: int, image=None, *, selected=None, gt_masks=None, base=None,
               crop: int = 0, opacity: float = DEFAULT_OPACITY) -> np.ndarray:
    """Stage 3: which image patches LLM layer ``layer`` still holds in its KV cache after prefill
    (cached patches untinted with a white dot; trimmed and absent ones tinted)."""
    o = check_opacity(opacity)
    geom, base = _prepare(trace, image, base, crop)
    codes = kv_map(trace, layer, crop)
    colours = np.zeros(codes.shape + (3,), np.uint8)
    for code, rgb in KV_COLOURS.items():
        colours[codes == code] = rgb
    colours[codes == NO_TOKEN_CODE] = NO_TOKEN
    alpha = _category_alpha(codes, {KV_CACHED: WEIGHT_UNTOUCHED}, o)
    return _finish(paint(base, geom, colours, alpha), geom, selected, gt_masks)


def blank_overlay(trace, base: np.ndarray, opacity: float = DEFAULT_OPACITY, crop: int = 0) -> np.ndarray:
    """A view of a stage that did not run: every cell 'no value' grey."""
    geom = geometry_of_canvas(trace, base, crop)
    return paint(base, geom, np.full(geom.shape + (3,), NAN_COLOUR, np.uint8),
                 check_opacity(opacity) * WEIGHT_KEPT)
