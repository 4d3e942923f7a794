"""The lmms-eval model ``mustdrop``: MustDrop, or a same-budget baseline, on a LLaVA checkpoint,
with one trace per sample and the run's token, FLOPs and KV accounting beside the task scores.

    lmms-eval --model mustdrop --model_args pretrained=llava-hf/llava-1.5-7b-hf,preset=64 \
        --tasks pope,gqa,textvqa_val --batch_size 1 --output_path runs/pope64
    ... --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,budget=64

Why a model of the harness and not a script of ours: token-pruning papers report their tables
through lmms-eval's tasks (prompts, answer extraction, metrics), so a number is comparable only
when it comes out of them. Registered through the ``lmms_eval.models`` entry point (pyproject.toml),
so ``pip install .[lmms]`` is all it takes.

Model args (``--model_args k=v,...``):
  pretrained   local folder or hub id of a LLaVA-1.5 / LLaVA-NeXT / SigLIP-LLaVA / LLaVA-OneVision /
               Qwen2-VL / Qwen2.5-VL checkpoint
  preset       off | 192 | 128 | 64 (default 64): the model's thresholds (its mustdrop.json, the
               defaults shipped for its hub id, else the authors' LLaVA-1.5-7B ones)
  method       mustdrop (default) | fastv | random | pool | fastervlm | visionzip | pdrop, or any
               method registered (mustdrop.methods: method_file, or the mustdrop.methods entry points)
  method_file  a Python file declaring a method (examples/methods/), then named by method=NAME
  budget       a baseline's layer-averaged vision tokens (compute convention), e.g. 64
  layer        FastV / random drop layer K (default: the model's first prune layer, 2 on LLaVA-1.5-7B)
  seed         random drop's seed
  positions    reference | original; default: the model's (reference, as the authors' code; original
               on Qwen-VL, whose 3-D positions have no compaction)
  layout       LLaVA-NeXT: stock (default) | reference (the authors' flat concatenation)
  global_thr, individual_thr, merge_threshold, key_keep_rate, window, prune_layers (2;6;10;14),
  merge, key_set, filter, kv_trim: override one MustDrop knob of the preset
  device, dtype (float16 on CUDA as the authors' scripts load LLaVA, float32 on CPU)
  trace_dir    where traces and the accounting go; default OUTPUT_PATH/mustdrop from --output_path
  traces       true (default) | false: write the per-sample trace files

Written under trace_dir: ``traces/<task>/<doc_id>.rank<r>.safetensors`` (the app's upload format;
every rank of a multi-GPU run writes into the same folders), ``samples.rank<r>.jsonl`` (one
accounting row per sample) and, by rank 0 once all ranks are gathered, ``summary.json``: per task
and overall, the mean equivalent tokens in both conventions, FLOPs and KV ratios to vanilla. The same
means are recorded through lmms-eval's metric log, so they appear in its results file under
"throughput" (``avg_mustdrop_*``) beside the task scores.

Generation is greedy (the authors' scripts), stopped at the model's end-of-sequence token or the
task's ``max_new_tokens``, then cut at the task's first ``until`` string. ``loglikelihood``
(multiple-choice scoring by perplexity) is refused with a message naming the task: MustDrop's decode
loop generates and records; it does not score a given continuation.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from lmms_eval.api.model import lmms

from .accounting import summarize
from . import methods
from .config import KNOB_FIELDS, MustDropConfig, parse_field, parse_flag, parse_number
from .jsonfile import write_json_atomic

MODEL_NAME = "mustdrop"
CLASS_PATH = "mustdrop.lmms.MustDropLMMS"
SUMMARY_KEYS = ("eq_tokens_authors", "eq_tokens_compute", "flops_ratio_image", "flops_ratio_full", "kv_ratio",
                "final_tokens", "kv_bytes")
# Model args that set one knob of the preset (prune_layers and positions are named arguments of their own);
# read with the config's own parser (mustdrop.config.parse_field), as the app and analysis specs are.
KNOBS = tuple(k for k in KNOB_FIELDS if k not in ("prune_layers", "positions"))


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval calls it when it builds its model registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


class MustDropLMMS(lmms):
    """One LLaVA checkpoint in the MustDrop adapter, answering lmms-eval's requests one at a time."""

    is_simple = True

    def __init__(self, pretrained: str = "llava-hf/llava-1.5-7b-hf", preset="64", method: str = "mustdrop",
                 budget=None, layer=None, seed=0, positions: str | None = None, layout: str = "stock",
                 prune_layers=None, device=None, dtype=None, trace_dir=None, traces=True, batch_size=1,
                 max_batch_size=None, method_file=None, **knobs) -> None:
        super().__init__()
        if method_file not in (None, ""):
            methods.load_file(str(method_file))
        from accelerate import Accelerator

        from .adapters import make_runner
        from .loading import load_llava

        self.accelerator = Accelerator()
        n_proc = self.accelerator.num_processes
        if n_proc > 1 and torch.cuda.is_available():
            device = f"cuda:{self.accelerator.local_process_index}"
        elif device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            dtype = "float16" if str(device).startswith("cuda") else "float32"
        self._device = torch.device(device)
        self._rank = self.accelerator.process_index
        self._world_size = n_proc
        if batch_size not in (None, 1, "1", "auto"):
            from loguru import logger
            logger.warning(f"mustdrop runs one sample at a time (the adapter is batch size 1); batch_size "
                           f"{batch_size} changes nothing")

        model, processor = load_llava(str(pretrained), device=str(device), dtype=str(dtype))
        self.runner = make_runner(model, processor, str(pretrained), layout=str(layout))
        self.pretrained = str(pretrained)
        self.mustdrop_config = build_config(self.runner, preset=preset, method=method, budget=budget, layer=layer,
                                   seed=seed, positions=positions, prune_layers=prune_layers, knobs=knobs)
        root = trace_dir if trace_dir not in (None, "") else _output_path_from_argv()
        self.root = None if root is None else (Path(root) / MODEL_NAME if trace_dir in (None, "") else Path(root))
        self.write_traces = _as_bool(traces, "traces")
        if self.root is None:
            from loguru import logger
            logger.warning("mustdrop: no --output_path and no trace_dir model arg: traces and summary.json are "
                           "not written (the accounting is still logged)")
        self.rows: list[dict] = []
        self._seen: dict = {}
        self._jsonl = None

    # ----------------------------------------------------------------- what lmms-eval reads
    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return 1

    @property
    def model(self):
        return self.runner.model

    # ----------------------------------------------------------------- requests
    def generate_until(self, requests) -> list[str]:
        from tqdm import tqdm

        out = []
        for req in tqdm(requests, disable=self.rank != 0, desc="MustDrop responding"):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            if (req.metadata or {}).get("__padding_only__"):
                out.append("")          # lmms-eval's padding of uneven shards: discarded, never scored
                continue
            image = self._one_image(doc_to_visual(self.task_dict[task][split][doc_id]), task, doc_id)
            max_new, sampling, until = generation_settings(gen_kwargs, task)
            context = clean_context(context, getattr(self.runner.processor, "image_token", None) or "<image>")
            trace = self.runner.run(image, context, self.mustdrop_config, max_new_tokens=max_new,
                                    sampling=sampling).trace
            text = cut_at(trace.answer, until)
            self._record(trace, text, task, doc_id, image)
            out.append(text)
        self._publish()
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError(refusal(requests, "loglikelihood (multiple-choice scoring by likelihood)"))

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(refusal(requests, "generate_until_multi_round (several rounds per sample)"))

    def _one_image(self, visuals, task, doc_id):
        from PIL import Image

        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
            kinds = ", ".join(type(v).__name__ for v in visuals) or "none"
            raise ValueError(f"mustdrop: task {task!r} doc {doc_id} gives {len(visuals)} visual(s) ({kinds}); MustDrop "
                             "prunes the vision tokens of exactly one image per sample")
        return visuals[0]

    # ----------------------------------------------------------------- traces and accounting
    def _record(self, trace, text, task, doc_id, image=None) -> None:
        key = (task, doc_id)
        k = self._seen.get(key, 0)
        self._seen[key] = k + 1
        name = f"{_safe(str(doc_id))}{'' if k == 0 else f'.{k}'}.rank{self.rank}.safetensors"
        path = None
        sample = f"{_safe(task)}-{_safe(str(doc_id))}{'' if k == 0 else f'.{k}'}"
        if self.root is not None and self.write_traces:
            path = trace.save(self.root / "traces" / _safe(task) / name)
        row = {"task": task, "doc_id": doc_id, "rank": self.rank, "response": text, "answer": trace.answer,
               "trace": None if path is None else str(path.relative_to(self.root))}
        row.update(accounting_row(trace))
        if self.root is not None and self.write_traces:       # the run folder's columns (mustdrop.dataset)
            row.update(run_columns(self.root, trace, text, sample, image))
        self.rows.append(row)
        if self.root is not None:
            if self._jsonl is None:
                self.root.mkdir(parents=True, exist_ok=True)
                self._jsonl = open(self.root / f"samples.rank{self.rank}.jsonl", "w", encoding="utf-8")
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()

    def _publish(self) -> None:
        """Gather every rank's rows; rank 0 writes summary.json and logs the means into lmms-eval."""
        rows = self.rows
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, rows)      # every rank calls this: it is a collective
            rows = [r for part in parts for r in part]
        if self.rank != 0 or not rows:
            return
        summary = run_summary(rows, self.mustdrop_config, self.pretrained, self.world_size)
        if self.root is not None:
            write_json_atomic(self.root / "summary.json", summary)
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        overall = summary["all"]
        log_metrics(total_elapsed_time=overall["total_s"], total_gen_tokens=overall["generated_tokens"],
                    avg_speed=overall["generated_tokens"] / overall["total_s"] if overall["total_s"] > 0 else 0.0,
                    additional_metrics={f"mustdrop_{k}": overall[k] for k in SUMMARY_KEYS})
        print(format_summary(summary), flush=True)


