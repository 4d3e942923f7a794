"""Core benchmark: ratios measured in one run (never asserted in tests).

    python benchmarks/bench_core.py [--repeats 3] [--threads 2] [--device cpu]

On a ~100M-parameter LLaVA-1.5-shaped random model (CLIP 336/14, 577 vision tokens):
1. trace recording overhead: MustDrop with the trace / MustDrop without recording (target <= 1.05);
2. prefill speed-up of the 64 preset over vanilla / the analytic full-sequence FLOPs speed-up
   (target >= 0.8);
3. stage-2 scoring vs eager full-attention scoring at L >= 640 (7B-like attention: 32 heads of
   128): time ratio (target <= 0.5) and peak extra memory, measured each in a fresh process,
   growing as T x L for ours and L^2 for eager.

And a counted section (``--counted-only`` runs just it), exact and load-independent, on CPU: the
aten ops and the host-syncing ops of one whole vanilla run and one whole MustDrop run (4 prune
layers, drops at each) on a 32-layer tiny decoder. Targets: ops ratio <= 1.10; syncing ops <=
vanilla's + one per prune layer (the kept count, a dynamic shape). With stage 1a on there is one
more: its merged-window count sizes the vision tower's input from vision layer 1 on, before any
other read-back of either run (see README, Benchmarks). ``--op-diff`` prints where MustDrop's
extra ops come from. tests/test_sync_budget.py pins the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(folder: Path):
    from mustdrop.testing import build_tiny_llava
    return build_tiny_llava(folder, vision_hidden=384, vision_layers=8, vision_heads=6, text_hidden=768,
                            text_layers=12, text_heads=12, text_kv_heads=12, intermediate=2304, seed=0)


def build_7b_shaped(device: str, dtype: str):
    """LLaVA-1.5-7B's exact shapes (CLIP ViT-L/14-336, 24 layers x 1024; Llama 32 layers x 4096,
    32 heads, MLP 11008, vocab 32064) with random weights, built on the device; the processor comes
    from an offline test checkpoint. Random weights are fine for timing: every ratio below divides
    two runs of the same model, and the analytic FLOPs use the token counts this run produced."""
    from transformers import AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from mustdrop.adapters.loading import pick_dtype
    from mustdrop.testing import build_tiny_llava

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_llava(Path(tmp) / "proc", text_layers=2, vision_layers=2)
        processor = AutoProcessor.from_pretrained(Path(tmp) / "proc")
    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                       num_hidden_layers=24, num_attention_heads=16, projection_dim=768),
        text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=576)
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=pick_dtype(dtype, device))
    return model.eval(), processor


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench_model(args):
    from PIL import Image
    import numpy as np
    from mustdrop.accounting import summarize
    from mustdrop.adapters import LlavaMustDrop, load_llava

    if args.size == "7b":
        model, proc = build_7b_shaped(args.device, args.dtype)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = build_model(Path(tmp) / "bench-llava")
            model, proc = load_llava(str(folder), args.device, args.dtype)
    n_params = sum(p.numel() for p in model.parameters())
    runner = LlavaMustDrop(model, proc, f"bench-llava-{args.size}")
    rng = np.random.default_rng(0)
    img = np.full((336, 336, 3), (40, 120, 200), np.uint8)
    img[:, :168] = rng.integers(0, 256, (336, 168, 3))
    image = Image.fromarray(img)
    q = "what colour is the square?"
    cfg64 = runner.config_for("64")
    off = runner.config_for("off")

    # A and B alternate within one loop so that a drifting background load hits both alike.
    rec, norec, pre_md, pre_van = [], [], [], []
    runner.run(image, q, cfg64, max_new_tokens=8)
    runner.run(image, q, off, max_new_tokens=1)
    for _ in range(args.repeats):
        t = time.perf_counter()
        res = runner.run(image, q, cfg64, max_new_tokens=8, record=True)
        rec.append(time.perf_counter() - t)
        t = time.perf_counter()
        runner.run(image, q, cfg64, max_new_tokens=8, record=False)
        norec.append(time.perf_counter() - t)
        pre_md.append(runner.run(image, q, cfg64, max_new_tokens=1).trace.meta["timings"]["prefill_s"])
        pre_van.append(runner.run(image, q, off, max_new_tokens=1).trace.meta["timings"]["prefill_s"])
    trace = res.trace
    t_rec, t_norec = statistics.median(rec), statistics.median(norec)
    pre_md, pre_van = statistics.median(pre_md), statistics.median(pre_van)
    acc = summarize(trace)
    analytic = 1 / acc["flops"]["ratio_full_sequence"]
    measured = pre_van / pre_md
    return {
        "model_params_M": round(n_params / 1e6, 1),
        "vision_tokens_per_layer": trace.meta["vision_tokens_per_layer"],
        "record_overhead": {"with_trace_s": t_rec, "without_s": t_norec, "ratio": t_rec / t_norec},
        "prefill": {"vanilla_s": pre_van, "mustdrop64_s": pre_md, "measured_speedup": measured,
                    "analytic_speedup_full_sequence": analytic, "ratio": measured / analytic},
    }


def scoring_worker(method: str, L: int, T: int, repeats: int, device: str = "cpu") -> dict:
    """One measurement in a fresh process, so the peak (RSS on CPU, allocator peak on CUDA) is this
    method's alone."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, apply_rotary_pos_emb
    from mustdrop.adapters.llava import text_rows_attention

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=64,
                      max_position_embeddings=8192)
    cuda = device.startswith("cuda")
    dt = torch.float16 if cuda else torch.float32
    attn = LlamaAttention(cfg, 0).eval().to(device, dt)
    hidden = (torch.randn(1, L, 4096) * 0.05).to(device, dt)
    pos = torch.arange(L, device=device).unsqueeze(0)
    cos, sin = LlamaRotaryEmbedding(cfg)(hidden, pos)
    with torch.no_grad():
        k = attn.k_proj(hidden).view(1, L, 32, 128).transpose(1, 2)
        q_all = attn.q_proj(hidden).view(1, L, 32, 128).transpose(1, 2)
        q_all, k = apply_rotary_pos_emb(q_all, k, cos, sin)
    del q_all
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()

    def ours():
        with torch.no_grad():
            return text_rows_attention(attn, hidden, (cos, sin), k, T, apply_rotary_pos_emb)

    def eager():   # what output_attentions gives: the full L x L map of every head, then the T rows
        with torch.no_grad():
            q = attn.q_proj(hidden).view(1, L, 32, 128).transpose(1, 2)
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            scores = (q @ k.transpose(-1, -2)) * attn.scaling
            scores = scores + torch.full((L, L), float("-inf"), device=device, dtype=scores.dtype).triu(1)
            return torch.softmax(scores, dim=-1)[:, :, L - T:]

    fn = ours if method == "ours" else eager
    if cuda:
        def synced():
            out = fn()
            torch.cuda.synchronize()
            return out
        t, out = timed(synced, repeats)
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        t, out = timed(fn, repeats)
        peak_mb = (peak_rss_kb() - base) / 1024
    return {"time_s": t, "peak_extra_MB": peak_mb, "rows": list(out.shape)}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset the process's peak RSS (Linux: write 5 to clear_refs) so that set-up transients do not
    hide a smaller peak; return the current RSS in kB, the level the peak is measured from."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kb() -> int:
    try:
        return _status_kb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bench_scoring(args):
    rows = []
    for L in args.lengths:
        r = {}
        for method in ("ours", "eager"):
            p = subprocess.run([sys.executable, __file__, "--scoring-worker", method, str(L), str(args.text_rows),
                                str(args.repeats), "--threads", str(args.threads), "--device", args.device],
                               capture_output=True, text=True, check=True)
            r[method] = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append({"L": L, "T": args.text_rows, "ours": r["ours"], "eager": r["eager"],
                     "time_ratio": r["ours"]["time_s"] / r["eager"]["time_s"]})
    return rows


