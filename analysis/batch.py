"""Batch runs: many samples x several configs, one trace per run plus one summary table.

    python -m analysis.batch --model assets/toy-llava --out runs/b1 --split test --n 200 \
        --configs 192 128 64 fastv@64 random@64 pool@64 64-no-merge
    python -m analysis.batch --model M --out runs/b2 --images photos/ --questions questions.jsonl --configs 64
    python -m analysis.batch --model M --out runs/b3 --hf-dataset /data/my_vqa --hf-split validation
    python -m analysis.batch merge --out runs/b1          # after sharded runs

Why: a method is judged on many images, next to baselines at the same budget, with tokens, FLOPs
and KV bytes counted the same way for every method. Every run keeps its full Trace, so any row of
the table can be opened in the app or re-analysed later without the model.

Inputs: the scene world (--split/--n/--seed; rows then carry the pruning-decision metrics of
analysis.evaluate), a folder of images + a JSONL of {"image", "question", "answer"?, "id"?}, or a
local HuggingFace ``datasets`` dataset saved with save_to_disk (needs the optional ``datasets``
package). Configs are specs of analysis.common ("off", "64", "64-no-merge", "fastv@64", ...);
--method-file PATH adds a researcher's method, then named in specs like any built-in ("mine@64").
The vanilla run ("off") of each sample is made once and shared: every row carries its answer
(agrees_vanilla), and baselines "METHOD@SPEC" take, per sample, the layer-averaged vision tokens
(compute convention) of that sample's SPEC run as their budget.

Output (only inside --out):
  traces/<config>/<sample id>.safetensors   one Trace per run (atomic writes; about 50 kB each for
                                            a 24 x 24 grid; --no-traces skips them, and resuming)
  failed/<config>/<sample id>.json          a run that raised: its message (retried on resume)
  summary.csv, summary.jsonl                one row per (sample, config): accuracy where answers
                                            exist, equivalent tokens (both conventions), FLOPs
                                            ratios, KV bytes, decision metrics, times
  configs.csv                               means per config
  summary.shard-I-of-N.{csv,jsonl}          instead of summary.* when --shard is given
Resuming: a run whose trace exists is not repeated (its row is rebuilt from the trace; wall_s is
then empty); delete a config's traces/<config>/ folder to redo it after changing the model's
defaults. Parquet is written only when pyarrow is installed (not a dependency); JSONL is the
lossless table.

Sharding, several GPUs or machines: each process takes every n-th sample (--shard i/n) into the
same --out (a shared file system), then one `merge` joins the shard tables into the table a single
run would have written (rows in the same order; only timing columns differ).
  accelerate:  accelerate launch --num_processes 4 -m analysis.batch --shard auto --out runs/b1 ...
               (--shard auto reads RANK / WORLD_SIZE and puts each process on cuda:LOCAL_RANK)
  Slurm array: sbatch --array=0-7 --wrap "python -m analysis.batch --shard auto --out runs/b1 ..."
               (--shard auto reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT)
  then:        python -m analysis.batch merge --out runs/b1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

from analysis.common import (TIMING_COLUMNS, baseline_columns, build_config, folder_items, hf_items, iter_progress,
                             load_runner, order_specs, safe_name, scene_items, shard, add_method_file_arg,
                             load_method_files)
from analysis.evaluate import aggregate, trace_row
from mustdrop.dataset.layout import item_image_ref, settings, write_settings

SUMMARY = "summary"


def trace_path(out: Path, spec_text: str, item_id: str) -> Path:
    return Path(out) / "traces" / safe_name(spec_text) / f"{safe_name(item_id)}.safetensors"


def failure_path(out: Path, spec_text: str, item_id: str) -> Path:
    return Path(out) / "failed" / safe_name(spec_text) / f"{safe_name(item_id)}.json"


def _sample_seed(seed: int, item_id: str) -> int:
    """Per-sample seed for the random baseline: depends on the sample, not on the shard it ran in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{item_id}".encode()).digest()[:4], "little")


class BatchStats:
    def __init__(self):
        self.ran = self.resumed = self.failed = 0

    def as_dict(self):
        return {"ran": self.ran, "resumed": self.resumed, "failed": self.failed}


