"""The slide: one projector-readable 1920 x 1080 figure of a run (the image as the model saw it, a
panel per stage, the token curve, the question and answers in full, the numbers), as PNG and PDF;
also ``python -m mustdrop.vis`` for stored traces. Layers are counted from 0 everywhere on it."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np

from .. import accounting
from ..methods import words_of
from ..trace import DROPPED, KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY, NOT_ENTERING
from .geometry import base_canvas, geometry, model_view
from .overlays import filter_overlay, key_overlay, kv_overlay, merge_overlay
from .palette import (DEFAULT_OPACITY, GONE, GT_OUTLINE, GT_TARGET, KEY_OUTLINE, KV_ABSENT, KV_CACHED, KV_COLOURS,
                      KV_TRIMMED, SCORE_CMAP, STATUS_COLOURS, UNMERGED_DOT, VERMILLION, check_opacity, group_colour,
                      lut)
from .readouts import strip_special
from .text import mpl_text

SLIDE_RC = {"font.size": 15, "axes.titlesize": 16, "axes.labelsize": 14, "legend.fontsize": 12,
            "savefig.bbox": "standard", "savefig.dpi": 100, "figure.dpi": 100}
TEXT_WIDTH = 44                       # characters per line of the text panel at its largest font


def slide_figure(trace, image=None, vanilla=None, layer: int | None = None, gt_masks=None, view=None,
                 crop: int = 0, opacity: float = DEFAULT_OPACITY, compare=None):
    """The slide as a matplotlib Figure; ``layer`` picks the stage-2/3 panels (Trace.stage2_layer_for);
    ``compare``, a same-budget baseline's trace of the same input, adds its column (vis.compare)."""
    import matplotlib

    with matplotlib.rc_context(SLIDE_RC):
        return _slide_figure(trace, image, vanilla, layer, gt_masks, view, crop, opacity, compare)


def _name_part(s, limit=48) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("._-")
    return s[:limit].strip("._-") or "x"


def kv_layer_of(trace, layer) -> int:
    """The LLM layer the stage-3 panel shows: ``layer`` when it is one, else where the trace opens."""
    return layer if layer is not None and 0 <= layer < trace.num_layers else trace.start_layer


def slide_stem(trace, layer=None, image_name: str | None = None, crop: int = 0) -> str:
    """``<model>-<preset>-<image>-L<layer>`` (sanitized; the image is its file stem when known plus
    8 hex digits of its pixel hash, so two images with one name still differ; L counts from 0)."""
    model = _name_part(str(trace.meta["model"].get("id") or "model").rstrip("/\\").replace("\\", "/").split("/")[-1])
    preset = _name_part(trace.meta["config"].get("preset") or "custom")
    sha = str(trace.meta["input"]["image"].get("sha256") or "")[:8]
    img = "-".join(p for p in (_name_part(Path(image_name).stem) if image_name else "", sha) if p) or "image"
    where = f"-{_name_part(trace.crop_name(crop))}" if trace.n_crops > 1 else ""
    return f"{model}-{preset}-{img}{where}-L{kv_layer_of(trace, layer)}"


def _wrap(label: str, text, width: int) -> list[str]:
    """``label`` then ``text`` wrapped (never cut) to ``width`` characters, continuation lines indented."""
    text = " ".join(str(text).split()) or "–"
    pad = " " * len(label)
    return textwrap.wrap(text, width, initial_indent=label, subsequent_indent=pad,
                         break_long_words=True, break_on_hyphens=False) or [label]


