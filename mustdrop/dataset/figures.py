"""The dataset lens's figures (matplotlib): frequency maps, survival curves, positional bias, failure
attribution. Each function takes a TraceSet and returns a Figure; the colours are the palette's
meanings (mustdrop.vis.palette): a white-to-colour ramp per property, so that 'dropped' is
vermillion here as in every per-image view."""

from __future__ import annotations

import numpy as np

from . import aggregate as A

SUBSETS = ("all", "right", "wrong", "lost", "kept")
SUBSET_TITLES = {"all": "all samples", "right": "answered right", "wrong": "answered wrong",
                 "lost": "lost answers", "kept": "kept answers (vanilla and this right)"}
MAX_MAP_LAYERS = 4
# Configs are told apart by grey level, line style, marker and hatch, never by hue: every hue belongs
# to one meaning of the palette (an orange line would read as 'dropped'), as in mustdrop.vis.plots.
CONFIG_STYLES = [("0.05", "-", "o", ""), ("0.45", "-", "s", "//"), ("0.05", "--", "^", ".."),
                 ("0.6", "-.", "D", "xx"), ("0.3", ":", "v", "\\\\"), ("0.75", "-", "P", "--")]


def _style(k: int):
    return CONFIG_STYLES[k % len(CONFIG_STYLES)]


def _bar_style(k: int) -> dict:
    """The k-th series' bar look: its grey and hatch, the hatch drawn white on dark greys."""
    grey, _, _, hatch = _style(k)
    return dict(color=grey, hatch=hatch, edgecolor="white" if float(grey) < 0.5 else "black", linewidth=0)


def _colours() -> dict:
    from ..vis.palette import BLUE, MEANINGS, VERMILLION, VIOLET, YELLOW

    return {"merged": MEANINGS["merged_dark"][0], "key": YELLOW, "dropped": VERMILLION, "kept": BLUE,
            "trimmed": VIOLET}


def _cmap(kind: str):
    from matplotlib.colors import LinearSegmentedColormap

    rgb = np.array(_colours()[kind]) / 255
    return LinearSegmentedColormap.from_list(f"freq-{kind}", [(1, 1, 1), tuple(rgb)])


def _label(ts, config: str) -> str:
    from ..vis.text import mpl_text

    return mpl_text(f"{config} (vanilla)" if config == ts.vanilla else config)


def map_columns(ts, config: str) -> list[tuple[str, int | None, str]]:
    """(kind, layer, title) of the maps drawn for a config: merged, key, dropped by each of its first
    prune layers, kept after the last layer, trimmed from the KV cache (any layer)."""
    recs = [ts.index.traces[i] for i in A.traces_of(ts, config)]
    if not recs:
        return []
    prune = recs[0]["prune_layers"][:MAX_MAP_LAYERS]
    last = recs[0]["num_layers"] - 1
    return ([("merged", None, "merged in 1a"), ("key", None, "key token (1b)")]
            + [("dropped", p, f"dropped by layer {p}") for p in prune]
            + [("kept", None, f"kept after layer {last}"), ("trimmed", None, "trimmed from KV (3)")])


def maps_figure(ts, config: str, crop_kind: str | None = None):
    """Rows: all samples, right, wrong, lost, kept answers; columns: map_columns. Each cell: the share
    of the subset's traces in which the patch had that property (0 white .. 1 full colour)."""
    import matplotlib.pyplot as plt

    cols = map_columns(ts, config)
    subsets = A.answer_subsets(ts, config)
    rows = [s for s in SUBSETS if s == "all" or subsets.get(s)]
    fig, axes = plt.subplots(len(rows), max(len(cols), 1), figsize=(1.9 * max(len(cols), 1), 2.0 * len(rows) + 0.6),
                             squeeze=False)
    for r, sub in enumerate(rows):
        ids = None if sub == "all" else subsets[sub]
        for c, (kind, layer, title) in enumerate(cols):
            ax = axes[r][c]
            maps = A.frequency_maps(ts, config, kind, layer, ids)
            key = crop_kind if crop_kind in maps else next(iter(maps), None)
            if key is not None:
                m, n = maps[key]
                ax.imshow(m, cmap=_cmap(kind), vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
            if c == 0:
                n = len(A.traces_of(ts, config, ids))
                ax.set_ylabel(f"{SUBSET_TITLES[sub]}\n(n = {n})", fontsize=8)
    fig.suptitle(f"{_label(ts, config)}: how often each patch ... (share of samples, 0 white to 1 full colour)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def survival_figure(ts):
    """Vision tokens per LLM layer: median and interquartile band per config; vanilla dashed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    pruned = [c for c in ts.configs if c != ts.vanilla]
    for cfg in ts.configs:
        s = A.survival(ts, cfg)
        if not s["n"]:
            continue
        if cfg == ts.vanilla:
            ax.plot(s["layers"], s["median"], ":", color="0.55", lw=2.5, label=f"{_label(ts, cfg)}")
            continue
        grey, ls, marker, _ = _style(pruned.index(cfg))
        ax.plot(s["layers"], s["median"], ls, color=grey, marker=marker, ms=4,
                label=f"{_label(ts, cfg)} (median, n = {s['n']})")
        ax.fill_between(s["layers"], s["q25"], s["q75"], color=grey, alpha=0.12)
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("vision tokens processed")
    ax.set_title("Survival: vision tokens per LLM layer (band: interquartile range)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def bias_figure(ts, bands: int = 6):
    """Kept share per row band over the uniform share (1 = no positional preference), per config."""
    import matplotlib.pyplot as plt

    cfgs = [c for c in ts.configs if c != ts.vanilla]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(len(cfgs), 1)
    labels = None                          # the bands' row ranges, from any config that has them
    for k, cfg in enumerate(cfgs):
        df = A.positional_bias(ts, cfg, bands)
        if df.empty:
            continue
        ax.bar(df["band"] + (k - (len(cfgs) - 1) / 2) * width, df["ratio"], width, label=_label(ts, cfg),
               **_bar_style(k))
        labels = list(df["rows"])
    ax.axhline(1.0, color="0.3", lw=1, ls="--")
    if labels is not None:
        ax.set_xticks(range(bands), [f"rows {r}" for r in labels], fontsize=7)
    ax.set_xlabel("image row band (top to bottom)")
    ax.set_ylabel("kept share / uniform share")
    ax.set_title("Positional bias after the last layer (> 1: kept more than a uniform choice)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def attribution_figure(ts, config: str):
    """Lost answers per question type, stacked by where the asked objects' patches went."""
    import matplotlib.pyplot as plt

    from ..vis.text import mpl_text

    t = A.attribution_table(ts, config)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if t.empty:
        ax.text(0.5, 0.5, "no lost answers with object masks", ha="center", va="center")
        ax.set_axis_off()
        return fig
    cats = [c for c in t.columns if c not in ("qtype", "lost") and not c.startswith("mean share")]
    bottom = np.zeros(len(t))
    for k, c in enumerate(cats):
        ax.bar([mpl_text(q) for q in t["qtype"].astype(str)], t[c], bottom=bottom, label=mpl_text(c),
               **_bar_style(k))
        bottom += t[c].to_numpy()
    ax.set_ylabel("lost answers")
    ax.set_title(f"{config}: where the asked objects' patches went, per lost answer", fontsize=10, parse_math=False)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
