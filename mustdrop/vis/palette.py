"""Colours of every view, one meaning per colour, and the opacity of the category tints.

One table, used by every tab, legend, slide and curve. Hues are OKLCH hue angles (a perceptual hue
circle); every coloured meaning sits at least 30 degrees from every other one, the score ramp
included, and the neutrals (black to white) differ in lightness by at least 30 grey
levels. Okabe-Ito colours (colour-blind safe) where they fit; the few others are chosen so that, in
every view, the colours shown together stay apart under simulated deuteranopia, protanopia and
tritanopia (tests/test_palette.py checks the hues, the greys and the simulations).

    colour            RGB              meaning (where)
    vermillion        213,  94,   0    dropped at this prune layer (2; prune-layer lines of the curves)
    yellow            240, 228,  66    key token: never dropped (1b outline, 2 status)
    lime              two shades       merged window, one token (1a; light / dark shades alternate)
    bluish green        0, 161, 127    kept: global share above its threshold (2)
    teal ramp         dark -> light    score, low -> high (1a similarity, 1b key score, 2 both scores)
    blue                0, 114, 178    kept: both scores above their thresholds (2)
    violet             88,  77, 197    trimmed by stage 3: processed in prefill, not in the cache (3)
    purple            139,  47, 176    kept only by MustDrop (compare)
    reddish purple    214, 136, 179    kept: individual max above its threshold (2)
    rose              237, 101, 114    kept only by the compared method (compare)
    white             255, 255, 255    untouched: not merged (1a), in this layer's KV cache (3) — no tint
    light grey        224, 224, 224    kept by both methods (compare)
    grey              192, 192, 192    answer tokens from the first difference on (answers, text only)
    mid grey          144, 144, 144    no value: stage off or token gone (heatmaps)
    dark grey          96,  96,  96    gone before this layer: dropped at an earlier prune layer (2, 3)
    black               0,   0,   0    no token: padding the processor removed (LLaVA-NeXT)

Outlines are marks, told apart by shape: the inspected patch is a white square with a black inner
line; ground-truth objects are contours on a black halo, light grey for every object and thick white
for the one the question asks about; key tokens are outlined in their yellow. Curves are black and
greys told apart by dash (no hue), their prune-layer lines vermillion (where stage 2 drops).

Every cell also carries a centre dot in its EXACT category colour, whatever the opacity, so the
pixels of an overlay decode back to its categories (:func:`mustdrop.vis.geometry.decode_categories`);
every category colour is therefore unique. The tint around the dot is
``base + (colour - base) * opacity * WEIGHT`` with the category's weight (1 for what a stage removed
or merged and for scores, 0.5 for kept tokens, 0 for untouched ones), so at the default opacity the
objects show through.
"""

from __future__ import annotations

import numpy as np

from ..trace import (DROPPED, KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY, NOT_ENTERING,
                     STATUS_NAMES)


# ----------------------------------------------------------------------------- OKLab (perceptual)
_M1 = np.array([[0.4122214708, 0.5363325363, 0.0514459929], [0.2119034982, 0.6806995451, 0.1073969566],
                [0.0883024619, 0.2817188376, 0.6299787005]])
_M2 = np.array([[0.2104542553, 0.7936177850, -0.0040720468], [1.9779984951, -2.4285922050, 0.4505937099],
                [0.0259040371, 0.7827717662, -0.8086757660]])


def _linear(rgb) -> np.ndarray:
    c = np.asarray(rgb, np.float64) / 255
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _encode(lin) -> np.ndarray:
    lin = np.clip(lin, 0, 1)
    return 255 * np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)


def oklch(rgb) -> tuple[float, float, float]:
    """(lightness 0..1, chroma, hue in degrees) of an sRGB colour (Ottosson's OKLab)."""
    L, a, b = _M2 @ np.cbrt(_M1 @ _linear(rgb))
    return float(L), float(np.hypot(a, b)), float(np.degrees(np.arctan2(b, a)) % 360)


def _from_oklch(L: float, C: float, h: float):
    """(sRGB float triple 0..255, whether it is inside the gamut) of an OKLCH colour."""
    lab = np.array([L, C * np.cos(np.radians(h)), C * np.sin(np.radians(h))])
    lin = np.linalg.solve(_M1, np.linalg.solve(_M2, lab) ** 3)
    return _encode(lin), bool((lin >= -1e-6).all() and (lin <= 1 + 1e-6).all())


def _rgb(v) -> tuple[int, int, int]:
    return tuple(int(x) for x in np.clip(np.round(v), 0, 255))


# ----------------------------------------------------------------------------- the meanings
VERMILLION = (213, 94, 0)
YELLOW = (240, 228, 66)
BLUISH_GREEN = (0, 161, 127)           # Okabe-Ito bluish green (0, 158, 115) turned 5 degrees to 171
BLUE = (0, 114, 178)
VIOLET = (88, 77, 197)
PURPLE = (139, 47, 176)
REDDISH_PURPLE = (214, 136, 179)         # Okabe-Ito reddish purple (204, 121, 167), lighter
ROSE = (237, 101, 114)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

