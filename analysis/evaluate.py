"""Accuracy and pruning-decision quality of one preset on the scene world, against its ground truth.

    python -m analysis.evaluate --model assets/toy-llava --split test --n 1000 --seed 0 --preset 64 \
        [--json out.json] [--max-new-tokens 8]
    python -m analysis.evaluate --model assets/toy-llava --n 1000 --preset off 192 128 64   # + markdown table

Why: "does MustDrop keep the right tokens?" becomes a number only when the patches that matter
are known. The scene world knows them: each question names its target objects, whose 24 x 24
patch masks (covered fraction per patch) come with the scene. Every recall below is
coverage-weighted: sum(coverage * kept) / sum(coverage) over the union of the asked objects.

Decision metrics (per sample, then averaged):
  recall_1a_enter      target patches whose token enters the LLM. 1 by construction for MustDrop
                       (merging keeps every patch, inside a mean token); < 1 never; kept for pool.
  recall_1a_unmerged   target patches left at full resolution (not inside a merged 3 x 3 window):
                       what stage 1a's averaging spared.
  background_merged    share of background patches (no object pixel) inside merged windows.
  key_on_object        share of key-set patches (stage 1b) touching any object;
  key_on_target        ... touching an asked object;  recall_1b_key: target recall by the key set.
  recall_after_L{l}    target patches whose token is still present after prune layer l (stage 2).
  recall_final_kv      target patches whose token is in the final KV cache of the last layer.
  kept_object_share    coverage-weighted share of the tokens alive in the last layer that lies on
                       any object; object_area_share is the same share over all patches (what a
                       method blind to content would keep), so the two compare directly.
Sample selection: seed S (0..9) takes indices S*10000, S*10000+1, ... of the split (question types
cycle with the index, so every run is balanced; a run with small n is a prefix of a larger one).
Answers match after lower-casing and removing punctuation and extra whitespace.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from analysis.common import (TOKEN_CONVENTIONS, build_config, clean_for_json, is_correct, iter_progress,
                             load_runner, parse_spec, scene_items, write_json_atomic)


def _wrec(cov: np.ndarray, kept: np.ndarray) -> float:
    total = float(cov.sum())
    return float((cov * kept).sum() / total) if total > 0 else float("nan")


def decision_metrics(trace, scene, targets) -> dict:
    """Pruning decisions of one trace scored against the scene's patch masks (see module doc)."""
    from mustdrop.dataset.objects import scene_coverage

    target = scene_coverage(trace, scene, targets).astype(np.float64)    # on the trace's grid (crop 0)
    anyobj = scene_coverage(trace, scene).astype(np.float64)
    token = trace.patch("token")
    present = token >= 0
    merged = trace.patch("merged").astype(bool)
    key = trace.patch("key").astype(bool)
    dropped_after = trace.patch("dropped_after_layer")
    bg = anyobj == 0
    out = {
        "recall_1a_enter": _wrec(target, present),
        "recall_1a_unmerged": _wrec(target, present & ~merged),
        "background_merged": float(merged[bg].mean()) if bg.any() else float("nan"),
        "key_on_object": float((anyobj[key] > 0).mean()) if key.any() else float("nan"),
        "key_on_target": float((target[key] > 0).mean()) if key.any() else float("nan"),
        "recall_1b_key": _wrec(target, key),
    }
    alive = present.copy()
    for layer in trace.prune_layers:
        alive = present & ((dropped_after < 0) | (dropped_after > layer))
        out[f"recall_after_L{layer}"] = _wrec(target, alive)
    out["recall_final_tokens"] = _wrec(target, alive)
    out["recall_final_kv"] = _wrec(target, trace.patch("kv_cached")[-1].astype(bool))
    tokens = np.unique(token[alive])
    if tokens.size:
        flat_tok, flat_cov = token.ravel(), anyobj.ravel()
        cover = np.bincount(flat_tok[flat_tok >= 0], weights=flat_cov[flat_tok >= 0], minlength=tokens.max() + 1)
        size = np.bincount(flat_tok[flat_tok >= 0], minlength=tokens.max() + 1)
        out["kept_object_share"] = float(np.mean(cover[tokens] / size[tokens]))
    else:
        out["kept_object_share"] = float("nan")
    out["object_area_share"] = float(anyobj.mean())
    return out