def run_batch(runner, items, configs, out, *, max_new_tokens: int = 8, baseline_layer: int | None = None,
              seed: int = 0, shard_spec: str | None = None, progress: bool = True, write: bool = True,
              save_traces: bool = True, dataset: dict | None = None, producer: str = "analysis.batch"):
    """Run every config on every item (of this shard); return (rows DataFrame, BatchStats).

    write=False writes nothing (tables returned only); save_traces=False writes the tables but no
    traces (large runs where disk matters; such a run cannot be resumed)."""
    import pandas as pd

    from mustdrop.accounting import vanilla_vision_tokens
    from mustdrop.matched import run_budget
    from mustdrop.trace import Trace

    out = Path(out)
    specs = order_specs(list(configs))
    mine = shard(list(items), shard_spec)
    if write:      # the run folder's settings (mustdrop.dataset.layout), before any row
        write_settings(out, settings(producer, runner.model_id, [{"name": s.text} for s in specs],
                                     dataset or {"kind": "items", "n": len(items)}))
    stats = BatchStats()
    rows = []
    bar = iter_progress(mine, total=len(mine), desc=f"batch {shard_spec or ''}".strip(), disable=not progress)
    for item in bar:
        traces: dict = {}
        image = None
        for k, spec in enumerate(specs):
            path = trace_path(out, spec.text, item.id)
            base = {"id": item.id, "order": item.order, "config": spec.text, "config_order": k}
            try:
                wall = float("nan")
                if path.is_file():
                    trace = Trace.load(path)
                    stats.resumed += 1
                else:
                    budget = n_tokens = None
                    if spec.match:
                        dep = traces.get(spec.match)
                        if dep is None:
                            raise RuntimeError(f"its matched run {spec.match!r} failed for this sample")
                        # the app's comparison's rule: the matched run's budget and unpruned token count
                        budget, n_tokens = run_budget(dep), vanilla_vision_tokens(dep.meta)
                    cfg = build_config(runner, spec, budget=budget, baseline_layer=baseline_layer,
                                       seed=_sample_seed(seed, item.id), n_tokens=n_tokens)
                    if image is None:
                        image = item.load_image()
                    t = time.perf_counter()
                    trace = runner.run(image, item.question, cfg, max_new_tokens=max_new_tokens).trace
                    wall = time.perf_counter() - t
                    stats.ran += 1
                    if write and save_traces:
                        trace.save(path)
                        failure_path(out, spec.text, item.id).unlink(missing_ok=True)
                traces[spec.text] = trace
                row = trace_row(trace, item, vanilla=traces.get("off"))
                row.update(baseline_columns(trace))
                row.update(base, status="ok", error="", wall_s=wall,
                           trace=str(path.relative_to(out)) if write and save_traces else "",
                           image=item_image_ref(item, out, write))
            except Exception as e:  # noqa: BLE001 - one bad sample must not stop a batch
                stats.failed += 1
                msg = f"{type(e).__name__}: {e}"
                row = dict(base, status="failed", error=msg[:500], question=_safe_question(item),
                           answer=_safe(lambda: item.answer), qtype=_safe(lambda: item.qtype))
                if write:
                    fp = failure_path(out, spec.text, item.id)
                    fp.parent.mkdir(parents=True, exist_ok=True)
                    fp.write_text(json.dumps({"id": item.id, "config": spec.text, "error": msg}) + "\n")
            rows.append(row)
    df = sort_table(pd.DataFrame(rows))
    if write:
        stem = SUMMARY if not shard_spec else f"{SUMMARY}.shard-{_shard_tag(shard_spec)}"
        write_table(df, out, stem)
        if not shard_spec:
            config_table(df).to_csv(out / "configs.csv", index=False)
    return df, stats


def _safe(f):
    try:
        return f()
    except Exception:  # noqa: BLE001
        return None


def _safe_question(item):
    return _safe(lambda: item.question)


def _shard_tag(spec: str) -> str:
    i, n = (int(x) for x in spec.split("/"))
    return f"{i}-of-{n}"


LEADING = ("id", "order", "config", "config_order", "status", "method", "qtype", "question", "answer",
           "prediction", "correct", "vanilla_prediction", "agrees_vanilla", "N0", "final_tokens",
           "eq_tokens_authors", "eq_tokens_compute", "budget", "flops_ratio_image", "flops_ratio_full",
           "kv_bytes", "kv_vision_bytes", "kv_ratio")