def run_columns(root: Path, trace, text: str, sample: str, image) -> dict:
    """The run-folder layout's columns of one row (mustdrop.dataset.layout), run.json written once;
    the image is kept as a PNG copy in the folder (lmms-eval's datasets are not files we can point at).
    No reference answer: lmms-eval scores the responses itself."""
    from .dataset import layout

    if not (root / layout.SETTINGS).is_file():
        layout.write_settings(root, layout.settings("lmms-eval", trace.meta["model"]["id"],
                                                    [{"name": trace.meta["config"].get("preset")}],
                                                    {"kind": "lmms-eval"}, "samples.rank*.jsonl", vanilla=None))
    return {"id": sample, "config": trace.meta["config"].get("preset"), "method": trace.meta["config"].get("method"),
            "status": "ok", "question": trace.meta["input"]["question"], "prediction": text,
            "image": None if image is None else json.dumps(layout.store_image(root, sample, image))}


# --------------------------------------------------------------------- pure helpers (tested alone)
def build_config(runner, preset="64", method="mustdrop", budget=None, layer=None, seed=0, positions=None,
                 prune_layers=None, knobs=None) -> MustDropConfig:
    """The MustDropConfig that model args name; any bad value is refused with a message naming it.
    Positions not named are the model's (``runner.defaults``), for MustDrop and the baselines alike."""
    knobs = dict(knobs or {})
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise ValueError(f"mustdrop: unknown model arg(s) {unknown}; known: pretrained, preset, method, method_file, "
                         f"budget, layer, seed, positions, layout, prune_layers, device, dtype, trace_dir, traces, {', '.join(KNOBS)}")
    method = str(method)
    if method not in methods.names():
        raise ValueError(f"mustdrop: method must be one of {', '.join(methods.names())}, got {method!r}")
    if method == methods.DEFAULT:
        if budget is not None:
            raise ValueError("mustdrop: budget is for the baselines (method=fastv, ...); MustDrop's budget is set by "
                             "its preset's thresholds (preset=192 / 128 / 64)")
        cfg = runner.config_for(str(preset))
    else:
        if budget is None:
            raise ValueError(f"mustdrop: method={method} needs budget=N, the layer-averaged vision tokens it must meet "
                             "(e.g. budget=64)")
        b = _parsed(parse_number, budget, "budget")
        k = runner.defaults.prune_layers[0] if layer is None else _parsed(parse_number, layer, "layer", int)
        cfg = MustDropConfig.baseline(method, b, layer=k, seed=_parsed(parse_field, "seed", seed),
                                      positions=runner.defaults.positions)
    args = dict(knobs) | ({} if positions in (None, "") else {"positions": positions}) \
        | ({} if prune_layers is None else {"prune_layers": prune_layers})
    cfg = cfg.replace(**{key: _parsed(parse_field, key, value) for key, value in args.items()})
    runner.host.check(cfg)                   # the model family's own check (a per-image grid on Qwen-VL)
    return cfg