# ---------------------------------------------------------------------------------------------
# Counted section: what the device is asked to do, not how long it takes.

SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "masked_scatter", "equal",
                      "is_nonzero", "item"})
_UNIQUE_OPS = frozenset({"_unique", "_unique2", "unique_dim", "unique_consecutive"})
COUNTED_PRUNE_LAYERS = (2, 6, 10, 14)


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside the ``with`` block, and those that make the host wait
    for the device: the ops of SYNC_OPS (a value or a data-dependent shape read back) and, when a
    tensor lives on an accelerator, every copy from it to host memory. With ``phases`` it also
    counts each op under the phase of the run that dispatched it (see ``op_phase``)."""

    def __init__(self, phases: bool = False):
        super().__init__()
        self.ops = Counter()
        self.syncs = Counter()
        self.by_phase = Counter() if phases else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        self.ops[name] += 1
        if self.by_phase is not None:
            self.by_phase[(op_phase(sys._getframe(1)), name)] += 1
        family = "unique" if name in _UNIQUE_OPS else name
        if family in SYNC_OPS:
            self.syncs[family] += 1
        elif _device_to_host(name, args, kwargs, out):
            self.syncs["device_to_host"] += 1
        return out

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())


# Where an op comes from, by the functions of mustdrop/ on the Python stack that dispatched it.
_PHASE_OF = (("_trace", "recording"), ("_trim", "kv trim (stage 3)"), ("_decode", "decode"),
             ("local_spatial_merge", "stage 1a"), ("merge_hook", "stage 1a"), ("_key_scores", "stage 1b"),
             ("key_token_set", "stage 1b"), ("_encode", "vision"), ("_attach_prefill", "prefill hooks"),
             ("_decide", "prefill hooks"), ("_text_rows_probs", "prefill hooks"), ("_RowsRope", "prefill hooks"),
             ("_Prefill", "inputs"), ("_embeds", "inputs"), ("_split_prompt", "inputs"), ("_inputs", "inputs"),
             ("run", "prefill layers"))


def op_phase(frame) -> str:
    """The phase of a run an op belongs to: the first of _PHASE_OF whose function (or class, for
    methods) is on the stack, innermost hooks first; model code under ``run`` is "prefill layers"."""
    names = []
    while frame is not None:
        code = frame.f_code
        if "/mustdrop/" in code.co_filename:
            names.append(code.co_qualname)
        frame = frame.f_back
    for key, phase in _PHASE_OF:
        if any(n == key or n.startswith(key + ".") or f".{key}." in f".{n}." for n in names):
            return phase
    return "inputs"


_COPY_OPS = frozenset({"_to_copy", "copy_", "_copy_from", "_copy_from_and_resize"})


def _device_to_host(name, args, kwargs, out) -> bool:
    if name not in _COPY_OPS:
        return False
    tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
    return any(t.device.type != "cpu" for t in tensors) and any(t.device.type == "cpu" for t in tensors)


def build_counted_runner(folder: Path, num_layers: int = 32, sharpen: float = 32.0):
    """A tiny LLaVA-1.5-layout model with a ``num_layers`` decoder, its queries scaled by ``sharpen``
    so that attention is peaked enough for stage 2 to drop tokens at every prune layer (with the
    seeded random weights as saved, attention is almost uniform and only the first drop bites)."""
    from mustdrop.adapters import LlavaMustDrop, load_llava
    from mustdrop.testing import build_tiny_llava

    build_tiny_llava(folder, text_layers=num_layers, text_hidden=32, intermediate=64, vision_hidden=32,
                     vision_layers=3, seed=0)
    model, proc = load_llava(str(folder), "cpu", "float32")
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
    return LlavaMustDrop(model, proc, "counted-tiny")


def counted_image():
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    img = np.full((336, 336, 3), (40, 120, 200), np.uint8)
    img[:, :168] = rng.integers(0, 256, (336, 168, 3))
    return Image.fromarray(img)


def count_runs(runner, max_new_tokens: int = 1, prune_layers=COUNTED_PRUNE_LAYERS, global_thr: float = 0.0026,
               individual_thr: float = 1.0, merge: bool = True, warm_up: bool = True, phases: bool = False) -> dict:
    """Ops and syncing ops of one whole vanilla run (preset off) and one whole MustDrop run (every
    stage on, ``prune_layers``), each counted after an uncounted warm-up call (``warm_up``; a
    runner that already ran needs none) so that one-off caches are not counted. Raises if some
    prune layer drops nothing: the count would not cover every drop."""
    image = counted_image()
    q = "what colour is the square?"
    configs = {"vanilla": runner.config_for("off"),
               "mustdrop": runner.config_for("64").replace(prune_layers=tuple(prune_layers), global_thr=global_thr,
                                                           individual_thr=individual_thr, merge=merge)}
    out = {}
    for name, cfg in configs.items():
        if warm_up:
            runner.run(image, q, cfg, max_new_tokens=max_new_tokens)
        with OpCounter(phases) as c:
            res = runner.run(image, q, cfg, max_new_tokens=max_new_tokens)
        out[name] = {"ops": c.total_ops, "syncs": c.total_syncs, "sync_ops": dict(c.syncs), "op_counts": c.ops,
                     "by_phase": c.by_phase,
                     "stage2": [(s["layer"], s["entering"], s["kept"]) for s in res.trace.meta["stage2"]],
                     "merged_windows": len(res.trace.meta["stage1a"]["merged_windows"])}
    drops = out["mustdrop"]["stage2"]
    if len(drops) != len(prune_layers) or any(kept >= entering for _, entering, kept in drops):
        raise RuntimeError(f"the counted MustDrop run must drop at every prune layer; got {drops}")
    out["ops_ratio"] = out["mustdrop"]["ops"] / out["vanilla"]["ops"]
    out["extra_syncs"] = out["mustdrop"]["syncs"] - out["vanilla"]["syncs"]
    out["max_new_tokens"] = max_new_tokens
    return out


def bench_counted(token_counts=(1, 8)) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        runner = build_counted_runner(Path(tmp) / "counted-tiny")
        rows = [count_runs(runner, n) for n in token_counts]
        no_merge = count_runs(runner, token_counts[0], merge=False)
        no_merge["label"] = "stage 1a off"
        return rows + [no_merge]


def print_counted(rows) -> None:
    n_prune = len(COUNTED_PRUNE_LAYERS)
    print(f"0. counted, CPU, 32-layer tiny decoder, MustDrop with every stage on and {n_prune} prune layers "
          f"{list(COUNTED_PRUNE_LAYERS)} (vision tokens entering -> kept: "
          f"{', '.join(f'{e}->{k}' for _, e, k in rows[0]['mustdrop']['stage2'])}):")
    for r in rows:
        v, m = r["vanilla"], r["mustdrop"]
        label = f", {r['label']}" if "label" in r else ""
        print(f"   {r['max_new_tokens']:>2} new token(s){label}: aten ops vanilla {v['ops']}, MustDrop {m['ops']}: ratio "
              f"{r['ops_ratio']:.3f} (target <= 1.10); syncing ops vanilla {v['syncs']}, MustDrop {m['syncs']} = "
              f"vanilla + {r['extra_syncs']} (target <= vanilla + {n_prune})")
        print(f"      MustDrop syncing ops: {dict(sorted(m['sync_ops'].items()))}")
    print(f"   with stage 1a on, one read-back beyond the {n_prune} kept counts is its merged-window count: it "
          "sizes the vision tower's input from vision layer 1 on, before any other read-back of either run")


def print_op_diff(r, top: int = 40) -> None:
    """Where MustDrop's extra ops come from: per phase, then per (phase, aten op), MustDrop - vanilla."""
    v, m = r["vanilla"]["by_phase"], r["mustdrop"]["by_phase"]
    per = Counter()
    for (phase, _), n in m.items():
        per[phase] += n
    for (phase, _), n in v.items():
        per[phase] -= n
    totals_v, totals_m = Counter(), Counter()
    for (phase, _), n in v.items():
        totals_v[phase] += n
    for (phase, _), n in m.items():
        totals_m[phase] += n
    print(f"   ops by phase, {r['max_new_tokens']} new token(s) (vanilla / MustDrop / difference):")
    for phase in sorted(set(totals_v) | set(totals_m), key=lambda p: -abs(per[p])):
        print(f"      {phase:<20} {totals_v[phase]:>6} {totals_m[phase]:>6} {per[phase]:>+6}")
    diff = Counter(m)
    diff.subtract(v)
    rows = sorted(((k, n) for k, n in diff.items() if n), key=lambda kn: -abs(kn[1]))
    print(f"   largest differences by (phase, aten op), {len(rows)} in all:")
    for (phase, op), n in rows[:top]:
        print(f"      {phase:<20} {op:<28} {v[(phase, op)]:>5} {m[(phase, op)]:>5} {n:>+5}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16 (default: float32 on CPU, "
                    "float16 on CUDA)")
    ap.add_argument("--size", choices=["100m", "7b"], default="100m",
                    help="100m: a ~100M-parameter random model; 7b: LLaVA-1.5-7B shapes, random weights (GPU)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[640, 1280, 2560])
    ap.add_argument("--text-rows", type=int, default=20)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--counted-only", action="store_true", help="print only the counted section (CPU, exact)")
    ap.add_argument("--op-diff", action="store_true", help="with the counted section: where MustDrop's extra ops "
                    "come from, per phase of the run and per aten op (1 new token)")
    ap.add_argument("--scoring-worker", nargs=4, metavar=("METHOD", "L", "T", "REPEATS"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.scoring_worker:
        m, L, T, rep = args.scoring_worker
        print(json.dumps(scoring_worker(m, int(L), int(T), int(rep), args.device)))
        return
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}")
    print_counted(bench_counted())
    if args.op_diff:
        with tempfile.TemporaryDirectory() as tmp:
            print_op_diff(count_runs(build_counted_runner(Path(tmp) / "counted-tiny"), 1, phases=True))
    if args.counted_only:
        return
    if not args.skip_model:
        r = bench_model(args)
        print(f"model: {r['model_params_M']} M parameters; vision tokens per LLM layer at preset 64: "
              f"{r['vision_tokens_per_layer']}")
        o = r["record_overhead"]
        print(f"1. trace recording overhead: {o['with_trace_s']:.3f} s / {o['without_s']:.3f} s = "
              f"{o['ratio']:.3f}  (target <= 1.05)")
        p = r["prefill"]
        print(f"2. prefill: vanilla {p['vanilla_s']:.3f} s, MustDrop-64 {p['mustdrop64_s']:.3f} s -> speed-up "
              f"{p['measured_speedup']:.2f}x; analytic (full-sequence FLOPs) {p['analytic_speedup_full_sequence']:.2f}x;"
              f" ratio {p['ratio']:.2f}  (target >= 0.8)")
    print("3. stage-2 scoring, 32 heads x 128, T text rows (each measured in a fresh process):")
    print(f"   {'L':>6} {'ours s':>9} {'eager s':>9} {'time ratio':>10} {'ours MB':>9} {'eager MB':>9}")
    for row in bench_scoring(args):
        print(f"   {row['L']:>6} {row['ours']['time_s']:>9.4f} {row['eager']['time_s']:>9.4f} "
              f"{row['time_ratio']:>10.3f} {row['ours']['peak_extra_MB']:>9.1f} {row['eager']['peak_extra_MB']:>9.1f}")
    print("   analytic score tensors: ours H*T*L*4 B, eager H*L*L*4 B (+ the softmax copy)")


if __name__ == "__main__":
    main()