def text_lines(trace, vanilla, width: int = TEXT_WIDTH) -> list[str]:
    """The text panel: question and both answers in full (wrapped; special tokens removed), the numbers."""
    s = accounting.summarize(trace)
    e, f = s["equivalent_tokens"], s["flops"]
    va = strip_special(vanilla.answer, vanilla) if vanilla is not None else "(no vanilla run)"
    lines = _wrap("Q: ", trace.meta["input"]["question"], width) + [""]
    label = words_of(trace).label
    lines += _wrap("vanilla:  ", va, width) + _wrap(f"{label}: ", strip_special(trace.answer, trace), width)
    lines += ["", "equivalent tokens", f"  authors' conv.  {e['authors']:.1f}", f"  compute conv.   {e['compute']:.1f}",
              "FLOPs (image tokens, PDrop conv.)", f"  {100 * f['ratio_image_only']:.1f}% of vanilla",
              f"KV cache  {100 * s['kv']['total_bytes'] / max(1, s['kv']['vanilla_total_bytes']):.1f}% of vanilla"]
    return lines


def _fit_text(fig, ax, trace, vanilla, right: float = 1.0):
    """The text panel at the largest font (14 pt down to 6) whose wrapped lines fit from the panel's
    top to the slide's bottom edge: nothing is cut, a long question only gets smaller."""
    box = ax.get_position()
    width_px = (right - box.x0 - 0.005) * fig.get_figwidth() * fig.dpi
    height_px = (box.y1 - 0.01) * fig.get_figheight() * fig.dpi
    for size in range(14, 5, -1):
        pt = size * fig.dpi / 72
        width = max(12, int(width_px / (0.61 * pt)))          # DejaVu Sans Mono: 0.602 em per character
        lines = text_lines(trace, vanilla, width)
        if len(lines) * 1.2 * pt <= height_px:
            break
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=size,
            transform=ax.transAxes, parse_math=False)


