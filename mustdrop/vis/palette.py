"""Colours of every view: exact category colours (Okabe-Ito, colour-blind safe), score colormaps.

Every category colour is unique so that the pixels of an overlay decode back to its categories
(:func:`mustdrop.vis.geometry.decode_categories`).
"""

from __future__ import annotations

import colorsys

import numpy as np

from ..trace import (DROPPED, KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY, NOT_ENTERING,
                     STATUS_NAMES)

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
KEPT_STATUSES = (KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY)

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
GT_TARGET = (240, 228, 66)             # the object the question asks about
BACKGROUND = (150, 150, 150)           # canvas when the run's image is not at hand (trace replay)

HEATMAPS = {  # name -> (patch map, colormap, log scale, title); stage-2 maps are per prune layer
    "similarity": ("similarity", "viridis", False, "Stage 1a: window similarity (mean pairwise cosine)"),
    "key_score": ("key_score", "cividis", True, "Stage 1b: key score (head-mean CLS attention, log scale)"),
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
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


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


# Same-budget comparison (mustdrop.vis.compare): which method keeps a patch after the layer shown.
# Okabe-Ito's reddish purple and Paul Tol's muted indigo and olive, none of them a colour above;
# checked pairwise under simulated protanopia, deuteranopia and tritanopia (Machado 2009, severity
# 1): CIELAB distance >= 20 between any two of the four.
COMPARE_BOTH = (204, 121, 167)             # reddish purple: kept by both methods
COMPARE_ONLY_MUSTDROP = (51, 34, 136)      # indigo: kept only by MustDrop
COMPARE_ONLY_OTHER = (153, 153, 51)        # olive: kept only by the compared method
COMPARE_NEITHER = (60, 60, 60)             # dark grey: kept by neither (darker than NOT_ENTERING's grey)
COMPARE_BOTH_LABEL = "kept by both"
COMPARE_ONLY_MUSTDROP_LABEL = "kept only by MustDrop"
COMPARE_ONLY_OTHER_LABEL = "kept only by the compared method"
COMPARE_NEITHER_LABEL = "kept by neither"
