"""Figures for papers and slides, one style, each saved as PNG, PDF and SVG.

    python -m analysis.figures --batch runs/b1 [--out runs/b1/figures] [--samples 4]

Why: the same numbers end up in papers, slides and the README; drawing them once, in one style,
with the model, the preset and the counting conventions written on every figure, keeps a figure
from being quoted without the conventions that make it comparable.

Figures (all read tables or traces, never a model):
  tradeoff_figure   accuracy (or agreement with vanilla when there are no answers) against
                    equivalent tokens in both conventions, FLOPs ratio and KV bytes, one point per config
  layer_counts      mean vision tokens each LLM layer processes (solid) and caches (dashed), per config
  overlay_grid      samples x stages: image, stage 1a merge, 1b key set, stage 2 at each prune layer,
                    final KV cache of the last layer (mustdrop.vis overlays; asked objects outlined)
  baseline_bars     accuracy, recall of the asked objects, equivalent tokens, FLOPs ratio per method
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import numpy as np

FORMATS = ("png", "pdf", "svg")
PANEL_PIXELS = 336        # overlay canvas side: one 14-pixel cell per patch of a 24 x 24 grid
CONVENTION_NOTE = ("equivalent tokens: authors' convention = (p0 N0 + (p1-p0) N1 + ... + (L-p_last) Nk)/L as the paper "
                   "prints; compute convention = mean over layers of vision tokens processed. FLOPs = sum over LLM "
                   "layers of 4nd^2 + 2n^2d + 3ndm (image tokens only; ratio to vanilla). KV = K+V of all layers.")
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
METHOD_COLOURS = {"vanilla": "#999999", "MustDrop": "#0072B2", "FastV": "#D55E00", "random drop": "#CC79A7",
                  "spatial pooling": "#009E73"}
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 7.5,
         "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
         "figure.dpi": 110, "savefig.dpi": 200, "savefig.bbox": "tight", "svg.fonttype": "none",
         "pdf.fonttype": 42, "axes.prop_cycle": None}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    style = dict(STYLE, **{"axes.prop_cycle": cycler(color=PALETTE)})
    plt.rcParams.update(style)
    return plt


def save(fig, stem) -> list[Path]:
    """Write stem.png / .pdf / .svg (folders created); close the figure."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in FORMATS:
        p = stem.parent / f"{stem.name}.{ext}"
        fig.savefig(p, metadata={"Title": fig._suptitle.get_text() if fig._suptitle else stem.name}
                    if ext in ("pdf", "svg") else None)
        paths.append(p)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return paths


def _caption(fig, text: str):
    fig.text(0.01, -0.02, "\n".join(textwrap.wrap(text, 150)), ha="left", va="top", fontsize=7, color="#444444")


def _model_name(model: str) -> str:
    return Path(str(model)).name or str(model)


def tradeoff_figure(table, stem, model: str, title: str = "") -> list[Path]:
    """One point per config: quality against the four cost measures (see module doc)."""
    plt = _plt()
    t = table.copy()
    quality, qlabel = "accuracy", "accuracy"
    if "accuracy" not in t or not t["accuracy"].notna().any():
        quality, qlabel = "agrees_vanilla", "agreement with the vanilla answer"
    axes_spec = [("eq_tokens_authors", "equivalent tokens (authors' convention)"),
                 ("eq_tokens_compute", "equivalent tokens (compute convention)"),
                 ("flops_ratio_image", "FLOPs / vanilla (image tokens only)"),
                 ("kv_bytes", "KV cache (MB, all layers)")]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4), sharey=True)
    for ax, (col, label) in zip(axes, axes_spec):
        x = t[col] / (1e6 if col == "kv_bytes" else 1)
        for k, (_, r) in enumerate(t.iterrows()):
            xi = r[col] / (1e6 if col == "kv_bytes" else 1)
            ax.scatter([xi], [r[quality]], color=PALETTE[k % len(PALETTE)], s=22, zorder=3,
                       marker="s" if r["config"] == "off" else "o")
        order = np.argsort(x.to_numpy())
        ax.plot(x.to_numpy()[order], t[quality].to_numpy()[order], color="#999999", lw=0.8, zorder=1)
        ax.set_xlabel(label)
    axes[0].set_ylabel(qlabel)
    handles = [plt.Line2D([], [], ls="", marker="s" if c == "off" else "o", color=PALETTE[k % len(PALETTE)],
                          label=_short(c)) for k, c in enumerate(t["config"])]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(f"{title or 'Trade-off'} — model {_model_name(model)}; configs as listed (preset+overrides)")
    _caption(fig, f"One point per config, means over samples (n = {int(t['n'].max()) if 'n' in t else '?'}); "
                  f"square = vanilla. " + CONVENTION_NOTE)
    fig.tight_layout()
    return save(fig, stem)


