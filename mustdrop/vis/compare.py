"""MustDrop against a same-budget baseline on the same input: which patches each keeps after an LLM
layer, their overlap, both answers and both budgets.

"Kept after layer l" is ``Trace.alive_after(l)``: the patch is covered by a vision token still in
the sequence once layer l has run (what layer l + 1 receives; at a prune layer, the filter's kept
set). A token may cover several patches (a stage-1a window, a VisionZip contextual token, a pooled
cell): each of them counts as kept. Both traces are read the same way, so a baseline's trace needs
nothing MustDrop's does not have. The overlap is drawn with exact colours
(palette.COMPARE_*), so :func:`mustdrop.vis.geometry.decode_categories` reads it back.
"""

from __future__ import annotations

import numpy as np

from .. import accounting
from ..trace import TraceError
from .geometry import geometry, geometry_of_canvas, outline, paint
from .palette import (COMPARE_BOTH, COMPARE_BOTH_LABEL, COMPARE_NEITHER, COMPARE_NEITHER_LABEL,
                      COMPARE_ONLY_MUSTDROP, COMPARE_ONLY_MUSTDROP_LABEL, COMPARE_ONLY_OTHER,
                      COMPARE_ONLY_OTHER_LABEL, DEFAULT_OPACITY, WEIGHT_KEPT, WEIGHT_REMOVED, WHITE,
                      check_opacity)
from .text import md_text, mpl_text

SHARED_OUTLINE = WHITE               # thin border on the single-method maps: the patch shares its token

NEITHER, ONLY_MUSTDROP, ONLY_OTHER, BOTH = 0, 1, 2, 3
OVERLAP_COLOURS = {BOTH: COMPARE_BOTH, ONLY_MUSTDROP: COMPARE_ONLY_MUSTDROP, ONLY_OTHER: COMPARE_ONLY_OTHER,
                   NEITHER: COMPARE_NEITHER}
OVERLAP_LABELS = {BOTH: COMPARE_BOTH_LABEL, ONLY_MUSTDROP: COMPARE_ONLY_MUSTDROP_LABEL,
                  ONLY_OTHER: COMPARE_ONLY_OTHER_LABEL, NEITHER: COMPARE_NEITHER_LABEL}
OVERLAP_KEYS = {BOTH: "both", ONLY_MUSTDROP: "only_mustdrop", ONLY_OTHER: "only_other", NEITHER: "neither"}
KEPT, NOT_KEPT = 1, 0


def kept_colours(side: str) -> dict:
    """Exact colours of one method's kept map: MustDrop's kept patches in its overlap colour, the
    compared method's in its own, what it does not keep in the 'neither' grey."""
    return {KEPT: COMPARE_ONLY_MUSTDROP if side == "mustdrop" else COMPARE_ONLY_OTHER, NOT_KEPT: COMPARE_NEITHER}


def method_name(trace) -> str:
    """The method's label ('MustDrop', 'FastV', 'VisionZip-style', a plug-in's), as the trace stores it."""
    from ..methods import words_of

    return words_of(trace).label


def is_baseline(trace) -> bool:
    return (trace.meta.get("config") or {}).get("method", "mustdrop") != "mustdrop"


def same_input(a, b) -> bool:
    """Whether two traces are runs of the same image and question on the same model geometry (the
    pairing rule of every pair of traces: a vanilla or a comparison trace with its MustDrop trace)."""
    same = a.meta["input"].get("input_hash") == b.meta["input"].get("input_hash")
    same_grids = a.n_crops == b.n_crops and all(a.crop_grid(c) == b.crop_grid(c) for c in range(a.n_crops))
    return same and same_grids and a.num_layers == b.num_layers


def check_pair(md, other) -> None:
    """Refuse a comparison of traces that are not of the same input and model (clear message)."""
    if not is_baseline(other):
        raise TraceError("the comparison trace is not a same-budget baseline (its config method is 'mustdrop')")
    if not same_input(md, other):
        raise TraceError("the comparison trace is of another image, question or model than the MustDrop trace")


def kept_after(trace, layer: int, crop: int = 0) -> np.ndarray:
    """(G, G) bool: the patches a run keeps after LLM layer ``layer`` (see the module docstring)."""
    return trace.alive_after(int(layer), crop)


def overlap_map(md, other, layer: int, crop: int = 0) -> np.ndarray:
    """(G, G) codes BOTH / ONLY_MUSTDROP / ONLY_OTHER / NEITHER after LLM layer ``layer``."""
    a, b = kept_after(md, layer, crop), kept_after(other, layer, crop)
    return np.where(a & b, BOTH, np.where(a, ONLY_MUSTDROP, np.where(b, ONLY_OTHER, NEITHER))).astype(np.int64)


def overlap_counts(md, other, layer: int, crop: int = 0) -> dict:
    """Patches in each overlap category after ``layer`` ({"both": n, "only_mustdrop": n, ...})."""
    codes = overlap_map(md, other, layer, crop)
    return {key: int((codes == code).sum()) for code, key in OVERLAP_KEYS.items()}