def generation_settings(gen_kwargs: dict | None, task: str):
    """(max_new_tokens, Sampling, until) from a task's generation kwargs; beam search is refused."""
    from .run.decode import MAX_NEW_TOKENS_LIMIT, Sampling

    g = dict(gen_kwargs or {})
    if int(g.get("num_beams", 1) or 1) > 1:
        raise ValueError(f"mustdrop: task {task!r} asks for beam search (num_beams={g['num_beams']}); MustDrop's "
                         "decode loop is greedy or sampled, one sequence")
    max_new = int(g.get("max_new_tokens", 16) or 16)
    max_new = min(max(max_new, 1), MAX_NEW_TOKENS_LIMIT)
    temperature = float(g.get("temperature", 0) or 0)
    if g.get("do_sample") and temperature > 0:
        sampling = Sampling(temperature=temperature, top_p=float(g.get("top_p") or 1.0))
    else:
        sampling = Sampling()
    until = g.get("until") or []
    until = [until] if isinstance(until, str) else [u for u in until if isinstance(u, str) and u]
    return max_new, sampling, until


def clean_context(context: str, image_token: str = "<image>") -> str:
    """The task's prompt without image placeholders: some tasks write ``<image>\n`` into it, while the
    adapter places the image itself, where the model's chat template puts it."""
    return context.replace(image_token + "\n", "").replace(image_token, "").strip()