def sort_table(df):
    """Rows in input order (sample, then config); identifying and headline columns first."""
    if df.empty:
        return df
    df = df.sort_values(["order", "config_order"], kind="stable").reset_index(drop=True)
    lead = [c for c in LEADING if c in df.columns]
    return df[lead + [c for c in df.columns if c not in lead]]


def write_table(df, out: Path, stem: str) -> None:
    """CSV for people, JSONL (lossless, one object per row) for programs, Parquet too when pyarrow is
    installed (it is not a dependency); each written atomically."""
    import importlib.util

    out.mkdir(parents=True, exist_ok=True)
    writers = [("csv", lambda p: df.to_csv(p, index=False)),
               ("jsonl", lambda p: df.to_json(p, orient="records", lines=True))]
    if importlib.util.find_spec("pyarrow") is not None:
        writers.append(("parquet", lambda p: df.to_parquet(p, index=False)))
    for ext, write in writers:
        tmp = out / f".{stem}.{ext}.tmp"
        write(tmp)
        os.replace(tmp, out / f"{stem}.{ext}")


def read_table(path):
    import pandas as pd

    return pd.read_json(path, orient="records", lines=True, dtype=False)


def config_table(df):
    """One row per config: means over its successful samples (accuracy where answers exist)."""
    import pandas as pd

    recs = []
    for (k, cfg), g in df.groupby(["config_order", "config"], sort=True):
        a = aggregate(g.to_dict("records"))
        ok = g[g["status"] == "ok"] if "status" in g else g
        rec = {"config": cfg, "method": ok["method"].iloc[0] if len(ok) and "method" in ok else None,
               "n": a["n"], "n_failed": a["n_failed"],
               "accuracy": (a.get("accuracy") or {}).get("all", float("nan")),
               "eq_tokens_authors": a["equivalent_tokens"]["authors"],
               "eq_tokens_compute": a["equivalent_tokens"]["compute"],
               "flops_ratio_image": a["flops_ratio"]["image_only"],
               "flops_ratio_full": a["flops_ratio"]["full_sequence"],
               "kv_bytes": a["kv_bytes"]["total"], "kv_vision_bytes": a["kv_bytes"]["vision"],
               "kv_ratio": a["kv_bytes"]["ratio"], "agrees_vanilla": a.get("agrees_vanilla", float("nan"))}
        for c in ("global_thr", "individual_thr", "merge_threshold", "key_keep_rate", "prune_layers", "budget"):
            if c in ok and len(ok):
                rec[c] = ok[c].iloc[0] if c == "prune_layers" else ok[c].astype(float).mean()
        rec.update(a.get("decision") or {})
        recs.append(rec)
    return pd.DataFrame(recs)


