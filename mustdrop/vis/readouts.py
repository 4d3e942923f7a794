"""Text readouts of a trace: a patch's lifecycle, one layer in numbers, the summary of the run's
cost, and the token-level comparison of the two answers (Markdown and plain data)."""

from __future__ import annotations

import math

import numpy as np

from .. import accounting
from .geometry import original_box
from .overlays import GroundTruth
from ..methods import words_of
from .palette import NO_TOKEN_LABEL, STATUS_LABELS
from .text import md_code, md_text, md_value


# Special tokens of the tokenizers LLaVA checkpoints use (Llama / Vicuna / Mistral SentencePiece,
# Qwen2 byte-level BPE, Llama 3, Gemma, Phi), for traces that do not record their tokenizer's own.
KNOWN_SPECIAL = ("</s>", "<s>", "<unk>", "<pad>", "<image>", "<|im_end|>", "<|im_start|>", "<|endoftext|>",
                 "<|eot_id|>", "<|end_of_text|>", "<|begin_of_text|>", "<|end|>", "<end_of_turn>", "<eos>", "<bos>")


def special_tokens(trace=None) -> tuple[str, ...]:
    """The tokenizer's special tokens the trace records (``meta.tokenizer.special_tokens``), else KNOWN_SPECIAL."""
    rec = ((trace.meta.get("tokenizer") or {}).get("special_tokens") if trace is not None else None) or ()
    return tuple(sorted({str(t) for t in rec if str(t)} | set(KNOWN_SPECIAL), key=len, reverse=True))


def strip_special(text, trace=None) -> str:
    """``text`` without special tokens (``</s>`` and the like) and the spaces they leave."""
    out = str(text or "")
    for t in special_tokens(trace):
        out = out.replace(t, " ")
    return " ".join(out.split())


def format_bytes(n) -> str:
    """Bytes in decimal megabytes (1 MB = 10^6 B), the convention of the CLI, the README and DART
    (LLaVA-1.5-7B fp16: 524,288 B of KV per token = "0.524 MB")."""
    return f"{n / 1e6:.3f} MB"


def _fmt(v):
    return "–" if v is None else f"{v:.3g}"


def _ranges(xs):
    out, start, prev = [], None, None
    for x in xs:
        if start is None:
            start = prev = x
        elif x == prev + 1:
            prev = x
        else:
            out.append(f"{start}" if start == prev else f"{start}–{prev}")
            start = prev = x
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}–{prev}")
    return ", ".join(out)


# ----------------------------------------------------------------------------- one patch
def patch_lifecycle(trace, row: int, col: int, crop: int = 0) -> dict:
    """Everything the trace knows about one original patch, stage by stage (plain data)."""
    if not (isinstance(row, (int, np.integer)) and isinstance(col, (int, np.integer))):
        raise ValueError(f"row and column must be integers, got {row!r}, {col!r}")
    if not 0 <= crop < trace.n_crops:
        raise ValueError(f"crop {crop} is outside the trace's {trace.n_crops} crop(s)")
    R, C = trace.crop_grid(crop)
    if not (0 <= row < R and 0 <= col < C):
        raise ValueError(f"patch ({row}, {col}) is outside the {R} x {C} grid (rows 0..{R - 1}, columns 0..{C - 1})")

    def at(name):
        return trace.patch(name, crop)[row, col]

    tok = int(at("token"))
    groups = trace.arrays["tokens.groups"]
    members = [int(x) for x in groups[tok] if x >= 0] if 0 <= tok < len(groups) else []
    out = {"patch": int(trace.crop_offset(crop) + row * C + col), "row": int(row), "col": int(col), "crop": int(crop),
           "crop_name": trace.crop_name(crop), "token": tok,
           "merged": bool(at("merged")), "group": members, "key": bool(at("key")),
           "dropped_after_layer": int(at("dropped_after_layer"))}
    if trace.has_patch("similarity", crop):
        out["window_similarity"] = float(at("similarity"))
    if trace.has_patch("key_score", crop):
        v = float(at("key_score"))
        out["key_score"] = None if math.isnan(v) else v
    cfg = trace.meta["config"]
    words = words_of(trace)
    stages2 = []
    for layer in trace.prune_layers:
        s = int(trace.stage2_patch(layer, "status", crop)[row, col])
        g = float(trace.stage2_patch(layer, "global_share", crop)[row, col])
        i = float(trace.stage2_patch(layer, "individual_max", crop)[row, col])
        stages2.append({"layer": layer, "status": s, "status_name": words.status(s) if s in words.statuses else STATUS_LABELS.get(s, str(s)),
                        "global_share": None if math.isnan(g) else g,
                        "individual_max": None if math.isnan(i) else i,
                        "global_thr": cfg["global_thr"], "individual_thr": cfg["individual_thr"]})
    out["stage2"] = stages2
    cached = trace.patch("kv_cached", crop)[:, row, col].astype(bool)
    out["kv_cached_layers"] = [int(x) for x in np.nonzero(cached)[0]]
    return out