def _slide_figure(trace, image, vanilla, layer, gt_masks, view, crop=0, opacity=DEFAULT_OPACITY, compare=None):
    from matplotlib.figure import Figure    # no pyplot: thread-safe in a server, no backend switching
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    o = check_opacity(opacity)
    geom = geometry(trace, target=336, crop=crop)
    base = base_canvas(image, trace, geom, view=view, crop=crop)
    clean = None                    # the image as the model saw it, undimmed, nothing drawn on it
    if view is not None or image is not None:
        import cv2

        v = view if view is not None else model_view(image, trace, geom.width, crop)
        clean = cv2.resize(np.ascontiguousarray(v[:, :, :3]).astype(np.uint8), (geom.width, geom.size),
                           interpolation=cv2.INTER_AREA if v.shape[0] > geom.size else cv2.INTER_LINEAR)
    prune = trace.prune_layers
    pl = trace.stage2_layer_for(layer)
    kv_layer = kv_layer_of(trace, layer)
    kw = dict(base=base, gt_masks=gt_masks if crop == 0 else None, crop=crop, opacity=o)
    where = f" ({trace.crop_name(crop)})" if trace.n_crops > 1 else ""
    panels = [("the image as the model saw it" + where, clean),
              ("1a  local spatial merge", merge_overlay(trace, **kw)),
              ("1b  key score + key set", key_overlay(trace, **kw))]
    words = words_of(trace)
    if pl is not None:
        s2 = trace.stage2(pl)
        what = "filter" if words.thresholds else words.label
        panels.append((f"2  {what} after layer {pl} (0-based):\n{s2['dropped']} of {s2['entering']} dropped",
                       filter_overlay(trace, pl, **kw)))
    else:
        panels.append(("2  dual-attention filter: off" if words.thresholds else f"2  {words.label}: no drop in the LLM",
                       base))
    panels.append((f"3  KV cache of layer {kv_layer} (0-based)", kv_overlay(trace, kv_layer, **kw)))

    def handles(pairs):
        return [Patch(facecolor=np.array(rgb) / 255, edgecolor="0.2", label=lab) for rgb, lab in pairs]

    dots = Line2D([], [], ls="none", marker="s", ms=5, mfc="white", mec="0.2", label="centre dot: exact colour")
    short = {KEPT_BOTH: "kept: both high", KEPT_GLOBAL: "kept: global share", KEPT_INDIVIDUAL: "kept: individual max",
             KEPT_KEY: "kept: key token", DROPPED: "dropped here", NOT_ENTERING: "dropped earlier"}
    if not words.thresholds:       # another method: its own status names
        short = {**{k: mpl_text(words.status(k)) for k in sorted(words.statuses) if k in short},
                 NOT_ENTERING: "dropped earlier"}
    score = lut(SCORE_CMAP)
    gt = []
    if kw["gt_masks"] is not None:
        gt = [Line2D([], [], color=np.array(GT_OUTLINE) / 255, lw=2, label="object contour"),
              Line2D([], [], color=np.array(GT_TARGET) / 255, lw=4, label="thick: asked object")]
    legends = [
        [] if clean is not None else [Patch(facecolor="0.59", label="no image: trace replayed on grey")],
        handles([(group_colour(0, 0), "merged window (light)"), (group_colour(0, 1), "merged window (dark)"),
                 (UNMERGED_DOT, "not merged (white dot)")]) + [dots] + gt,
        handles([(score[20], "low key score"), (score[235], "high key score")])
        + [Patch(facecolor="none", edgecolor=np.array(KEY_OUTLINE) / 255, lw=2.5, label="yellow outline: key token"),
           dots] + gt,
        handles([(STATUS_COLOURS[k], short[k]) for k in short]) + [dots] + gt,
        handles([(KV_COLOURS[KV_CACHED], "cached (white dot)"), (KV_COLOURS[KV_TRIMMED], "trimmed (stage 3)"),
                 (KV_COLOURS[KV_ABSENT], "dropped in prefill")]) + [dots] + gt,
    ]
    fig = Figure(figsize=(19.2, 10.8), dpi=100)
    grid = fig.add_gridspec(2, 4 if compare is None else 5, height_ratios=(1, 1))
    axes = [fig.add_subplot(grid[0, i]) for i in range(4)] + [fig.add_subplot(grid[1, 0])]
    for ax, (title, img), hs in zip(axes, panels, legends):
        if img is None:
            img = base
        ax.imshow(img)
        ax.set_title(title, parse_math=False)        # a crop's name comes from the trace
        ax.set_axis_off()
        if hs:
            ax.legend(handles=hs, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=10.5 if compare is None else 8.2,
                      frameon=False, handlelength=1.2, columnspacing=1.0)
    ax = fig.add_subplot(grid[1, 1:3])
    L = trace.num_layers
    if vanilla is not None:
        ax.plot(range(L), vanilla.meta["vision_tokens_per_layer"], ":", color=np.array(GONE) / 255 * 1.6, lw=2.5,
                label="vanilla")
    ax.plot(range(L), trace.meta["vision_tokens_per_layer"], "-o", color="black", lw=3, label=f"{mpl_text(words.label)} (prefill)")
    ax.plot(range(L), trace.meta["kv"]["vision_entries_per_layer"], "--", color=np.array(GONE) / 255, lw=2.5,
            label=f"{mpl_text(words.label)} (KV cache)")
    for p in prune:
        ax.axvline(p, color=np.array(VERMILLION) / 255, ls=":", lw=1.5)
    if prune:
        ax.plot([], [], ":", color=np.array(VERMILLION) / 255, lw=1.5, label="prune layer (stage 2 drops)")
    ax.set_xlabel("LLM layer (0-based)")
    ax.set_ylabel("vision tokens")
    ax.set_title("vision tokens per LLM layer")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, frameon=False, borderaxespad=0)
    ax = fig.add_subplot(grid[1, 3])
    ax.set_axis_off()
    fig.subplots_adjust(left=0.02, right=0.99, top=0.88, bottom=0.1, wspace=0.14, hspace=0.5)
    right = 1.0
    if compare is not None:
        from .compare import draw_slide_panel

        text_ax = fig.add_subplot(grid[1, 4])
        draw_slide_panel(fig.add_subplot(grid[0, 4]), text_ax, trace, compare, kv_layer, **kw)
        right = text_ax.get_position().x0
    _fit_text(fig, ax, trace, vanilla, right)
    cfg = trace.meta["config"]
    prune_text = ", ".join(str(p) for p in prune) if prune else "none"
    fig.suptitle(f"{words.label} on {trace.meta['model']['id'] or 'model'} — preset {cfg.get('preset')}, "
                 f"positions '{cfg['positions']}', prune layers {prune_text} (layers counted from 0)\n"
                 "equivalent tokens: authors' = printed convention, compute = mean vision tokens per layer; "
                 "FLOPs: 4nd²+2n²d+3ndm per layer", fontsize=16, parse_math=False)
    return fig


