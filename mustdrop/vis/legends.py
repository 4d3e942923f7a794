"""What each colour of a view means, as HTML shown under the view.

Every legend of an overlay says what its centre dots are: each patch cell carries a small square
in the exact colour of its category (or score), so the category stays readable however faint the
tint, and so the pixels decode back to the trace's decisions.
"""

from __future__ import annotations

import numpy as np

from ..methods import words_of
from ..trace import DROPPED, KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY, KEPT_PROTECTED, NOT_ENTERING
from .overlays import has_untokened, heatmap_values
from .text import html_text
from .palette import (COMPARE_LABELS, GT_OUTLINE, GT_TARGET, HEATMAPS, KEY_OUTLINE, KV_ABSENT, KV_CACHED,
                      KV_COLOURS, KV_LABELS, KV_TRIMMED, NAN_COLOUR, NO_TOKEN, NO_TOKEN_LABEL, SELECT_OUTLINE,
                      STATUS_COLOURS, STATUS_LABELS, UNMERGED_DOT, group_colour, heat_colours, lut)

DOTS = {  # what the centre dots of each kind of view are
    "merge": "centre dots: each patch's exact group colour (white: not merged, its own token)",
    "heatmap": "centre dots: each patch's exact score colour on the scale (grey: no value)",
    "filter": "centre dots: each patch's exact status colour, whatever the opacity",
    "kv": "centre dots: each patch's exact cache state colour (white: cached), whatever the opacity",
    "compare": "centre dots: each patch's exact colour, whatever the opacity",
}


class Html(str):
    """A legend part that is markup already (a swatch, a ring); any other part is text and escaped."""


def _swatch(rgb, label):
    return Html(f'<span style="display:inline-flex;align-items:center;margin:2px 10px 2px 0">'
            f'<span style="display:inline-block;width:14px;height:14px;border:1px solid #333;'
            f'background:rgb{tuple(rgb)};margin-right:5px"></span>{html_text(label)}</span>')


def _ring(rgb, label, inner=None, radius="0"):
    """An outline mark: a hollow square (or circle) in ``rgb``, optionally with an inner line."""
    inner_css = f"box-shadow:inset 0 0 0 1px rgb{tuple(inner)};" if inner is not None else ""
    return Html(f'<span style="display:inline-flex;align-items:center;margin:2px 10px 2px 0">'
            f'<span style="display:inline-block;width:12px;height:12px;border:3px solid rgb{tuple(rgb)};'
            f'outline:1px solid #333;border-radius:{radius};{inner_css}background:#777;margin-right:5px"></span>'
            f'{html_text(label)}</span>')


def _dot(text):
    """The centre-dot line: a grey cell with a white dot in it, and what the dots are."""
    return Html(f'<span style="display:inline-flex;align-items:center;margin:2px 10px 2px 0">'
            f'<span style="display:inline-flex;align-items:center;justify-content:center;width:14px;height:14px;'
            f'border:1px solid #333;background:#999;margin-right:5px"><span style="width:5px;height:5px;'
            f'background:#fff"></span></span>{html_text(text)}</span>')


def _gradient(cmap, lo_label, hi_label):
    stops = ", ".join(f"rgb{tuple(int(x) for x in lut(cmap)[i])}" for i in range(0, 256, 32)) \
        + f", rgb{tuple(int(x) for x in lut(cmap)[255])}"
    return Html(f'<span style="display:inline-flex;align-items:center;margin:2px 10px 2px 0">{html_text(lo_label)}'
            f'<span style="display:inline-block;width:140px;height:12px;margin:0 6px;'
            f'background:linear-gradient(to right, {stops})"></span>{html_text(hi_label)}</span>')