def merge_shards(out) -> "pd.DataFrame":  # noqa: F821
    """Join summary.shard-I-of-N.jsonl into summary.{csv,jsonl} (+ configs.csv); refuse gaps."""
    import pandas as pd

    out = Path(out)
    found = {}
    for p in sorted(out.glob(f"{SUMMARY}.shard-*-of-*.jsonl")):
        m = re.fullmatch(rf"{SUMMARY}\.shard-(\d+)-of-(\d+)\.jsonl", p.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if not found:
        raise SystemExit(f"no shard tables ({SUMMARY}.shard-I-of-N.jsonl) in {out}")
    if len(found) > 1:
        raise SystemExit(f"{out} mixes shard counts {sorted(found)}; remove the stale ones")
    (n, parts), = found.items()
    missing = sorted(set(range(n)) - set(parts))
    if missing:
        raise SystemExit(f"shards {missing} of {n} are missing in {out}; run them first")
    df = sort_table(pd.concat([read_table(parts[i]) for i in range(n)], ignore_index=True))
    write_table(df, out, SUMMARY)
    config_table(df).to_csv(out / "configs.csv", index=False)
    return df


def comparable(df):
    """The table without the columns that legitimately differ between two runs (timings)."""
    return df.drop(columns=[c for c in TIMING_COLUMNS if c in df.columns])


def resolve_shard(spec: str | None) -> tuple[str | None, str | None]:
    """``auto`` -> i/n from accelerate/torchrun (RANK, WORLD_SIZE) or a Slurm array; plus a device."""
    if spec != "auto":
        return spec, None
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        device = None
        try:
            import torch
            if torch.cuda.is_available():
                device = f"cuda:{int(env.get('LOCAL_RANK', 0))}"
        except ImportError:
            pass
        return f"{int(env['RANK'])}/{int(env['WORLD_SIZE'])}", device
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        lo = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return f"{int(env['SLURM_ARRAY_TASK_ID']) - lo}/{int(env['SLURM_ARRAY_TASK_COUNT'])}", None
    print("--shard auto: no RANK/WORLD_SIZE or Slurm array variables; running every sample", file=sys.stderr)
    return None, None


def items_from_args(a):
    if a.images or a.questions:
        if not (a.images and a.questions):
            raise SystemExit("--images and --questions go together")
        return folder_items(a.images, a.questions)
    if a.hf_dataset:
        return hf_items(a.hf_dataset, a.hf_image_column, a.hf_question_column, a.hf_answer_column,
                        a.hf_split, a.n)
    return scene_items(a.split, 50 if a.n is None else a.n, a.seed)


def run_folder(a, items) -> tuple[Path, dict]:
    """(--out, or runs/MODEL-SPLIT-nN for the scene world; the dataset record of run.json)."""
    if a.images or a.questions:
        dataset = {"kind": "folder", "images": str(a.images), "questions": str(a.questions)}
    elif a.hf_dataset:
        dataset = {"kind": "hf-dataset", "path": str(a.hf_dataset), "split": a.hf_split}
    else:
        dataset = {"kind": "scene", "split": a.split, "seed": a.seed}
    dataset["n"] = len(items)
    if a.out:
        return Path(a.out), dataset
    if dataset["kind"] != "scene":
        raise SystemExit("--out is required for a folder or datasets input")
    return Path("runs") / f"{Path(str(a.model).rstrip('/')).name}-{a.split}-n{len(items)}", dataset


def add_input_args(ap):
    g = ap.add_argument_group("inputs (one kind)")
    g.add_argument("--split", default="test", choices=["train", "val", "test"], help="scene world split")
    g.add_argument("--n", type=int, default=None, help="samples (scene world default 50; datasets: all)")
    g.add_argument("--seed", type=int, default=0, help="scene world block (see analysis.evaluate) and baseline seed")
    g.add_argument("--images", default=None, help="folder of images ...")
    g.add_argument("--questions", default=None, help="... and a JSONL of questions")
    g.add_argument("--hf-dataset", default=None, help="local datasets folder (save_to_disk); needs 'datasets'")
    g.add_argument("--hf-split", default=None)
    g.add_argument("--hf-image-column", default="image")
    g.add_argument("--hf-question-column", default="question")
    g.add_argument("--hf-answer-column", default="answer")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        mp = argparse.ArgumentParser(prog="python -m analysis.batch merge",
                                     description="join the shard tables of one --out folder")
        mp.add_argument("--out", required=True)
        a = mp.parse_args(argv[1:])
        df = merge_shards(a.out)
        print(f"merged {len(df)} rows into {Path(a.out) / (SUMMARY + '.csv')}")
        return 0
    if argv[:1] == ["run"]:
        argv = argv[1:]
    ap = argparse.ArgumentParser(prog="python -m analysis.batch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="assets/toy-llava")
    ap.add_argument("--out", default=None, help="run folder (default runs/MODEL-SPLIT-nN for the scene world)")
    ap.add_argument("--configs", nargs="+", default=["off", "64"], help="config specs (see analysis.common)")
    ap.add_argument("--shard", default=None, help="i/n, or auto (accelerate / torchrun / Slurm array)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--baseline-layer", type=int, default=None,
                    help="FastV / random drop layer K (default: the model's first prune layer)")
    ap.add_argument("--no-traces", action="store_true", help="tables only (saves disk; not resumable)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    add_input_args(ap)
    add_method_file_arg(ap)
    a = ap.parse_args(argv)
    load_method_files(a.method_file)
    shard_spec, device = resolve_shard(a.shard)
    items = items_from_args(a)
    out, dataset = run_folder(a, items)
    runner = load_runner(a.model, a.device or device, threads=a.threads)
    df, stats = run_batch(runner, items, a.configs, out, max_new_tokens=a.max_new_tokens,
                          baseline_layer=a.baseline_layer, seed=a.seed, shard_spec=shard_spec,
                          save_traces=not a.no_traces, dataset=dataset)
    print(json.dumps(stats.as_dict() | {"run": str(out)}))
    if not shard_spec:
        print(config_table(df).to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
