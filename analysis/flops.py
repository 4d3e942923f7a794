"""FLOPs (both conventions) and KV bytes of a LLaVA model from its config.json alone, no weights.

    python -m analysis.flops --config analysis/configs/llava-1.5-7b.json
    python -m analysis.flops --config analysis/configs/llava-1.5-7b.json --preset 64
    python -m analysis.flops --config analysis/configs/llava-next-7b.json --preset 64     # 5 x 64 = 320
    python -m analysis.flops --config C --counts 576,300,200,100,64 --prune-layers 2,6,10,14  # exact

Why: papers in this field quote FLOPs and KV memory under different conventions, often without
saying which; this reproduces the published figures from the architecture alone, with every
convention named, so a number can be checked before anything is run.

Conventions (formulas in mustdrop.accounting, which this module reuses):
- FLOPs per LLM layer with n tokens: 4 n d^2 + 2 n^2 d + 3 n d m (multiply-adds). "image only"
  (PDrop / FastV / VScan): n = vision tokens of that layer; "full sequence" (SparseVLM): n = S +
  vision + T. Vision encoder and LM head not counted. LLaVA-1.5-7B vanilla, image only: 3.82 TFLOPs
  (PDrop's figure) — 32 x 576 x 4096 x (4 x 4096 + 2 x 576 + 3 x 11008) = 3.817e12.
- KV bytes: 2 (K and V) x layers x kv heads x head dim x dtype bytes per token; DART counts vision
  tokens only: 2 x 32 x 32 x 128 x 2 B = 524,288 B = 0.524 MB (decimal) per token for the 7B model.
  At 2880 tokens (LLaVA-NeXT, 5 x 576) that is 1510 MB (decimal; 1440 MiB). DART prints 1512 MB,
  which is 2880 x 0.525 MB: its per-token figure rounded up to 0.525 before multiplying.
- Equivalent tokens: authors' convention (p0 N0 + (p1-p0) N1 + ... + (L-p_last) Nk) / L, and
  compute convention (mean over layers of the vision tokens each processes).
- Weights: parameters counted from the config (vision tower up to the feature layer's model, projector,
  decoder, LM head unless tied), times 4 bytes (fp32, what a CPU runs) or 2 (bf16 / fp16). LLaVA-1.5-7B:
  7,063,427,072 (the count transformers reports for llava-hf/llava-1.5-7b-hf).
- Vision encoder FLOPs, same convention per vision layer with n = patches (+ CLS): 4 n c^2 + 2 n^2 c +
  2 n c i (two MLP matrices), every layer of the tower, once per crop; not part of the LLM figures.
- Tokens: (image_size / patch_size)^2 = 576 for LLaVA-1.5; LLaVA-NeXT counts --crops (default 5)
  times that, as the literature's 2880 does (newline tokens and unpadding ignored). S = 35 (vicuna_v1
  system prompt with BOS) and T = 20 (a short question + "ASSISTANT:") are assumptions; set them.
--preset P is an ESTIMATE from the authors' published average budgets (192 / 128 / 64 tokens per
576-token image, x crops for NeXT: 320 at preset 64, the published LLaVA-NeXT setting): the budget is
taken as a constant count in every layer, for FLOPs and for the KV cache. The exact figures need the
per-stage counts (--counts with --prune-layers), which a trace records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mustdrop.accounting import equivalent_tokens, kv_bytes_per_token, layer_flops
from mustdrop.vision_tokens import layer_average, per_layer

# Published average vision-token budgets per 576-token image (MustDrop's presets).
PUBLISHED_BUDGETS = {"192": 192, "128": 128, "64": 64}
# transformers' LlamaConfig defaults, which llava-hf config.json files rely on for omitted fields.
LLAMA_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "vocab_size": 32000}
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "fp16": 2, "bf16": 2, "fp32": 4}
DEFAULT_SYS_TOKENS = 35
DEFAULT_TEXT_TOKENS = 20
MB = 1e6


def read_config(path) -> dict:
    """The numbers accounting needs, from a LLaVA / LLaVA-NeXT config.json."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict) or "text_config" not in raw and "vision_config" not in raw:
        raise ValueError(f"{path} is not a LLaVA config.json (no text_config / vision_config)")
    t = dict(LLAMA_DEFAULTS, **(raw.get("text_config") or {}))
    v = raw.get("vision_config") or {}
    heads = int(t["num_attention_heads"])
    kv_heads = int(t.get("num_key_value_heads") or heads)
    head_dim = int(t.get("head_dim") or t["hidden_size"] // heads)
    image_size, patch = int(v.get("image_size", 336)), int(v.get("patch_size", 14))
    dtype = str(raw.get("torch_dtype") or raw.get("dtype") or t.get("torch_dtype") or "float16")
    cfg = {"name": Path(path).stem, "model_type": raw.get("model_type", "llava"),
           "layers": int(t["num_hidden_layers"]), "d": int(t["hidden_size"]), "m": int(t["intermediate_size"]),
           "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
           "grid_tokens": (image_size // patch) ** 2, "dtype": dtype}
    if v.get("hidden_size"):
        cfg["vision"] = {"model_type": v.get("model_type", "clip_vision_model"), "layers": int(v["num_hidden_layers"]),
                         "c": int(v["hidden_size"]), "i": int(v["intermediate_size"]),
                         "patch_size": patch, "image_size": image_size}
        cfg["params"] = parameter_count(raw, t, v)
    return cfg


def parameter_count(raw: dict, t: dict, v: dict) -> dict:
    """Parameters of a LLaVA from its config: vision tower, projector, decoder (embeddings and LM head apart)."""
    d, m, L = int(t["hidden_size"]), int(t["intermediate_size"]), int(t["num_hidden_layers"])
    heads = int(t["num_attention_heads"])
    kv = int(t.get("num_key_value_heads") or heads)
    hd = int(t.get("head_dim") or d // heads)
    vocab = int(t.get("vocab_size") or raw.get("vocab_size"))
    qkv_bias = t.get("model_type") == "qwen2" or bool(t.get("attention_bias"))
    attn = d * heads * hd + 2 * d * kv * hd + heads * hd * d + ((heads + 2 * kv) * hd if qkv_bias else 0)
    layer = attn + 3 * d * m + 2 * d
    tied = bool(t.get("tie_word_embeddings", raw.get("tie_word_embeddings", False)))
    c, i, p = int(v["hidden_size"]), int(v["intermediate_size"]), int(v.get("patch_size", 14))
    n = (int(v.get("image_size", 336)) // p) ** 2
    siglip = v.get("model_type") == "siglip_vision_model"
    vis_layer = 4 * (c * c + c) + 4 * c + (c * i + i) + (i * c + c)
    vision = (3 * p * p * c + (c if siglip else 0)             # patch embedding (SigLIP's has a bias)
              + (n if siglip else n + 1) * c                   # position embeddings (+ CLS)
              + (0 if siglip else c + 2 * c)                   # CLIP: class embedding, pre-layernorm
              + int(v["num_hidden_layers"]) * vis_layer + 2 * c)  # layers, post-layernorm
    projector = c * d + d + d * d + d
    newline = d if raw.get("model_type") == "llava_next" else 0
    out = {"vision_tower": vision, "projector": projector + newline, "embeddings": vocab * d,
           "decoder_layers": L * layer + d, "lm_head": 0 if tied else vocab * d}
    out["total"] = sum(out.values())
    return out


def vision_flops(vision: dict, crops: int = 1) -> float:
    """Multiply-adds of the vision tower per image (all layers, every crop)."""
    n = (vision["image_size"] // vision["patch_size"]) ** 2 + (0 if vision["model_type"] == "siglip_vision_model" else 1)
    c, i = vision["c"], vision["i"]
    return float(crops * vision["layers"] * (4 * n * c * c + 2 * n * n * c + 2 * n * c * i))


def per_layer_counts(counts, prune_layers, num_layers: int) -> list[int]:
    """Vision tokens each layer processes: N0 up to and including the first prune layer, then N1, ...
    (mustdrop.vision_tokens, the count traces record)."""
    return per_layer(counts[0], zip(prune_layers, counts[1:]), num_layers)


def kv_vision_entries(counts, prune_layers, num_layers: int) -> list[int]:
    """Vision entries per layer after MustDrop's output-aware trim: layers before the first prune
    layer keep N0, every later layer holds only the survivors of the last prune layer."""
    if not prune_layers:
        return [counts[0]] * num_layers
    first = prune_layers[0]
    return [counts[0] if layer < first else counts[-1] for layer in range(num_layers)]


def report(cfg: dict, tokens: int | None = None, crops: int | None = None, preset: str | None = None,
           counts=None, prune_layers=None, sys_tokens: int = DEFAULT_SYS_TOKENS,
           text_tokens: int = DEFAULT_TEXT_TOKENS, dtype: str | None = None) -> dict:
    """Vanilla and (estimated or exact) pruned FLOPs and KV bytes, every convention labelled."""
    L, d, m = cfg["layers"], cfg["d"], cfg["m"]
    if crops is None:
        crops = 5 if cfg["model_type"] == "llava_next" else 1
    N = int(tokens) if tokens else cfg["grid_tokens"] * crops
    dt = dtype or cfg["dtype"]
    if dt not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dt!r}; one of {sorted(DTYPE_BYTES)}")
    per_tok = kv_bytes_per_token(L, cfg["kv_heads"], cfg["head_dim"], DTYPE_BYTES[dt])
    S, T = int(sys_tokens), int(text_tokens)

    def flops(per_layer):
        return {"image_only": float(sum(layer_flops(n, d, m) for n in per_layer)),
                "full_sequence": float(sum(layer_flops(S + n + T, d, m) for n in per_layer))}

    vanilla = {"vision_tokens": N, "flops": flops([N] * L), "kv_vision_bytes": N * per_tok,
               "kv_total_bytes": (S + N + T) * per_tok}
    if "params" in cfg:
        P = cfg["params"]["total"]
        vanilla["weights_bytes"] = {"fp32": 4 * P, "bf16": 2 * P}
        vanilla["vision_flops"] = vision_flops(cfg["vision"], crops)
    out = {"config": cfg, "tokens": N, "crops": crops, "sys_tokens": S, "text_tokens": T, "dtype": dt,
           "kv_bytes_per_token": per_tok, "kv_mb_per_token": per_tok / MB, "vanilla": vanilla,
           "flops_formula": "4 n d^2 + 2 n^2 d + 3 n d m per LLM layer (multiply-adds)"}
    pruned = None
    if counts is not None:
        counts = [int(c) for c in counts]
        prune_layers = [int(p) for p in (prune_layers or [])]
        if len(counts) != len(prune_layers) + 1:
            raise ValueError(f"--counts needs {len(prune_layers) + 1} numbers (N0 and one per prune layer)")
        per_layer = per_layer_counts(counts, prune_layers, L)
        kv_vis = kv_vision_entries(counts, prune_layers, L)
        pruned = {"kind": "exact (per-stage counts given)", "counts": counts, "prune_layers": prune_layers,
                  "eq_tokens_authors": equivalent_tokens(counts, prune_layers, L, "authors"),
                  "eq_tokens_compute": layer_average(per_layer), "flops": flops(per_layer),
                  "kv_vision_bytes": sum(kv_vis) * per_tok / L,
                  "kv_total_bytes": sum(S + n + T for n in kv_vis) * per_tok / L}
    elif preset is not None:
        if preset not in PUBLISHED_BUDGETS:
            raise ValueError(f"--preset must be one of {sorted(PUBLISHED_BUDGETS)}")
        B = PUBLISHED_BUDGETS[preset] * crops
        pruned = {"kind": (f"estimate: the authors' published average budget ({PUBLISHED_BUDGETS[preset]} tokens per "
                           f"576-token image{f' x {crops} crops' if crops > 1 else ''}) taken as a constant count "
                           "in every layer"),
                  "budget": B, "eq_tokens_authors": float(B), "eq_tokens_compute": float(B),
                  "flops": flops([B] * L), "kv_vision_bytes": B * per_tok, "kv_total_bytes": (S + B + T) * per_tok}
    if pruned is not None:
        pruned["flops_ratio"] = {k: pruned["flops"][k] / vanilla["flops"][k] for k in pruned["flops"]}
        pruned["kv_ratio_vision"] = pruned["kv_vision_bytes"] / vanilla["kv_vision_bytes"]
        out["pruned"] = pruned
    return out


def format_report(r: dict) -> str:
    c, v = r["config"], r["vanilla"]
    crops_note = f", {r['crops']} crops" if r["crops"] > 1 else ""
    lines = [f"{c['name']}: {c['model_type']}, LLM {c['layers']} layers, d {c['d']}, m {c['m']}, {c['heads']} heads "
             f"({c['kv_heads']} KV heads, head dim {c['head_dim']}), {r['dtype']}",
             f"vision tokens {r['tokens']}" + (f" ({r['crops']} x {c['grid_tokens']})" if r["crops"] > 1 else "")
             + f"; S = {r['sys_tokens']} system, T = {r['text_tokens']} text tokens (assumed)",
             f"FLOPs ({r['flops_formula']})",
             f"  vanilla  image only {v['flops']['image_only'] / 1e12:.2f} TFLOPs (PDrop/FastV convention), "
             f"full sequence {v['flops']['full_sequence'] / 1e12:.2f} TFLOPs (SparseVLM convention)",
             *([f"weights   {c['params']['total'] / 1e9:.3f} B parameters (vision tower "
                f"{c['params']['vision_tower'] / 1e6:.0f} M, projector {c['params']['projector'] / 1e6:.1f} M, "
                f"embeddings {c['params']['embeddings'] / 1e6:.0f} M, decoder {c['params']['decoder_layers'] / 1e6:.0f} M, "
                f"LM head {c['params']['lm_head'] / 1e6:.0f} M): {v['weights_bytes']['fp32'] / 1e9:.2f} GB fp32, "
                f"{v['weights_bytes']['bf16'] / 1e9:.2f} GB bf16",
                f"  vision encoder {v['vision_flops'] / 1e12:.3f} TFLOPs per image (same convention, "
                f"{c['vision']['layers']} layers{crops_note}), not in the LLM figures above"]
               if "params" in c else []),
             f"KV cache  {r['kv_bytes_per_token']:,} B = {r['kv_mb_per_token']:.3f} MB (decimal) per token; vanilla vision "
             f"{v['kv_vision_bytes'] / MB:.1f} MB ({v['kv_vision_bytes'] / 2**20:.1f} MiB) (DART convention), "
             f"whole sequence {v['kv_total_bytes'] / MB:.1f} MB"]
    p = r.get("pruned")
    if p:
        lines += [f"pruned    {p['kind']}",
                  f"  equivalent tokens {p['eq_tokens_authors']:.1f} (authors' convention), "
                  f"{p['eq_tokens_compute']:.1f} (compute convention)",
                  f"  FLOPs image only {p['flops']['image_only'] / 1e12:.3f} TFLOPs ({p['flops_ratio']['image_only']:.1%} "
                  f"of vanilla), full sequence {p['flops']['full_sequence'] / 1e12:.3f} TFLOPs "
                  f"({p['flops_ratio']['full_sequence']:.1%})",
                  f"  KV vision {p['kv_vision_bytes'] / MB:.1f} MB ({p['kv_ratio_vision']:.1%} of vanilla), "
                  f"whole sequence {p['kv_total_bytes'] / MB:.1f} MB"]
    return "\n".join(lines)


def _ints(s):
    return [int(x) for x in str(s).split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.flops", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a LLaVA config.json (e.g. analysis/configs/llava-1.5-7b.json)")
    ap.add_argument("--preset", choices=sorted(PUBLISHED_BUDGETS), default=None,
                    help="estimate at the authors' published average budget")
    ap.add_argument("--counts", type=_ints, default=None, help="exact: N0,N1,...,Nk vision counts per stage")
    ap.add_argument("--prune-layers", type=_ints, default=None, help="with --counts (e.g. 2,6,10,14)")
    ap.add_argument("--tokens", type=int, default=None, help="vision tokens (default: grid x crops)")
    ap.add_argument("--crops", type=int, default=None, help="LLaVA-NeXT crops (default 5 for llava_next, else 1)")
    ap.add_argument("--sys-tokens", type=int, default=DEFAULT_SYS_TOKENS)
    ap.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS)
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPE_BYTES))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.counts is not None and a.preset is not None:
        ap.error("--counts and --preset exclude each other")
    try:
        cfg = read_config(a.config)
    except ValueError as e:
        ap.error(str(e))
    r = report(cfg, a.tokens, a.crops, a.preset, a.counts, a.prune_layers or [],
               a.sys_tokens, a.text_tokens, a.dtype)
    print(format_report(r))
    if a.json:
        from analysis.common import write_json_atomic
        write_json_atomic(a.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