def legend_html(kind: str, trace=None, layer: int | None = None, inspected: bool = True, crop: int = 0,
                gt: bool = False) -> str:
    """What each colour of a view means: kind is "merge", "filter", "kv", "compare" or a heatmap name.

    ``gt`` adds the ground-truth contours (when the view shows them); every overlay's legend says
    what its centre dots are."""
    parts = []
    if kind == "merge":
        parts = [_swatch(group_colour(0, 0), "merged window, one token (light and dark squares alternate so "
                                             "neighbouring windows stay apart)"),
                 _swatch(group_colour(0, 1), "merged window (dark square)"),
                 _swatch(UNMERGED_DOT, "white dot, no tint: patch not merged, its own token"),
                 _dot(DOTS["merge"])]
        if trace is not None:
            s = trace.meta["stage1a"]
            parts.append(f"window {s['window']}, threshold {s['threshold']}, "
                         f"{len(s['merged_windows'])} windows merged, N0 = {trace.meta['sequence']['N0']}")
    elif kind in HEATMAPS:
        _, cmap, log, title = HEATMAPS[kind]
        words = words_of(trace)
        if kind in ("global_share", "individual_max") and not words.thresholds:   # the method's own score name
            title = (f"{words.label}: {words.scores[kind]} (log scale)" if kind in words.scores else
                     f"{words.label}: does not use this score (the map repeats its score)")
        lo, hi = "low", "high"
        if trace is not None:
            v = heatmap_values(trace, kind, layer, crop)
            if v is not None and np.isfinite(v).any():
                _, (a, b), _ = heat_colours(v, cmap, log)
                lo, hi = (f"{10 ** a:.2g}", f"{10 ** b:.2g}") if log else (f"{a:.3g}", f"{b:.3g}")
        parts = [title + ": ", _gradient(cmap, lo, hi),
                 _swatch(NAN_COLOUR, "no value (stage off or not entering)"), _dot(DOTS["heatmap"])]
        if kind == "key_score":
            parts.append(_ring(KEY_OUTLINE, "yellow outline: key token set (never dropped)"))
            if trace is not None and trace.meta["stage1b"].get("score"):
                parts.append(f"key score: {trace.meta['stage1b']['score']}")
        if trace is not None and kind in ("global_share", "individual_max") and words.thresholds:
            c = trace.meta["config"]
            thr = c["global_thr"] if kind == "global_share" else c["individual_thr"]
            parts.append(f"threshold {thr:g} (a token is dropped only when BOTH scores are below their thresholds)")
        if trace is not None and kind == "similarity":
            parts.append(f"merge threshold {trace.meta['stage1a']['threshold']}")
    elif kind == "filter":
        words = words_of(trace)
        codes = (KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY, DROPPED) if words.thresholds else \
            tuple(c for c in sorted(words.statuses) if c != KEPT_PROTECTED)      # newline rows cover no patch
        parts = [_swatch(STATUS_COLOURS[k], words.status(k)) for k in codes]
        parts.append(_swatch(STATUS_COLOURS[NOT_ENTERING], STATUS_LABELS[NOT_ENTERING]))
        parts.append(_dot(DOTS["filter"] + " (kept cells tinted at half of it)"))
        if words.legend and not words.thresholds:
            parts.append(words.legend)                 # text: legend_block escapes it
    elif kind == "kv":
        parts = [_swatch(KV_COLOURS[k], KV_LABELS[k]) for k in (KV_CACHED, KV_TRIMMED, KV_ABSENT)]
        parts.append(_dot(DOTS["kv"]))
    elif kind == "compare":
        parts = [_swatch(rgb, label) for rgb, label in COMPARE_LABELS.items()]
        parts.append(_dot(DOTS["compare"]))
    if kind in ("merge", "filter", "kv", "compare") and trace is not None and has_untokened(trace):
        parts.append(_swatch(NO_TOKEN, NO_TOKEN_LABEL))
    if gt:
        parts += [_ring(GT_OUTLINE, "contour: a ground-truth object", radius="50%"),
                  _ring(GT_TARGET, "thick white contour: the object the question asks about", radius="50%")]
    if inspected:
        parts.append(_ring(SELECT_OUTLINE, "white square with a black line: inspected patch", inner=(0, 0, 0)))
    return legend_block(parts)


def legend_block(parts) -> str:
    """The legend's parts in one block; a plain-text part (a threshold, a count: trace values) is
    escaped and gets the spacing of a swatch, so it never runs into the next entry when the line wraps."""
    items = [p if isinstance(p, Html) else
             f'<span style="display:inline-block;margin:2px 10px 2px 0">{html_text(p)}</span>' for p in parts]
    return '<div style="font-size:0.9em;line-height:1.6">' + "".join(items) + "</div>"