def cut_at(text: str, until) -> str:
    """The text before the first stop string (what lmms-eval's own models return)."""
    for u in until:
        if u and u in text:
            text = text.split(u, 1)[0]
    return text


def accounting_row(trace) -> dict:
    acc = summarize(trace)
    f, kv = acc["flops"], acc["kv"]
    gen = trace.meta["generation"]
    return {"N0": trace.meta["sequence"]["N0"], "final_tokens": acc["vision_tokens"]["final"],
            "eq_tokens_authors": acc["equivalent_tokens"]["authors"],
            "eq_tokens_compute": acc["equivalent_tokens"]["compute"],
            "flops_ratio_image": f["ratio_image_only"], "flops_ratio_full": f["ratio_full_sequence"],
            "kv_bytes": kv["total_bytes"], "kv_ratio": kv["total_bytes"] / kv["vanilla_total_bytes"],
            "generated_tokens": len(gen["token_ids"]), "total_s": float(trace.meta["timings"]["total_s"]),
            "authors_formula": acc["equivalent_tokens"]["authors_formula"],
            "compute_formula": acc["equivalent_tokens"]["compute_formula"]}


def run_summary(rows: list[dict], config: MustDropConfig, model: str, world_size: int = 1) -> dict:
    """Means per task and over all samples (each sample counts once, whichever rank ran it)."""
    def block(rs):
        out = {"n": len(rs)}
        for k in SUMMARY_KEYS:
            out[k] = sum(float(r[k]) for r in rs) / len(rs)
        out["generated_tokens"] = int(sum(r["generated_tokens"] for r in rs))
        out["total_s"] = float(sum(r["total_s"] for r in rs))
        return out

    tasks = sorted({r["task"] for r in rows})
    return {"model": model, "config": config.to_dict(), "world_size": world_size,
            "conventions": {"equivalent_tokens_authors": rows[0]["authors_formula"] + " (as the paper prints and "
                            "quotes its budgets)",
                            "equivalent_tokens_compute": rows[0]["compute_formula"] + " = mean over LLM layers of the "
                            "vision tokens each layer processed",
                            "flops": "4 n d^2 + 2 n^2 d + 3 n d m per LLM layer, prefill, ratio to vanilla: image "
                            "tokens only (PDrop/FastV) and full sequence",
                            "kv": "K + V bytes of every layer after prefill (and the stage-3 trim), ratio to vanilla"},
            "tasks": {t: block([r for r in rows if r["task"] == t]) for t in tasks},
            "all": block(rows)}


def format_summary(summary: dict) -> str:
    cfg = summary["config"]
    lines = [f"MustDrop accounting ({cfg['preset']}, method {cfg['method']}), mean per sample:",
             "| task | n | eq. tokens (authors') | eq. tokens (compute) | FLOPs ratio (image) | FLOPs ratio (full) "
             "| KV ratio |", "|---|---|---|---|---|---|---|"]
    for name, b in list(summary["tasks"].items()) + [("all", summary["all"])]:
        lines.append(f"| {name} | {b['n']} | {b['eq_tokens_authors']:.1f} | {b['eq_tokens_compute']:.1f} | "
                     f"{b['flops_ratio_image']:.3f} | {b['flops_ratio_full']:.3f} | {b['kv_ratio']:.3f} |")
    return "\n".join(lines)


def refusal(requests, what: str) -> str:
    tasks = sorted({str(getattr(r, "task_name", None) or r.metadata.get("task")) for r in requests}) or ["?"]
    return (f"mustdrop cannot run task(s) {', '.join(tasks)}: they ask for {what}. MustDrop's decode loop "
            "generates an answer and records it; it does not score a given continuation. Run the task's "
            "generate_until variant instead (e.g. seedbench rather than seedbench_ppl); the paper's benchmarks "
            "(gqa, mmbench_en_dev, mme, pope, scienceqa_img, vqav2_val, textvqa_val) all generate.")


def _output_path_from_argv(argv=None) -> str | None:
    """``--output_path X`` of the lmms-eval command line (every rank of an accelerate launch sees it);
    lmms-eval hands a model no output path of its own."""
    argv = list(sys.argv if argv is None else argv)
    for i, a in enumerate(argv):
        if a in ("--output_path", "--output-path") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(("--output_path=", "--output-path=")):
            return a.split("=", 1)[1]
    return None


def _parsed(parse, *args):
    """A model arg read by the config's parser; its message says it comes from the mustdrop model."""
    try:
        return parse(*args)
    except ValueError as e:
        raise ValueError(f"mustdrop: {e}") from None


def _as_bool(v, name) -> bool:
    return _parsed(parse_flag, v, name)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


__all__ = ["MustDropLMMS", "manifest", "build_config", "generation_settings", "clean_context", "cut_at",
           "run_summary"]
