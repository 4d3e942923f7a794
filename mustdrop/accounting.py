"""Equivalent tokens, FLOPs and KV bytes: the numbers papers in this field argue about, labelled.

Conventions (all FLOPs count multiply-adds as in the literature, per LLM layer, n tokens):
- equivalent tokens, authors' printed convention: weights p0, p1-p0, ..., L-p_last over the vision
  counts N0..Nk, divided by L. For LLaVA-1.5-7B (prune layers 2/6/10/14 of 32):
  (2 N0 + 4 N1 + 4 N2 + 4 N3 + 18 N4) / 32. It is one layer off what is computed.
- equivalent tokens, compute convention: the mean over layers of the vision tokens each layer
  processed: (3 N0 + 4 N1 + 4 N2 + 4 N3 + 17 N4) / 32 for the same model.
- FLOPs, PDrop/FastV convention: sum over layers of 4 n d^2 + 2 n^2 d + 3 n d m with n the image
  tokens of that layer only (LLaVA-1.5-7B vanilla: 3.82 TFLOPs).
- FLOPs, full sequence: the same formula with n = S + vision + T tokens (SparseVLM's convention).
- KV bytes: K and V, every layer, num_kv_heads * head_dim values each, at the model's dtype.
  DART counts vision tokens only: 0.524 MB per token for LLaVA-1.5-7B in fp16.
Vision-encoder FLOPs are not counted by any of them. Every vanilla figure counts the vision tokens the
unpruned model feeds its LLM for the image (``vanilla_vision_tokens``), which is the patch count only
on LLaVA-1.5: Qwen-VL's merger gives one token per 2 x 2 patches, LLaVA-NeXT adds a newline per row.
"""

from __future__ import annotations

from . import stages, vision_tokens

FLOPS_FORMULA = "4 n d^2 + 2 n^2 d + 3 n d m per LLM layer (multiply-adds; PDrop/FastV convention)"


def stage_weights(prune_layers, num_layers: int, convention: str) -> list[int]:
    """How many layers each vision count N0..Nk stands for, in one of the two conventions."""
    p = stages.check_prune_layers(prune_layers, num_layers)
    if not p:
        return [num_layers]
    if convention == "authors":
        w = [p[0]] + [b - a for a, b in zip(p, p[1:])] + [num_layers - p[-1]]
    elif convention == "compute":
        w = [p[0] + 1] + [b - a for a, b in zip(p, p[1:])] + [num_layers - p[-1] - 1]
    else:
        raise ValueError(f"convention must be 'authors' or 'compute', got {convention!r}")
    return w


def equivalent_tokens(stage_counts, prune_layers, num_layers: int, convention: str) -> float:
    """Layer-averaged vision tokens from the counts N0 (entering) and after each prune layer."""
    w = stage_weights(prune_layers, num_layers, convention)
    if len(stage_counts) != len(w):
        raise ValueError(f"need {len(w)} vision counts (N0 and one per prune layer), got {len(stage_counts)}")
    return sum(wi * ni for wi, ni in zip(w, stage_counts)) / num_layers


def layer_flops(n: int, d: int, m: int) -> float:
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def prefill_flops(tokens_per_layer, d: int, m: int) -> float:
    return float(sum(layer_flops(n, d, m) for n in tokens_per_layer))


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def vanilla_vision_tokens(meta: dict) -> int:
    """Vision tokens the unpruned model feeds the LLM for this trace's image (``sequence.N_vanilla``:
    N patches on LLaVA-1.5, N / 4 on Qwen-VL, plus a newline per row on LLaVA-NeXT). Traces written
    before it was recorded: a baseline's plan counts it (``n0``); otherwise N0 plus what stage 1a merged
    away (w^2 - 1 tokens per merged window, every crop), exact on every family but OneVision (its
    windows merge before the interpolation)."""
    seq = meta["sequence"]
    if seq.get("N_vanilla") is not None:
        return int(seq["N_vanilla"])
    plan = (meta.get("baseline") or {}).get("plan") or {}
    if plan.get("n0") is not None:
        return int(plan["n0"])
    w = int((meta.get("config") or {}).get("window") or 1)
    merged = sum(len(c.get("merged_windows") or []) for c in meta["crops"])
    return int(seq["N0"]) + merged * (w * w - 1)


def summarize(trace) -> dict:
    """Every accounting figure of one trace, each with its convention spelled out."""
    m = trace.meta
    llm = m["model"]["llm"]
    L, d, mm = llm["num_layers"], llm["hidden_size"], llm["intermediate_size"]
    seq = m["sequence"]
    S, T, N, N0 = seq["S"], seq["T"], seq["N"], seq["N0"]
    V = vanilla_vision_tokens(m)          # vanilla's vision tokens: what its FLOPs and KV count
    per_layer = list(m["vision_tokens_per_layer"])
    prune = [s["layer"] for s in m["stage2"]]
    counts = [N0] + [s["kept"] for s in m["stage2"]]
    out = {
        "vision_tokens": {"patches": N, "vanilla": V, "after_merge": N0,
                          "final": per_layer[-1] if per_layer else N0, "per_layer": per_layer},
        "equivalent_tokens": {
            "authors": equivalent_tokens(counts, prune, L, "authors"),
            "compute": vision_tokens.layer_average(per_layer) if per_layer else 0.0,
            "authors_formula": _formula(prune, L, "authors"),
            "compute_formula": _formula(prune, L, "compute"),
        },
        "flops": {
            "formula": FLOPS_FORMULA,
            "image_only": prefill_flops(per_layer, d, mm),
            "image_only_vanilla": prefill_flops([V] * L, d, mm),
            "full_sequence": prefill_flops([S + n + T for n in per_layer], d, mm),
            "full_sequence_vanilla": prefill_flops([S + V + T] * L, d, mm),
            "n_sys": S, "n_text": T, "d": d, "m": mm,
        },
        "kv": {
            "bytes_per_entry": m["kv"]["bytes_per_entry"],
            "bytes_per_layer": [n * m["kv"]["bytes_per_entry"] for n in m["kv"]["entries_per_layer"]],
            "total_bytes": sum(m["kv"]["entries_per_layer"]) * m["kv"]["bytes_per_entry"],
            "vision_bytes": sum(m["kv"]["vision_entries_per_layer"]) * m["kv"]["bytes_per_entry"],
            "vanilla_total_bytes": (S + V + T) * L * m["kv"]["bytes_per_entry"],
            "vanilla_vision_bytes": V * L * m["kv"]["bytes_per_entry"],
        },
    }
    f = out["flops"]
    f["ratio_image_only"] = f["image_only"] / f["image_only_vanilla"]
    f["ratio_full_sequence"] = f["full_sequence"] / f["full_sequence_vanilla"]
    return out


def _formula(prune, L, convention):
    if not prune:
        return f"{L} N0 / {L}"
    w = stage_weights(prune, L, convention)
    return "(" + " + ".join(f"{wi} N{i}" for i, wi in enumerate(w)) + f") / {L}"