def save_slides(trace, folder, image=None, vanilla=None, layer=None, gt_masks=None, stem: str | None = None,
                view=None, crop: int = 0, opacity: float = DEFAULT_OPACITY, image_name: str | None = None,
                compare=None):
    """Write the slide figure as PNG and PDF into ``folder``; return both paths. The files are named
    :func:`slide_stem` (model, preset, image, layer) unless ``stem`` is given."""
    import matplotlib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or slide_stem(trace, layer, image_name, crop) + (
        "" if compare is None else f"-vs-{_name_part(compare.meta['config'].get('method'))}")
    png, pdf = folder / f"{stem}.png", folder / f"{stem}.pdf"
    with matplotlib.rc_context(SLIDE_RC):      # never touches the global rcParams of other figures
        fig = _slide_figure(trace, image, vanilla, layer, gt_masks, view, crop, opacity, compare)
        fig.savefig(png, dpi=100, bbox_inches=None)
        fig.savefig(pdf, bbox_inches=None)
    return png, pdf


def main(argv=None) -> int:
    """python -m mustdrop.vis TRACE [--vanilla TRACE] [--image IMAGE] [--layer L] [--crop C] --out DIR"""
    import argparse
    import sys

    from ..images import load_image
    from ..trace import Trace, TraceError

    ap = argparse.ArgumentParser(prog="python -m mustdrop.vis",
                                 description="Slide figure (PNG + PDF) of a stored MustDrop trace, no model needed.")
    ap.add_argument("trace")
    ap.add_argument("--vanilla", help="the vanilla trace of the same input (for the count curve and answers)")
    ap.add_argument("--image", help="the run's image, drawn under the overlays (grey without it)")
    ap.add_argument("--layer", type=int, default=None, help="LLM layer for the stage-2/3 panels")
    ap.add_argument("--crop", type=int, default=0, help="crop to draw (LLaVA-NeXT: 0 = base image, then tiles)")
    ap.add_argument("--out", default=".", help="folder for <model>-<preset>-<image>-L<layer>.png / .pdf")
    ap.add_argument("--opacity", type=float, default=DEFAULT_OPACITY,
                    help=f"how strongly the category colours tint the image, 0..1 (default {DEFAULT_OPACITY})")
    ap.add_argument("--animate", default=None, metavar="OUT.gif|OUT.mp4",
                    help="instead of the slide: step the sample through the LLM layers (mustdrop.vis.animate)")
    ap.add_argument("--fps", type=float, default=1.0, help="--animate: frames per second (default 1)")
    a = ap.parse_args(argv)
    try:
        t = Trace.load(a.trace)
        va = Trace.load(a.vanilla) if a.vanilla else None
        img = load_image(a.image) if a.image else None
        if not 0 <= a.crop < t.n_crops:
            raise ValueError(f"--crop {a.crop}: the trace holds {t.n_crops} crop(s)")
        if a.animate:
            from .animate import save_animation
            print(save_animation(t, a.animate, image=img, crop=a.crop, fps=a.fps, opacity=check_opacity(a.opacity)))
            return 0
        png, pdf = save_slides(t, a.out, image=img, vanilla=va, layer=a.layer, crop=a.crop,
                               opacity=check_opacity(a.opacity), image_name=a.image)
    except (TraceError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(png)
    print(pdf)
    return 0