def tokens_after(trace, layer: int) -> int:
    """Vision tokens in the sequence after LLM layer ``layer`` (those it processed, less its drops)."""
    s = trace.stage2(int(layer))
    return int(trace.meta["vision_tokens_per_layer"][int(layer)]) - (int(s["dropped"]) if s else 0)


def _draw(trace, codes, colours, base, selected, gt_masks, crop, opacity=DEFAULT_OPACITY):
    """Cells tinted at the palette's weights (what neither keeps at full opacity, kept cells at half);
    the centre dots hold the exact colours."""
    from .overlays import _finish, _prepare

    o = check_opacity(opacity)
    geom, base = _prepare(trace, None, base, crop)
    rgb = np.zeros(geom.shape + (3,), np.uint8)
    for code, c in colours.items():
        rgb[codes == code] = c
    alpha = (np.where(codes == NEITHER, WEIGHT_REMOVED, WEIGHT_KEPT) * o).astype(np.float32)
    return _finish(paint(base, geom, rgb, alpha), geom, selected, gt_masks)


def kept_overlay(trace, layer: int, side: str = "other", *, base=None, selected=None, gt_masks=None,
                 crop: int = 0, opacity: float = DEFAULT_OPACITY) -> np.ndarray:
    """One run's kept patches after ``layer``: exact colours kept_colours(side)."""
    kept = kept_after(trace, layer, crop)
    img = _draw(trace, np.where(kept, KEPT, NOT_KEPT), kept_colours(side), base, None, None, crop, opacity)
    from .overlays import _finish

    geom = geometry_of_canvas(trace, img, crop)
    img = outline(img, geom, kept & shared_token(trace, crop), SHARED_OUTLINE, width=1)
    return _finish(img, geom, selected, gt_masks)


def shared_token(trace, crop: int = 0) -> np.ndarray:
    """(G, G) bool: the patch's token covers other patches too (a stage-1a window, a VisionZip
    contextual token, a pooled cell)."""
    token = trace.patch("token", crop)
    ids, counts = np.unique(token[token >= 0], return_counts=True)
    return np.isin(token, ids[counts > 1])


def overlap_overlay(md, other, layer: int, *, base=None, selected=None, gt_masks=None, crop: int = 0,
                    opacity: float = DEFAULT_OPACITY) -> np.ndarray:
    """Both runs' kept patches after ``layer`` in the four overlap categories (OVERLAP_COLOURS)."""
    return _draw(md, overlap_map(md, other, layer, crop), OVERLAP_COLOURS, base, selected, gt_masks, crop, opacity)


def budgets(md, other) -> dict:
    """Both runs' equivalent tokens in both conventions, and the budget the baseline was given."""
    out = {}
    for key, t in (("mustdrop", md), ("other", other)):
        e = accounting.summarize(t)["equivalent_tokens"]
        out[key] = {"authors": float(e["authors"]), "compute": float(e["compute"])}
    plan = (other.meta.get("baseline") or {}).get("plan") or {}
    out["given"] = float(plan.get("budget", other.meta["config"].get("budget") or float("nan")))
    return out


def summary(md, other, layer: int, crop: int = 0, all_layers: bool = False) -> dict:
    """What the comparison shows, as plain data (the /analyze API returns it as JSON, with
    ``all_layers`` the overlap after every LLM layer too)."""
    b = budgets(md, other)
    out = {"method": (other.meta.get("config") or {}).get("method"), "method_name": method_name(other),
            "layer": int(layer), "overlap": overlap_counts(md, other, layer, crop),
            "answers": {"mustdrop": md.answer, "other": other.answer},
            "equivalent_tokens": {"mustdrop": b["mustdrop"], "other": b["other"]}, "budget_given": b["given"],
            "tokens_after_layer": {"mustdrop": tokens_after(md, layer), "other": tokens_after(other, layer)}}
    if all_layers:
        out["overlap_per_layer"] = [overlap_counts(md, other, k, crop) for k in range(md.num_layers)]
    return out