def _short(spec: str, n: int = 48) -> str:
    return spec if len(spec) <= n else spec[: n - 1] + "…"


def layer_counts(traces_by_config: dict, stem, model: str) -> list[Path]:
    """Mean vision tokens per LLM layer in prefill (solid) and in the KV cache (dashed), per config."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    L = None
    for k, (cfg, traces) in enumerate(traces_by_config.items()):
        if not traces:
            continue
        L = traces[0].num_layers
        pre = np.mean([t.meta["vision_tokens_per_layer"] for t in traces], axis=0)
        kv = np.mean([t.meta["kv"]["vision_entries_per_layer"] for t in traces], axis=0)
        c = PALETTE[k % len(PALETTE)]
        ax.plot(range(L), pre, color=c, lw=2, marker="o", ms=3, label=f"{_short(cfg, 30)}: prefill")
        ax.plot(range(L), kv, color=c, lw=1, ls="--", label=f"{_short(cfg, 30)}: KV cache")
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("vision tokens (mean over samples)")
    ax.legend(frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"Vision tokens per layer — model {_model_name(model)}; presets: "
                 f"{', '.join(_short(c, 20) for c in traces_by_config)}")
    _caption(fig, "Solid: vision tokens each LLM layer processes in prefill; dashed: vision entries it holds in "
                  "its KV cache after the output-aware trim (stage 3). " + CONVENTION_NOTE)
    fig.tight_layout()
    return save(fig, stem)


def _stage_panels(trace, image, gt):
    """(title, RGB array) per stage, from mustdrop.vis when it is importable, else plain patch maps."""
    last = trace.num_layers - 1
    try:
        from mustdrop import vis
        geom = vis.geometry(trace, target=PANEL_PIXELS)      # small canvases keep PDF / SVG light

        def base():
            return vis.base_canvas(image, trace, geom)
        panels = [("image", vis.model_view(image, trace, geom.size)),
                  ("1a merge", vis.merge_overlay(trace, image, gt_masks=gt, base=base())),
                  ("1b key set", vis.key_overlay(trace, image, gt_masks=gt, base=base()))]
        panels += [(f"2 @ layer {p}", vis.filter_overlay(trace, p, image, gt_masks=gt, base=base()))
                   for p in trace.prune_layers]
        panels.append((f"3 KV layer {last}", vis.kv_overlay(trace, last, image, gt_masks=gt, base=base())))
        return panels
    except Exception:  # noqa: BLE001 - the app's drawing module is optional here; fall back to raw maps
        panels = [("image", np.asarray(image.convert("RGB")) if image is not None else trace.patch("token")),
                  ("1a merged", trace.patch("merged")), ("1b key set", trace.patch("key"))]
        d = trace.patch("dropped_after_layer")
        panels += [(f"2 @ layer {p}", ((d < 0) | (d > p)).astype(np.uint8)) for p in trace.prune_layers]
        panels.append((f"3 KV layer {last}", trace.patch("kv_cached")[last]))
        return panels


def overlay_grid(samples, stem, model: str, preset: str) -> list[Path]:
    """samples: [(trace, image or None, gt patch masks (k, G, G) or None, label)] -> samples x stages grid."""
    plt = _plt()
    rows = [_stage_panels(t, img, gt) for t, img, gt, _ in samples]
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.9 * ncol, 2.0 * len(rows) + 0.4), squeeze=False)
    for i, (panels, (t, _, _, label)) in enumerate(zip(rows, samples)):
        for j in range(ncol):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(panels):
                title, arr = panels[j]
                ax.imshow(arr, cmap="viridis" if np.asarray(arr).ndim == 2 else None, interpolation="nearest")
                if i == 0:
                    ax.set_title(title)
        axes[i, 0].text(-0.05, 0.5, textwrap.fill(label, 28), transform=axes[i, 0].transAxes, ha="right",
                        va="center", fontsize=7)
    fig.suptitle(f"MustDrop stages per sample — model {_model_name(model)}, preset {preset}")
    _caption(fig, "Columns: input; stage 1a local spatial merge (merged windows tinted); stage 1b key token set "
                  "(CLS attention, key set outlined); stage 2 dual-attention filter at each prune layer (kept / "
                  "dropped); stage 3 KV cache of the last layer. Asked objects outlined (scene ground truth).")
    fig.tight_layout()
    return save(fig, stem)


def baseline_bars(table, stem, model: str, preset: str) -> list[Path]:
    """Bars per compared config (analysis.sweep.compare_table)."""
    plt = _plt()
    t = table.reset_index(drop=True)
    labels = [f"{m}\n{v}" for m, v in zip(t["method"], t["variant"])]
    metrics = [("accuracy", "accuracy"), ("recall_final_tokens", "recall of asked objects\n(after last layer)"),
               ("eq_tokens_authors", "equivalent tokens\n(authors')"), ("eq_tokens_compute", "equivalent tokens\n(compute)"),
               ("flops_ratio_image", "FLOPs / vanilla\n(image tokens)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 3.6 + 0.12 * len(t)))
    y = np.arange(len(t))
    colours = [METHOD_COLOURS.get(m, "#0072B2") for m in t["method"]]
    for ax, (col, label) in zip(axes, metrics):
        vals = t[col].astype(float).to_numpy() if col in t else np.full(len(t), np.nan)
        ax.barh(y, np.nan_to_num(vals), color=colours)
        top = np.nanmax(vals) if np.isfinite(vals).any() else 1.0
        if col in ("accuracy", "recall_final_tokens"):
            top = 1.0
        ax.set_xlim(0, top * 1.25 if top > 0 else 1.0)
        for yi, v in zip(y, vals):
            ax.text(0 if np.isnan(v) else v, yi, " n/a" if np.isnan(v) else f" {v:.3g}", va="center", fontsize=7)
        ax.set_title(label)
        ax.set_yticks(y, labels if ax is axes[0] else [""] * len(t))
        ax.invert_yaxis()
    fig.suptitle(f"Same-budget comparison — model {_model_name(model)}, MustDrop preset {preset}")
    _caption(fig, "Baselines get, per sample, the layer-averaged vision tokens (compute convention) of the MustDrop "
                  "run; n/a = no successful sample (e.g. a budget FastV cannot reach after its layer). " + CONVENTION_NOTE)
    fig.tight_layout()
    return save(fig, stem)


def figures_for_batch(batch_dir, out=None, samples: int = 4) -> list[Path]:
    """Every figure a batch folder supports: trade-off, per-layer counts, overlay grids, comparison bars."""
    import pandas as pd

    from analysis.batch import config_table, read_table
    from mustdrop.trace import Trace

    batch_dir = Path(batch_dir)
    out = Path(out) if out else batch_dir / "figures"
    df = read_table(batch_dir / "summary.jsonl")
    ok = df[(df["status"] == "ok") & (df["trace"].fillna("").astype(str) != "")]   # runs with a trace
    model = "model"
    paths: list[Path] = []
    if len(ok):
        first = Trace.load(batch_dir / ok["trace"].iloc[0])
        model = first.meta["model"]["id"]
    paths += tradeoff_figure(config_table(df), out / "tradeoff", model)
    traces = {c: [Trace.load(batch_dir / p) for p in g["trace"].head(samples * 4)] for c, g in ok.groupby("config", sort=False)}
    paths += layer_counts(traces, out / "layer_counts", model)
    for cfg, g in ok.groupby("config", sort=False):
        if cfg == "off":
            continue
        chosen = []
        for _, r in g.head(samples).iterrows():
            t = Trace.load(batch_dir / r["trace"])
            image, gt = _scene_of(r["id"])
            chosen.append((t, image, gt, f"{r['question']} → {t.answer!r}"))
        paths += overlay_grid(chosen, out / f"overlays-{_slug(cfg)}", model, cfg)
    if (batch_dir / "compare.csv").is_file():
        ct = pd.read_csv(batch_dir / "compare.csv")
        preset = next((c for c in ct["config"] if c != "off"), "?")
        paths += baseline_bars(ct, out / "compare", model, preset)
    return paths


def _slug(s):
    from analysis.common import safe_name
    return safe_name(s)


def _scene_of(sample_id: str):
    """Image and asked-object masks of a scene-world sample id ('test-0000012'); (None, None) otherwise."""
    import re

    m = re.fullmatch(r"(train|val|test)-(\d+)", str(sample_id))
    if not m:
        return None, None
    from analysis.toyworld import make_sample

    s = make_sample(m.group(1), int(m.group(2)))
    return s.image, np.stack([s.scene.objects[i].patch_mask for i in s.targets])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.figures", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", required=True, help="an analysis.batch / analysis.sweep --out folder")
    ap.add_argument("--out", default=None, help="default: BATCH/figures")
    ap.add_argument("--samples", type=int, default=4, help="rows of each overlay grid")
    a = ap.parse_args(argv)
    paths = figures_for_batch(a.batch, a.out, a.samples)
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
