"""The slide: one projector-readable 1920 x 1080 figure of a run (a panel per stage, the token
curve, the numbers), as PNG and PDF; also ``python -m mustdrop.vis`` for stored traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import accounting
from ..trace import DROPPED, KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY, NOT_ENTERING
from .geometry import base_canvas, geometry
from .overlays import filter_overlay, key_overlay, kv_overlay, merge_overlay
from .palette import KEY_OUTLINE, KV_ABSENT, KV_CACHED, KV_COLOURS, KV_TRIMMED, STATUS_COLOURS, UNMERGED_DOT, \
    group_colour, lut

SLIDE_RC = {"font.size": 15, "axes.titlesize": 17, "axes.labelsize": 15, "legend.fontsize": 12,
            "savefig.bbox": "standard", "savefig.dpi": 100, "figure.dpi": 100}


def slide_figure(trace, image=None, vanilla=None, layer: int | None = None, gt_masks=None, view=None,
                 crop: int = 0, compare=None):
    """The slide as a matplotlib Figure; ``layer`` picks the stage-2/3 panels (Trace.stage2_layer_for);
    ``compare``, a same-budget baseline's trace of the same input, adds its panel (vis.compare)."""
    import matplotlib

    with matplotlib.rc_context(SLIDE_RC):
        return _slide_figure(trace, image, vanilla, layer, gt_masks, view, crop, compare)


def _clip(s, n):
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _slide_figure(trace, image, vanilla, layer, gt_masks, view, crop=0, compare=None):
    from matplotlib.figure import Figure    # no pyplot: thread-safe in a server, no backend switching
    from matplotlib.patches import Patch

    geom = geometry(trace, target=336)
    base = base_canvas(image, trace, geom, view=view, crop=crop)
    prune = trace.prune_layers
    pl = trace.stage2_layer_for(layer)
    kv_layer = layer if layer is not None and 0 <= layer < trace.num_layers else trace.start_layer
    kw = dict(base=base, gt_masks=gt_masks if crop == 0 else None, crop=crop)
    where = f" ({trace.crop_name(crop)})" if trace.n_crops > 1 else ""
    panels = [("1a  local spatial merge" + where, merge_overlay(trace, **kw)),
              ("1b  key score + key set", key_overlay(trace, **kw))]
    if pl is not None:
        s2 = trace.stage2(pl)
        panels.append((f"2  filter after layer {pl}: {s2['dropped']} of {s2['entering']} dropped",
                       filter_overlay(trace, pl, **kw)))
    else:
        panels.append(("2  dual-attention filter: off", base))
    panels.append((f"3  KV cache of layer {kv_layer}", kv_overlay(trace, kv_layer, **kw)))

    def handles(pairs):
        return [Patch(facecolor=np.array(rgb) / 255, edgecolor="0.2", label=lab) for rgb, lab in pairs]

    short = {KEPT_BOTH: "kept: both high", KEPT_GLOBAL: "kept: global share", KEPT_INDIVIDUAL: "kept: individual max",
             KEPT_KEY: "kept: key token", DROPPED: "dropped here", NOT_ENTERING: "dropped earlier"}
    legends = [
        handles([(group_colour(3), "merged window (group colour)"), (UNMERGED_DOT, "unmerged patch (white dot)")]),
        handles([(lut("cividis")[30], "low key score"), (lut("cividis")[230], "high key score"),
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
    if compare is not None:
        from .compare import add_slide_panel
        add_slide_panel(fig, trace, compare, kv_layer, **kw)
    fig.tight_layout(rect=(0, 0, 1, 0.92), h_pad=2.5)
    return fig


def save_slides(trace, folder, image=None, vanilla=None, layer=None, gt_masks=None, stem="mustdrop-slides",
                view=None, crop: int = 0, compare=None):
    """Write the slide figure as PNG and PDF into ``folder``; return both paths."""
    import matplotlib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png, pdf = folder / f"{stem}.png", folder / f"{stem}.pdf"
    with matplotlib.rc_context(SLIDE_RC):      # never touches the global rcParams of other figures
        fig = _slide_figure(trace, image, vanilla, layer, gt_masks, view, crop, compare)
        fig.savefig(png, dpi=100, bbox_inches=None)
        fig.savefig(pdf, bbox_inches=None)
    return png, pdf


def main(argv=None) -> int:
    """python -m mustdrop.vis TRACE [--vanilla TRACE] [--image IMAGE] [--layer L] [--crop C] --out DIR"""
    import argparse

    from ..images import load_image
    from ..trace import Trace, TraceError

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
        if not 0 <= a.crop < t.n_crops:
            raise ValueError(f"--crop {a.crop}: the trace holds {t.n_crops} crop(s)")
        png, pdf = save_slides(t, a.out, image=img, vanilla=va, layer=a.layer, crop=a.crop)
    except (TraceError, ValueError, OSError) as e:
        print(f"error: {e}")
        return 2
    print(png)
    print(pdf)
    return 0