UNTOUCHED = WHITE                      # the stage shown left the patch as it was: no tint, white dot
GONE = (96, 96, 96)                    # the token was dropped before this layer
NAN_COLOUR = (144, 144, 144)           # a heatmap cell with no value
ANSWER_DIFFERS = (192, 192, 192)       # answer tokens from the first difference on (text highlight)
NO_TOKEN = BLACK                       # the patch reaches the LLM in no token (LLaVA-NeXT tile padding)
BACKGROUND = (150, 150, 150)           # canvas when the run's image is not at hand (trace replay)

STATUS_COLOURS: dict[int, tuple[int, int, int]] = {
    KEPT_BOTH: BLUE,
    KEPT_GLOBAL: BLUISH_GREEN,
    KEPT_INDIVIDUAL: REDDISH_PURPLE,
    KEPT_KEY: YELLOW,
    DROPPED: VERMILLION,
    NOT_ENTERING: GONE,
}
STATUS_LABELS = dict(STATUS_NAMES)
STATUS_LABELS[NOT_ENTERING] = "not entering: dropped at an earlier prune layer"
KEPT_STATUSES = (KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY)

NO_TOKEN_CODE = -2
NO_TOKEN_LABEL = "no token: padding the processor removed (LLaVA-NeXT unpadding)"

KV_CACHED, KV_TRIMMED, KV_ABSENT = 1, 2, 0
KV_COLOURS = {
    KV_CACHED: UNTOUCHED,              # in this layer's KV cache after prefill: the image left clear
    KV_TRIMMED: VIOLET,                # processed in prefill, removed by the stage-3 trim
    KV_ABSENT: GONE,                   # dropped before this layer in prefill, never cached
}
KV_LABELS = {
    KV_CACHED: "cached: this layer keeps the patch's K/V for decoding (white dot, no tint)",
    KV_TRIMMED: "trimmed (stage 3): processed in prefill, then removed from this layer's cache",
    KV_ABSENT: "absent: dropped before this layer (stage 2), never computed here",
}

KEY_OUTLINE = YELLOW                   # the key token set, the same yellow as its stage-2 status
UNMERGED_DOT = UNTOUCHED
SELECT_OUTLINE = WHITE                 # a white square with a black inner line (geometry of the mark)
GT_OUTLINE = (208, 208, 208)           # every ground-truth object (thin contour on a black halo)
GT_TARGET = WHITE                      # the object the question asks about (thick contour)

# ----------------------------------------------------------------------------- opacity
DEFAULT_OPACITY = 0.45
"""Opacity of the category tints: the share of a cell's colour in its pixels, for the categories of
weight 1 (the objects show through at the default; the exact centre dots do not depend on it)."""

WEIGHT_REMOVED, WEIGHT_KEPT, WEIGHT_UNTOUCHED = 1.0, 0.5, 0.0


def check_opacity(opacity) -> float:
    """The opacity as a float in [0, 1], or ValueError naming the value."""
    try:
        o = float(opacity)
    except (TypeError, ValueError):
        raise ValueError(f"opacity must be a number between 0 and 1, got {opacity!r}") from None
    if not 0.0 <= o <= 1.0:
        raise ValueError(f"opacity must be between 0 and 1, got {opacity!r}")
    return o


# ----------------------------------------------------------------------------- merge groups
MERGE_HUE = 137.0
_MERGE_SHADES = ((0.80, 0.15), (0.62, 0.15))      # (OKLCH lightness, chroma): light and dark windows


def _merge_table() -> np.ndarray:
    """(2, 256, 3) uint8: 256 distinct exact colours per shade, all of the merge hue.

    Colour i of a shade is the shade's OKLCH colour with lightness and chroma nudged by (i & 15) and
    (i >> 4) small steps, at the same hue: distinct after rounding (tests/test_palette.py checks),
    barely different to the eye.
    """
    out = np.zeros((2, 256, 3), np.uint8)
    for s, (L, C) in enumerate(_MERGE_SHADES):
        for i in range(256):
            dL, dC = ((i & 15) - 7.5) * 0.004, ((i >> 4) - 7.5) * 0.003
            out[s, i] = _rgb(_from_oklch(L + dL, C + dC, MERGE_HUE)[0])
    return out


_MERGE = _merge_table()


def group_colour(token: int, shade: int = 0) -> tuple[int, int, int]:
    """Exact colour of a merge group: the merge hue, light (shade 0) or dark (1) by the window's
    checkerboard square, so neighbouring windows differ; distinct for 256 consecutive token ids
    (a crop merges at most (G / w)^2 <= 144 windows, numbered consecutively)."""
    return tuple(int(x) for x in _MERGE[int(shade) & 1, int(token) % 256])


