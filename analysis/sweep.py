"""Sweeps of one knob (or the threshold grid) and same-budget comparisons, as tables and curves.

    python -m analysis.sweep thresholds --model M --out runs/s1 --n 50 --global 0.001 0.005 0.011 \
        --individual 0.001 0.01                    # global x individual grid on preset --base
    python -m analysis.sweep merge  --model M --out runs/s2 --values 0.7 0.8 0.9 0.95
    python -m analysis.sweep keep   --model M --out runs/s3 --values 0.02 0.08 0.2
    python -m analysis.sweep layers --model M --out runs/s4 --values 2,6,10,14 1,3,5,7 2
    python -m analysis.sweep compare --model M --out runs/cmp --preset 192 128 64 --n 1000

Why: a pruning method is a trade-off curve, not a point; and its stages are only worth their
complexity if each one earns its place next to simple baselines at the SAME budget.

Every sweep is a batch (analysis.batch: traces under --out, resumable, the vanilla run shared) over
configs "BASE+knob=value"; the per-config means go to sweep.csv and the trade-off figures
(accuracy against equivalent tokens in both conventions, FLOPs ratio and KV bytes) to figures/.

compare: MustDrop at the preset; MustDrop with each stage switched off alone (no-merge, no-key_set,
no-filter, no-kv_trim); and six same-budget baselines, each given per sample the layer-averaged
vision tokens (compute convention) of that sample's MustDrop run as budget ("fastv@64"):
FasterVLM-style and VisionZip-style selection before the LLM (round(budget) tokens), FastV and random
drop once after layer K (--baseline-layer; default the model's first prune layer, moved earlier for
a sample whose budget the layers up to K alone exceed, see analysis.common.auto_baseline_layer),
PyramidDrop-style drops with a solved share, and spatial pooling (round(sqrt(budget))^2 tokens, a
square grid, so its budget is met only to that granularity). No baseline refuses a budget: where
its drops inside the LLM cannot meet it, the remainder is dropped before the LLM (column
pre_llm_drop: on how many samples; rules in MustDropConfig.baseline and mustdrop.stages.plan_*).
Accuracy comes with a 95% percentile bootstrap interval over the questions (2000 resamples,
seeded). The table is written as compare.md (markdown) and compare.csv; with several presets they
share the vanilla runs and stack into one table with a preset column. Inputs: the scene world, or
any folder + JSONL or local datasets dataset (see analysis.batch).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from analysis.batch import add_input_args, config_table, items_from_args, run_batch, run_folder
from analysis.common import TOKEN_CONVENTIONS, add_method_file_arg, load_method_files, load_runner

ABLATIONS = ("merge", "key_set", "filter", "kv_trim")


def sweep_specs(kind: str, base: str, values=None, global_values=None, individual_values=None) -> list[str]:
    """Config specs of a sweep (see analysis.common for the spec syntax)."""
    if kind == "thresholds":
        if not global_values or not individual_values:
            raise ValueError("a threshold sweep needs --global and --individual values")
        return [f"{base}+global_thr={g:g}+individual_thr={i:g}" for g in global_values for i in individual_values]
    key = {"merge": "merge_threshold", "keep": "key_keep_rate", "layers": "prune_layers"}.get(kind)
    if key is None:
        raise ValueError(f"unknown sweep {kind!r}")
    if not values:
        raise ValueError(f"a {kind} sweep needs --values")
    return [f"{base}+{key}={v}" for v in values]


def compared() -> tuple[str, ...]:
    """The methods a compare runs beside MustDrop: every registered one (built-ins, then plug-ins
    loaded with --method-file or installed through the entry-point group mustdrop.methods)."""
    from mustdrop import methods

    return methods.baselines()


def compare_specs(preset: str, ablations: bool = True) -> list[str]:
    return ([preset] + ([f"{preset}-no-{s}" for s in ABLATIONS] if ablations else [])
            + [f"{m}@{preset}" for m in compared()])


def describe(spec: str, preset: str) -> tuple[str, str]:
    """(method, what differs) of a compare row, in words."""
    if spec == "off":
        return "vanilla", "no pruning"
    if spec == preset:
        return "MustDrop", "all stages"
    if spec.startswith(f"{preset}-no-"):
        return "MustDrop", f"without {spec.split('-no-')[1]}"
    from mustdrop import methods

    return methods.get(spec.split("@")[0]).label, f"same budget as MustDrop {preset}"


def compare_table(df, preset: str):
    """The per-config comparison with the budget each baseline was given and how closely it kept it."""
    import pandas as pd

    from analysis.common import bootstrap_interval

    ct = config_table(df).set_index("config")
    rows = []
    for spec in ["off"] + compare_specs(preset):
        if spec not in ct.index:
            continue
        r = ct.loc[spec]
        method, what = describe(spec, preset)
        g = df[(df["config"] == spec) & (df["status"] == "ok")]
        gap = float("nan")
        if "budget" in g and g["budget"].notna().any():
            gap = float((g["eq_tokens_compute"] - g["budget"]).abs().max())
        from mustdrop import methods

        takes_k = "@" in spec and methods.get(spec.split("@")[0]).takes_layer
        ks = sorted(set(g["prune_layers"].astype(str))) if takes_k else []
        if ks:
            what += f", K = {'/'.join(ks)}"
        if "pdrop_ratio" in g and g["pdrop_ratio"].notna().any():          # a plan with one share per drop
            what += f", share kept per drop {g['pdrop_ratio'].min():.2f}-{g['pdrop_ratio'].max():.2f}"
        pre = int(g["pre_llm_keep"].notna().sum()) if "pre_llm_keep" in g else 0
        lo, hi = bootstrap_interval(g["correct"]) if "correct" in g else (float("nan"), float("nan"))
        rows.append({"method": method, "variant": what, "config": spec, "n": int(r["n"]), "failed": int(r["n_failed"]),
                     "accuracy": r["accuracy"], "acc_ci95_low": lo, "acc_ci95_high": hi, "pre_llm_drop": pre,
                     "recall_final_tokens": r.get("recall_final_tokens", float("nan")),
                     "recall_final_kv": r.get("recall_final_kv", float("nan")),
                     "eq_tokens_authors": r["eq_tokens_authors"], "eq_tokens_compute": r["eq_tokens_compute"],
                     "budget_gap_max": gap, "flops_ratio_image": r["flops_ratio_image"],
                     "flops_ratio_full": r["flops_ratio_full"], "kv_ratio": r["kv_ratio"]})
    return pd.DataFrame(rows)


def multi_compare_table(df, presets):
    """compare_table for several presets stacked (vanilla once, first), with a budget column."""
    import pandas as pd

    parts = []
    for k, p in enumerate(presets):
        t = compare_table(df, p)
        if k:
            t = t[t["config"] != "off"]
        t.insert(0, "preset", ["–" if c == "off" else p for c in t["config"]])
        parts.append(t)
    return pd.concat(parts, ignore_index=True)


def markdown(table, caption: str) -> str:
    """A GitHub markdown table (no tabulate dependency), numbers to 3 significant digits."""
    cols = list(table.columns)

    def fmt(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "–"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(fmt(r[c]) for c in cols) + " |")
    return caption.rstrip() + "\n\n" + "\n".join(lines) + "\n"


def run_sweep(runner, items, specs, out, *, max_new_tokens=4, baseline_layer=None, seed=0, progress=True,
              figures=True, title="", save_traces=True):
    """Batch the specs (plus the shared vanilla run), write sweep.csv and the trade-off figures."""
    df, stats = run_batch(runner, items, specs, out, max_new_tokens=max_new_tokens, baseline_layer=baseline_layer,
                          seed=seed, progress=progress, save_traces=save_traces)
    table = config_table(df)
    table.to_csv(Path(out) / "sweep.csv", index=False)
    if figures:
        from analysis import figures as F
        F.tradeoff_figure(table, Path(out) / "figures" / "tradeoff", model=runner.model_id, title=title)
    return df, table, stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["thresholds", "merge", "keep", "layers", "compare"])
    ap.add_argument("--model", default="assets/toy-llava")
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", default="64", help="preset the swept knob is changed on")
    ap.add_argument("--preset", nargs="+", default=["64"],
                    help="compare: the MustDrop preset(s) whose budget baselines get (e.g. 192 128 64: one table, "
                         "one shared vanilla run)")
    ap.add_argument("--values", nargs="+", default=None)
    ap.add_argument("--global", dest="global_values", nargs="+", type=float, default=None)
    ap.add_argument("--individual", dest="individual_values", nargs="+", type=float, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--baseline-layer", type=int, default=None)
    ap.add_argument("--no-ablations", action="store_true", help="compare: baselines only, no stage switched off")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--no-traces", action="store_true", help="tables only (saves disk; not resumable)")
    ap.add_argument("--threads", type=int, default=None)
    add_input_args(ap)
    add_method_file_arg(ap)
    a = ap.parse_args(argv)
    load_method_files(a.method_file)
    items = items_from_args(a)
    runner = load_runner(a.model, threads=a.threads)
    if a.kind == "compare":
        specs = [s for p in a.preset for s in compare_specs(p, ablations=not a.no_ablations)]
        df, stats = run_batch(runner, items, specs, a.out, max_new_tokens=a.max_new_tokens,
                              baseline_layer=a.baseline_layer, seed=a.seed, save_traces=not a.no_traces,
                              dataset=run_folder(a, items)[1], producer="analysis.sweep compare")
        table = multi_compare_table(df, a.preset)
        table.to_csv(Path(a.out) / "compare.csv", index=False)
        caption = compare_caption(runner.model_id, "/".join(a.preset), len(items), a)
        md = markdown(table.drop(columns=["config"]), caption)
        (Path(a.out) / "compare.md").write_text(md)
        print(md)
        if not a.no_figures:
            from analysis import figures as F
            for p in a.preset:
                F.baseline_bars(compare_table(df, p), Path(a.out) / "figures" / f"compare-{p}",
                                model=runner.model_id, preset=p)
        return 0
    specs = sweep_specs(a.kind, a.base, a.values, a.global_values, a.individual_values)
    _, table, _ = run_sweep(runner, items, specs, a.out, max_new_tokens=a.max_new_tokens,
                            baseline_layer=a.baseline_layer, seed=a.seed, figures=not a.no_figures,
                            title=f"{a.kind} sweep on preset {a.base}", save_traces=not a.no_traces)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    return 0


def compare_caption(model: str, preset: str, n: int, a) -> str:
    return (f"Same-budget comparison on {model}, MustDrop preset {preset}, {n} questions "
            f"({a.split if not (a.images or a.hf_dataset) else 'custom inputs'}). Baselines get, per sample, the "
            f"layer-averaged vision tokens (compute convention) of the MustDrop run. FasterVLM-style / VisionZip-style: "
            f"round(budget) tokens chosen before the LLM by the vision tower's CLS attention (VisionZip: 10/64 of "
            f"them contextual, merged by key similarity); FastV / random drop once after layer K = "
            f"{a.baseline_layer if a.baseline_layer is not None else 'the first prune layer (earlier where the budget needs it)'}"
            f"; PyramidDrop-style: one share kept after each quarter of the depth, solved for the budget; where the "
            f"drops inside the LLM cannot meet the budget keeping half, the remainder is dropped before the LLM "
            f"(pre_llm_drop: samples where it was). Pooling keeps round(sqrt(budget))^2 tokens. accuracy with a 95% "
            f"bootstrap interval (acc_ci95_low / high). recall = coverage-weighted share of the asked objects' patches "
            f"still present after the last layer / in the final KV cache. FLOPs: 4nd^2 + 2n^2d + 3ndm per layer "
            f"(image tokens only / full sequence), as a ratio to vanilla. Token conventions: {TOKEN_CONVENTIONS}.")


if __name__ == "__main__":
    sys.exit(main())