def compare_markdown(md, other, layer: int, vanilla=None, crop: int = 0) -> str:
    """Counts of the overlap, both answers (and vanilla's), both budgets in both conventions."""
    s = summary(md, other, layer, crop)
    name, o, e = s["method_name"], s["overlap"], s["equivalent_tokens"]
    n = sum(o.values())
    esc = md_text
    lines = [f"**MustDrop {esc(md.meta['config'].get('preset'))} against {esc(name)} at the same budget**, "
             f"after LLM layer {layer} (patches of {n}):", "",
             "| kept by both | only by MustDrop | only by " + esc(name) + " | by neither |", "|---|---|---|---|",
             f"| {o['both']} | {o['only_mustdrop']} | {o['only_other']} | {o['neither']} |", "",
             "| | MustDrop | " + esc(name) + " |", "|---|---|---|",
             f"| answer | {esc(md.answer)} | {esc(other.answer)} |",
             f"| vision tokens after layer {layer} | {s['tokens_after_layer']['mustdrop']} | "
             f"{s['tokens_after_layer']['other']} |",
             f"| patches kept after layer {layer} | {o['both'] + o['only_mustdrop']} | {o['both'] + o['only_other']} |",
             f"| equivalent tokens, authors' convention | {e['mustdrop']['authors']:.1f} | {e['other']['authors']:.1f} |",
             f"| equivalent tokens, compute convention | {e['mustdrop']['compute']:.1f} | {e['other']['compute']:.1f} |",
             "",
             f"{esc(name)} was given MustDrop's compute-convention figure, {s['budget_given']:.2f} tokens, as its "
             "budget (the mean over LLM layers of the vision tokens each layer processed; met within half a token, "
             "pooling only to round(sqrt(budget))^2; `mustdrop.matched`). A patch counts as kept when a token "
             "covering it (alone, a merged window, a VisionZip contextual token, a pooled cell) is still in the "
             "sequence after the layer."]
    if vanilla is not None:
        lines[1:1] = ["", f"Vanilla answer (no pruning): {esc(vanilla.answer)}"]
    return "\n".join(lines)


def legend_html(other=None, inspected: bool = True) -> str:
    """What each colour of the comparison views means."""
    from .legends import DOTS, _dot, _ring, _swatch, legend_block
    from .palette import SELECT_OUTLINE

    name = method_name(other) if other is not None else "the compared method"
    labels = dict(OVERLAP_LABELS)
    labels[ONLY_OTHER] = f"kept only by {name}"
    parts = [_swatch(OVERLAP_COLOURS[k], labels[k]) for k in (BOTH, ONLY_MUSTDROP, ONLY_OTHER, NEITHER)]
    parts.append(_dot(DOTS["compare"]))
    parts.append("single-method maps: MustDrop's kept patches in purple, "
                 f"{name}'s in rose, the rest dark grey; a thin white border: the patch shares its "
                 "token with others (a merged window, a VisionZip contextual token, a pooled cell)")
    if inspected:
        parts.append(_ring(SELECT_OUTLINE, "white square with a black line: inspected patch", inner=(0, 0, 0)))
    return legend_block(parts)


# ----------------------------------------------------------------------------- slides
def draw_slide_panel(ax_image, ax_text, md, other, layer: int | None = None, *, base=None, gt_masks=None,
                     crop: int = 0, opacity: float = DEFAULT_OPACITY) -> None:
    """The slide's comparison column: the overlap after ``layer`` in ``ax_image``, counts, answers
    (wrapped, never cut; special tokens removed) and budgets in ``ax_text``."""
    import textwrap

    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from .readouts import strip_special

    layer = layer if layer is not None and 0 <= layer < md.num_layers else md.start_layer
    if base is None:
        from .geometry import base_canvas
        base = base_canvas(None, md, geometry(md, target=336), crop=crop)
    s = summary(md, other, layer, crop)
    name, o, e = s["method_name"], s["overlap"], s["equivalent_tokens"]
    ax_image.imshow(overlap_overlay(md, other, layer, base=base, gt_masks=gt_masks, crop=crop, opacity=opacity))
    ax_image.set_title(f"vs {name}, after layer {layer} (0-based)", parse_math=False)
    ax_image.set_axis_off()
    short = {BOTH: f"both: {o['both']}", ONLY_MUSTDROP: f"only MustDrop: {o['only_mustdrop']}",
             ONLY_OTHER: f"only {mpl_text(name)}: {o['only_other']}", NEITHER: f"neither: {o['neither']}"}
    dots = Line2D([], [], ls="none", marker="s", ms=5, mfc="white", mec="0.2", label="centre dot: exact colour")
    ax_image.legend(handles=[Patch(facecolor=np.array(OVERLAP_COLOURS[k]) / 255, edgecolor="0.2", label=short[k])
                             for k in (BOTH, ONLY_MUSTDROP, ONLY_OTHER, NEITHER)] + [dots],
                    loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8.2, frameon=False,
                    handlelength=1.2, columnspacing=1.0)
    ax_text.set_axis_off()
    width = 30

    def wrap(label, text):
        return textwrap.wrap(" ".join(str(text).split()) or "–", width, initial_indent=label,
                             subsequent_indent=" " * len(label)) or [label]

    lines = [f"same budget: {name}", f"  given {s['budget_given']:.1f} tokens", ""]
    lines += wrap("MustDrop: ", strip_special(md.answer, md)) + wrap(f"{name}: ", strip_special(other.answer, other))
    lines += ["", "eq. tokens  MustDrop / other", f"  authors' {e['mustdrop']['authors']:6.1f} / {e['other']['authors']:.1f}",
              f"  compute  {e['mustdrop']['compute']:6.1f} / {e['other']['compute']:.1f}"]
    ax_text.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=11,
                 transform=ax_text.transAxes, parse_math=False)