def window_shade(patch: int, grid: int, window: int) -> int:
    """0 or 1: the checkerboard square of the w x w window holding an original patch id."""
    r, c = divmod(int(patch) % (grid * grid), grid)
    return (r // window + c // window) % 2


# ----------------------------------------------------------------------------- score ramp
SCORE_CMAP = "mustdrop-score"
SCORE_HUE = 205.0


def _score_lut() -> np.ndarray:
    """(256, 3) uint8: OKLCH lightness 0.32 -> 0.93 at the score hue, chroma as high as sRGB allows
    (at most 0.11): perceptually even steps, one hue no category uses."""
    out = np.zeros((256, 3), np.uint8)
    for i, L in enumerate(np.linspace(0.32, 0.93, 256)):
        lo, hi = 0.0, 0.11
        if not _from_oklch(L, hi, SCORE_HUE)[1]:
            for _ in range(30):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if _from_oklch(L, mid, SCORE_HUE)[1] else (lo, mid)
            hi = lo
        out[i] = _rgb(_from_oklch(L, hi, SCORE_HUE)[0])
    return out


HEATMAPS = {  # name -> (patch map, colormap, log scale, title); stage-2 maps are per prune layer
    "similarity": ("similarity", SCORE_CMAP, False, "Stage 1a: window similarity (mean pairwise cosine)"),
    "key_score": ("key_score", SCORE_CMAP, True, "Stage 1b: key score (head-mean CLS attention, log scale)"),
    "global_share": (None, SCORE_CMAP, True, "Stage 2: global share (log scale)"),
    "individual_max": (None, SCORE_CMAP, True, "Stage 2: individual max (log scale)"),
}


def _lut(name: str) -> np.ndarray:
    if name == SCORE_CMAP:
        return _score_lut()
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return np.round(cmap(np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


_LUTS: dict[str, np.ndarray] = {}


def lut(name: str) -> np.ndarray:
    """(256, 3) uint8 colours of a colormap (the score ramp or a matplotlib name): the exact colours
    heatmap dots use."""
    if name not in _LUTS:
        _LUTS[name] = _lut(name)
    return _LUTS[name]


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


def css(rgb) -> str:
    """#rrggbb of an RGB triple (for HTML and plotly)."""
    return "#%02x%02x%02x" % tuple(int(x) for x in rgb)


# ----------------------------------------------------------------------------- the table, once
MEANINGS: dict[str, tuple[tuple[int, int, int], str]] = {
    # name -> (colour, what it means); the score ramp is listed by its two ends
    "dropped": (VERMILLION, "dropped at this prune layer (stage 2)"),
    "key": (YELLOW, "key token: never dropped (stage 1b)"),
    "merged_light": (group_colour(0, 0), "merged window (stage 1a), light square"),
    "merged_dark": (group_colour(0, 1), "merged window (stage 1a), dark square"),
    "kept_global": (BLUISH_GREEN, "kept: global share above its threshold (stage 2)"),
    "score_low": (tuple(int(x) for x in lut(SCORE_CMAP)[0]), "lowest score"),
    "score_high": (tuple(int(x) for x in lut(SCORE_CMAP)[255]), "highest score"),
    "kept_both": (BLUE, "kept: both scores above their thresholds (stage 2)"),
    "trimmed": (VIOLET, "trimmed by stage 3"),
    "compare_only_mustdrop": (PURPLE, "kept only by MustDrop"),
    "kept_individual": (REDDISH_PURPLE, "kept: individual max above its threshold (stage 2)"),
    "compare_only_other": (ROSE, "kept only by the compared method"),
    "untouched": (UNTOUCHED, "untouched: not merged (1a), cached (3)"),
    "compare_both": ((224, 224, 224), "kept by both methods"),
    "answer_differs": (ANSWER_DIFFERS, "answer tokens from the first difference on"),
    "no_value": (NAN_COLOUR, "no value"),
    "gone": (GONE, "gone before this layer"),
    "no_token": (NO_TOKEN, "no token"),
}

# ----------------------------------------------------------------------------- compare view
COMPARE_BOTH = MEANINGS["compare_both"][0]
COMPARE_ONLY_MUSTDROP = PURPLE
COMPARE_ONLY_OTHER = ROSE
COMPARE_LABELS = {
    COMPARE_BOTH: "kept by both methods",
    COMPARE_ONLY_MUSTDROP: "kept only by MustDrop",
    COMPARE_ONLY_OTHER: "kept only by the compared method",
}
COMPARE_NEITHER = GONE                 # kept by neither method: gone before this layer in both runs
COMPARE_BOTH_LABEL = COMPARE_LABELS[COMPARE_BOTH]
COMPARE_ONLY_MUSTDROP_LABEL = COMPARE_LABELS[COMPARE_ONLY_MUSTDROP]
COMPARE_ONLY_OTHER_LABEL = COMPARE_LABELS[COMPARE_ONLY_OTHER]
COMPARE_NEITHER_LABEL = "kept by neither (gone before this layer in both runs)"