def trace_row(trace, item=None, vanilla=None) -> dict:
    """One table row from a trace: answer, accounting in both conventions, decision metrics, times."""
    from mustdrop.accounting import summarize

    acc = summarize(trace)
    m = trace.meta
    cfg = m["config"]
    row = {
        "config": cfg.get("preset"), "method": m.get("method", cfg.get("method")),
        "question": m["input"]["question"], "prediction": trace.answer,
        "N0": m["sequence"]["N0"], "final_tokens": acc["vision_tokens"]["final"],
        "eq_tokens_authors": acc["equivalent_tokens"]["authors"],
        "eq_tokens_compute": acc["equivalent_tokens"]["compute"],
        "flops_image": acc["flops"]["image_only"],
        "flops_ratio_image": acc["flops"]["ratio_image_only"],
        "flops_ratio_full": acc["flops"]["ratio_full_sequence"],
        "kv_bytes": acc["kv"]["total_bytes"], "kv_vision_bytes": acc["kv"]["vision_bytes"],
        "kv_ratio": acc["kv"]["total_bytes"] / acc["kv"]["vanilla_total_bytes"],
        "budget": cfg.get("budget"),
        "global_thr": cfg["global_thr"], "individual_thr": cfg["individual_thr"],
        "merge_threshold": cfg["merge_threshold"], "key_keep_rate": cfg["key_keep_rate"],
        "prune_layers": ",".join(str(x) for x in cfg["prune_layers"]),
    }
    if item is not None:
        row.update({"id": item.id, "order": item.order, "answer": item.answer, "qtype": item.qtype,
                    "correct": is_correct(trace.answer, item.answer)})
        if item.scene is not None and item.targets is not None:
            row.update(decision_metrics(trace, item.scene, item.targets))
    if vanilla is not None:
        row["vanilla_prediction"] = vanilla.answer
        row["agrees_vanilla"] = float(trace.answer == vanilla.answer)
    row.update({k: float(v) for k, v in m["timings"].items()})
    return row