def lifecycle_markdown(trace, row: int, col: int, crop: int = 0) -> str:
    """The lifecycle of one patch as Markdown for the patch inspector."""
    d = patch_lifecycle(trace, row, col, crop)
    m = trace.meta
    L = trace.num_layers
    where = f" of {md_text(d['crop_name'])}" if trace.n_crops > 1 else ""
    lines = [f"### Patch ({d['row']}, {d['col']}){where} — patch id {d['patch']}",
             "LLM layers are counted from 0."]
    box = original_box(trace, row, col, crop)
    if box is not None:
        x0, y0, x1, y1 = box
        lines.append(f"Covers original-image pixels x {x0:.0f}–{x1:.0f}, y {y0:.0f}–{y1:.0f} "
                     f"({md_value(m['input']['image']['width'])} x {md_value(m['input']['image']['height'])} image).")
    if d["token"] < 0:
        lines.append(f"- **No token:** {NO_TOKEN_LABEL}; the language model never sees this patch.")
        return "\n".join(lines)
    s1a = m["stage1a"]
    if not s1a["enabled"]:
        lines.append("- **Stage 1a (local spatial merge):** off")
    elif d["merged"]:
        lines.append(f"- **Stage 1a:** merged with {len(d['group']) - 1} neighbours into vision token "
                     f"{d['token']} (window similarity {_fmt(d.get('window_similarity'))} "
                     f">= threshold {md_value(s1a['threshold'])}); group patches {d['group']}")
    else:
        sim = d.get("window_similarity")
        lines.append(f"- **Stage 1a:** not merged (window similarity {_fmt(sim)} < threshold "
                     f"{md_value(s1a['threshold'])}); its own vision token {d['token']}")
    if not m["stage1b"]["enabled"]:
        lines.append("- **Stage 1b (key token set):** off")
    else:
        score = m["stage1b"].get("score", "CLS attention")
        lines.append(f"- **Stage 1b:** key score {_fmt(d.get('key_score'))} ({md_text(score)}); "
                     + ("**key token** — protected from every later drop" if d["key"] else "not a key token"))
    words = words_of(trace)
    if not d["stage2"]:
        lines.append("- **Stage 2 (dual-attention filter):** off / no prune layers" if words.thresholds else
                     f"- **Drops in the LLM ({md_text(words.label)}):** none")
    elif words.thresholds:
        lines.append("- **Stage 2:**\n\n| prune layer | global share (thr) | individual max (thr) | decision |\n|---|---|---|---|")
        for s in d["stage2"]:
            lines.append(f"| {s['layer']} | {_fmt(s['global_share'])} ({s['global_thr']:g}) | "
                         f"{_fmt(s['individual_max'])} ({s['individual_thr']:g}) | {md_text(s['status_name'])} |")
        lines.append("")
    else:         # another method: its own score names and decisions (read from the trace)
        cols = [k for k in ("global_share", "individual_max") if k in words.scores]
        cols = [c for i, c in enumerate(cols) if words.scores[c] not in [words.scores[x] for x in cols[:i]]]
        head = "".join(f" {md_text(words.scores[c])} |" for c in cols)
        lines.append(f"- **Drops in the LLM ({md_text(words.label)}):**\n\n| drop layer |{head} decision |\n"
                     f"|---|{'---|' * len(cols)}---|")
        for s in d["stage2"]:
            vals = "".join(f" {_fmt(s[c])} |" for c in cols)
            lines.append(f"| {s['layer']} |{vals} {md_text(s['status_name'])} |")
        lines.append("")
    if d["dropped_after_layer"] >= 0:
        lines.append(f"- **Dropped** after LLM layer {d['dropped_after_layer']}: "
                     + md_text(words.dropped_sentence(d["dropped_after_layer"])))
    else:
        lines.append("- **Never dropped:** the token reaches the last LLM layer.")
    cached = d["kv_cached_layers"]
    lines.append(f"- **Stage 3 (KV cache after prefill):** cached in {len(cached)} of {L} layers"
                 + (f": {_ranges(cached)}" if cached else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- one layer
def object_coverage(trace, gt, layer: int, crop: int = 0) -> dict | None:
    """How many patches of the asked-about objects (a GroundTruth with targets, patch-level masks) the
    given LLM layer still processes in prefill and still holds in its KV cache."""
    if not isinstance(gt, GroundTruth) or not gt.targets:
        return None
    masks = np.asarray(gt.masks)
    if masks.ndim != 3 or masks.shape[1:] != trace.crop_grid(crop):
        return None
    ids = [int(i) for i in gt.targets if 0 <= int(i) < len(masks)]
    if not ids:
        return None
    obj = (masks[ids] > 0.25).any(0)
    return {"patches": int(obj.sum()), "processed": int((trace.processed_at(layer, crop) & obj).sum()),
            "cached": int((trace.kv_cached_at(layer, crop) & obj).sum())}


def layer_markdown(trace, layer: int, gt=None, crop: int = 0) -> str:
    """LLM layer ``layer`` in numbers: vision tokens processed, KV entries kept, its prune decision,
    the asked-about object's patches still there, and which prune layer the stage-2 panels show."""
    m = trace.meta
    bpe = m["kv"]["bytes_per_entry"]
    entries = m["kv"]["entries_per_layer"][layer]
    vis_entries = m["kv"]["vision_entries_per_layer"][layer]
    lines = [f"**LLM layer {layer}** of {trace.num_layers} (0-based: layers 0–{trace.num_layers - 1}): processes {md_value(m['vision_tokens_per_layer'][layer])} vision "
             f"tokens in prefill; after the stage-3 trim its KV cache holds {md_value(entries)} entries ({md_value(vis_entries)} vision) "
             f"= {format_bytes(entries * bpe)}."]
    s2 = trace.stage2(layer)
    if s2:
        lines.append(f"Prune layer: {md_value(s2['entering'])} vision tokens entered, {md_value(s2['kept'])} kept, "
                     f"{md_value(s2['dropped'])} dropped after this layer.")
    cov = object_coverage(trace, gt, layer, crop) if gt is not None else None
    if cov and cov["patches"]:
        lines.append(f"The object the question asks about covers {cov['patches']} patches: layer {layer} still "
                     f"processes {cov['processed']} of them in prefill and holds {cov['cached']} in its KV cache.")
    pl = trace.stage2_layer_for(layer)
    if pl is not None:
        lines.append(f"Stage-2 panels show prune layer **{pl}**" +
                     (" (the last prune layer at or before this layer)." if pl <= layer else
                      " (the first prune layer; nothing has been dropped yet at this layer)."))
    return "\n\n".join(lines)


# ----------------------------------------------------------------------------- the run
def summary_markdown(trace, vanilla=None) -> str:
    """Equivalent tokens (both conventions), FLOPs ratio with its formula, KV bytes, timings."""
    s = accounting.summarize(trace)
    e, f, kv, vt = s["equivalent_tokens"], s["flops"], s["kv"], s["vision_tokens"]
    t = trace.meta["timings"]
    cfg = trace.meta["config"]
    b = format_bytes
    lines = [
        f"**Model** {md_code(trace.meta['model']['id'])} · method **{md_text(words_of(trace).label)}** · "
        f"preset **{md_value(cfg.get('preset'))}** · "
        f"positions {md_code(cfg['positions'])} · "
        f"stages: 1a {'on' if cfg['merge'] else 'off'}, 1b {'on' if cfg['key_set'] else 'off'}, "
        f"2 {'on' if cfg['filter'] else 'off'}, 3 {'on' if cfg['kv_trim'] else 'off'}",
        "",
        "| quantity | value | how it is counted |",
        "|---|---|---|",
        f"| vision tokens | {vt['vanilla']} unpruned ({vt['patches']} patches) → {vt['after_merge']} after merge → {vt['final']} at the last layer | per image; unpruned = what the model feeds its LLM, which the vanilla figures count |",
        f"| equivalent tokens, authors' convention | {e['authors']:.1f} | {e['authors_formula']} (printed by the authors' code; one layer off the compute) |",
        f"| equivalent tokens, compute convention | {e['compute']:.1f} | {e['compute_formula']} = mean over layers of the vision tokens processed |",
        f"| prefill FLOPs, image tokens only | {f['image_only']:.3g} ({100 * f['ratio_image_only']:.1f}% of vanilla {f['image_only_vanilla']:.3g}) | {accounting.FLOPS_FORMULA}, n = image tokens |",
        f"| prefill FLOPs, full sequence | {f['full_sequence']:.3g} ({100 * f['ratio_full_sequence']:.1f}% of vanilla) | same formula, n = {f['n_sys']} system + vision + {f['n_text']} text tokens |",
        f"| KV cache after prefill | {b(kv['total_bytes'])} (vanilla {b(kv['vanilla_total_bytes'])}); vision only {b(kv['vision_bytes'])} (vanilla {b(kv['vanilla_vision_bytes'])}) | K and V, all layers, {kv['bytes_per_entry']} bytes per entry per layer |",
        f"| time ({md_text(words_of(trace).label)} run) | vision {t['vision_s']:.2f} s · prefill {t['prefill_s']:.2f} s · decode {t['decode_s']:.2f} s · total {t['total_s']:.2f} s | wall clock on {md_text(trace.meta['model']['device'])} |",
    ]
    if vanilla is not None:
        tv = vanilla.meta["timings"]
        lines.append(f"| time (vanilla run) | vision {tv['vision_s']:.2f} s · prefill {tv['prefill_s']:.2f} s · decode {tv['decode_s']:.2f} s · total {tv['total_s']:.2f} s | same machine |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- answers
def display_pieces(gen: dict) -> list[str]:
    """Token pieces with the spaces the answer text has between them (SentencePiece pieces decoded one
    by one lose their leading space): each piece is found in the answer and given the gap before it."""
    answer = str(gen.get("answer", ""))
    out, pos = [], 0
    for p in gen.get("tokens", []):
        p = str(p)
        core = p.strip()
        j = answer.find(core, pos) if core else -1
        if j >= 0 and answer[pos:j].strip() == "":
            out.append(answer[pos:j] + core if not p.startswith(" ") else p)
            pos = j + len(core)
        else:
            out.append(p)
    return out


def answer_diff(vanilla, trace) -> dict:
    """Token-level comparison of the two answers: highlighted pieces, first divergence, probabilities."""
    va = vanilla.meta["generation"] if vanilla is not None else {"token_ids": [], "tokens": [], "probs": []}
    md = trace.meta["generation"]
    first = None
    n = max(len(va["token_ids"]), len(md["token_ids"]))
    for i in range(n):
        a = va["token_ids"][i] if i < len(va["token_ids"]) else None
        b = md["token_ids"][i] if i < len(md["token_ids"]) else None
        if a != b:
            first = i
            break

    special = set(special_tokens(trace))

    def pieces(gen):
        """(piece, label) of the answer box: special tokens (``</s>``) left out, the table keeps them."""
        out = []
        for i, p in enumerate(display_pieces(gen)):
            if p.strip() in special:
                continue
            label = None if first is None or i < first else "differs"
            out.append((p, label))
        return out

    rows = ["| step | vanilla token | p | MustDrop token | p |", "|---|---|---|---|---|"]
    for i in range(n):
        def cell(g):
            if i >= len(g["tokens"]):
                return "–", "–"
            return md_code(repr(g['tokens'][i]), spaces=True), f"{g['probs'][i]:.3f}"
        a, pa = cell(va)
        b, pb = cell(md)
        mark = " ⟵ first divergence" if i == first else ""
        rows.append(f"| {i}{mark} | {a} | {pa} | {b} | {pb} |")
    if vanilla is None:
        text = "No vanilla run in this replay."
    elif first is None:
        text = "The two answers are **identical** token for token."
    else:
        text = f"First divergence at generated token **{first}**."
    return {"vanilla": pieces(va), "mustdrop": pieces(md), "first_divergence": first,
            "text": text, "table": "\n".join(rows)}
