"""What each colour of a view means, as HTML shown under the view."""

from __future__ import annotations

import html

import numpy as np

from ..trace import DROPPED, KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY, NOT_ENTERING
from .overlays import has_untokened, heatmap_values
from .palette import (HEATMAPS, KEY_OUTLINE, KV_ABSENT, KV_CACHED, KV_COLOURS, KV_LABELS, KV_TRIMMED,
                      NAN_COLOUR, NO_TOKEN, NO_TOKEN_LABEL, SELECT_OUTLINE, STATUS_COLOURS, STATUS_LABELS,
                      UNMERGED_DOT, group_colour, heat_colours, lut)


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


def legend_html(kind: str, trace=None, layer: int | None = None, inspected: bool = True, crop: int = 0) -> str:
    """What each colour of a view means: kind is "merge", "filter", "kv" or a heatmap name."""
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
        if kind == "key_score":
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