def aggregate(rows: list[dict]) -> dict:
    """Means of a list of rows (one config): accuracy overall and per question type, accounting,
    decision metrics. Failed rows are counted, never averaged."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if "status" in df:
        n_failed = int((df["status"] != "ok").sum())
        df = df[df["status"] == "ok"]
    else:
        n_failed = 0
    out: dict = {"n": int(len(df)), "n_failed": n_failed}
    if "correct" in df and df["correct"].notna().any():
        out["accuracy"] = {"all": float(df["correct"].mean())}
        if "qtype" in df:
            for t, g in df.groupby("qtype", sort=True):
                out["accuracy"][str(t)] = float(g["correct"].mean())
    out["equivalent_tokens"] = {"authors": _mean(df, "eq_tokens_authors"), "compute": _mean(df, "eq_tokens_compute")}
    out["flops_ratio"] = {"image_only": _mean(df, "flops_ratio_image"), "full_sequence": _mean(df, "flops_ratio_full")}
    out["kv_bytes"] = {"total": _mean(df, "kv_bytes"), "vision": _mean(df, "kv_vision_bytes"),
                       "ratio": _mean(df, "kv_ratio")}
    decision = [c for c in df.columns if c.startswith(("recall_", "key_on", "background_merged", "kept_object",
                                                       "object_area"))]
    if decision:
        out["decision"] = {c: _mean(df, c) for c in sorted(decision, key=_metric_order)}
    if "recall_final_tokens" in df and "qtype" in df and df["recall_final_tokens"].notna().any():
        # Per question type, to tell "the answer's tokens were dropped" from "it needed other tokens".
        out["recall_final_by_type"] = {str(t): _mean(g, "recall_final_tokens")
                                       for t, g in df.groupby("qtype", sort=True)}
    if "agrees_vanilla" in df:
        out["agrees_vanilla"] = _mean(df, "agrees_vanilla")
    out["seconds"] = {c: _mean(df, c) for c in ("vision_s", "prefill_s", "decode_s", "total_s") if c in df}
    return out


def _metric_order(name: str):
    import re

    m = re.fullmatch(r"recall_after_L(\d+)", name)
    order = ["recall_1a_enter", "recall_1a_unmerged", "background_merged", "recall_1b_key", "key_on_target",
             "key_on_object"]
    if name in order:
        return (0, order.index(name), 0)
    if m:
        return (1, 0, int(m.group(1)))
    return (2, 0, name)


def _mean(df, col) -> float:
    if col not in df or not df[col].notna().any():
        return float("nan")
    return float(df[col].astype(float).mean())


def evaluate(runner, split: str, n: int, seed: int, preset: str, max_new_tokens: int = 8,
             progress: bool = True) -> tuple[dict, list[dict]]:
    """Run ``preset`` on n questions of a split; return (summary, rows)."""
    spec = parse_spec(preset)
    if spec.needs:
        raise ValueError("evaluate runs one preset; matched baselines need analysis.batch")
    config = build_config(runner, spec)
    rows = []
    for item in iter_progress(scene_items(split, n, seed), total=n, desc=f"evaluate {preset}", disable=not progress):
        t = time.perf_counter()
        trace = runner.run(item.load_image(), item.question, config, max_new_tokens=max_new_tokens).trace
        row = trace_row(trace, item)
        row["wall_s"] = time.perf_counter() - t
        row["status"] = "ok"
        rows.append(row)
    summary = {"model": runner.model_id, "split": split, "n": n, "seed": seed, "preset": preset,
               "config": config.to_dict(), "defaults_source": runner.defaults.source,
               "max_new_tokens": max_new_tokens, "conventions": TOKEN_CONVENTIONS,
               "recall_note": "coverage-weighted recall of the asked objects' patches (scene patch masks)"}
    summary.update(aggregate(rows))
    return summary, rows


def format_summary(s: dict) -> str:
    lines = [f"model {s['model']}  split {s['split']}  n {s['n']}  seed {s['seed']}  preset {s['preset']} "
             f"({s['defaults_source']})"]
    if "accuracy" in s:
        acc = s["accuracy"]
        lines.append("accuracy  " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    eq, fl, kv = s["equivalent_tokens"], s["flops_ratio"], s["kv_bytes"]
    lines += [f"tokens    equivalent {eq['authors']:.1f} (authors' convention), {eq['compute']:.1f} (compute convention)",
              f"FLOPs     {fl['image_only']:.3f} x vanilla (image tokens only), {fl['full_sequence']:.3f} x (full sequence)",
              f"KV cache  {kv['total'] / 1e6:.4f} MB total, {kv['vision'] / 1e6:.4f} MB vision ({kv['ratio']:.3f} x vanilla)"]
    for k, v in (s.get("decision") or {}).items():
        lines.append(f"  {k:<22} {v:.3f}")
    if s.get("recall_final_by_type"):
        lines.append("  recall_final_tokens by question type: "
                     + "  ".join(f"{k} {v:.3f}" for k, v in s["recall_final_by_type"].items()))
    if s.get("seconds"):
        lines.append("time      " + ", ".join(f"{k} {v:.3f}" for k, v in s["seconds"].items()) + " (mean per question)")
    if s.get("n_failed"):
        lines.append(f"failed    {s['n_failed']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="assets/toy-llava")
    ap.add_argument("--split", default="test", choices=["train", "val", "test"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", nargs="+", default=["64"],
                    help="off | 192 | 128 | 64, or any spec of analysis.common; several give one table "
                         "(and a JSON object keyed by preset)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    runner = load_runner(a.model, a.device, threads=a.threads)
    summaries = {}
    for preset in a.preset:
        summaries[preset], _ = evaluate(runner, a.split, a.n, a.seed, preset, a.max_new_tokens, progress=not a.quiet)
        print(format_summary(summaries[preset]) + "\n")
    if len(summaries) > 1:
        print(markdown_table(summaries))
    if a.json:
        write_json_atomic(a.json, clean_for_json(summaries[a.preset[0]] if len(summaries) == 1 else summaries))
    return 0


def markdown_table(summaries: dict) -> str:
    """One row per preset; 'of unpruned' is the accuracy relative to the 'off' row when there is one."""
    off = (summaries.get("off") or {}).get("accuracy", {}).get("all")
    types = sorted({t for s in summaries.values() for t in (s.get("accuracy") or {}) if t != "all"})
    head = (["preset", "accuracy", "of unpruned"] + types + ["eq. tokens (authors')", "eq. tokens (compute)",
            "FLOPs ratio (image)", "KV ratio", "recall after last layer", "recall in final KV",
            "kept share on objects", "s / question"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summaries.items():
        acc = s.get("accuracy") or {}
        d = s.get("decision") or {}

        def f(v, fmt="{:.3f}"):
            return "–" if v is None or (isinstance(v, float) and v != v) else fmt.format(v)
        row = [name, f(acc.get("all")), f(acc.get("all") / off if off else None, "{:.1%}")]
        row += [f(acc.get(t)) for t in types]
        row += [f(s["equivalent_tokens"]["authors"], "{:.1f}"), f(s["equivalent_tokens"]["compute"], "{:.1f}"),
                f(s["flops_ratio"]["image_only"]), f(s["kv_bytes"]["ratio"]), f(d.get("recall_final_tokens")),
                f(d.get("recall_final_kv")), f(d.get("kept_object_share")),
                f((s.get("seconds") or {}).get("total_s"), "{:.3f}")]
        lines.append("| " + " | ".join(row) + " |")
    first = next(iter(summaries.values()))
    return (f"{first['model']}, {first['split']} split, n = {first['n']} (seed {first['seed']}), "
            f"{first['max_new_tokens']} new tokens max. Equivalent tokens: {TOKEN_CONVENTIONS}. Recall: "
            f"{first['recall_note']}; kept share on objects vs {f_share(first)} of the image area.\n\n"
            + "\n".join(lines) + "\n")


def f_share(s) -> str:
    v = (s.get("decision") or {}).get("object_area_share")
    return "–" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
