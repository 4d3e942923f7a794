"""What a trace file may claim, checked before anything is allocated from it.

Traces are shared, so a trace is untrusted input: every size it claims is bounded by what a real
model produces (the constants below) and by the arrays actually present in the file, and every field
the readers use (the library, the app, the slides, the CLI) has its type, length and range checked
here, with one :class:`TraceError` naming the field. The claims are checked before the patch maps or
any picture is built from them, so a 4 KB file cannot cost gigabytes.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np


class TraceError(ValueError):
    """A trace file that cannot be used, with a message that names the problem."""


# ---------------------------------------------------------------- bounds from the models we support
# Patch-grid side of one crop: CLIP-L/14 at 336 px gives 24, SigLIP-so400m/14 at 384 px 27; Qwen2-VL's
# dynamic grid at its default max_pixels (12,845,056 px = 65,536 patches of 14 px, 256 x 256 when
# square) reaches 56 x 1120 patches at the 20:1 aspect ratio images.py accepts. What a grid costs is
# its patches, which MAX_PATCHES bounds over all crops; this only bounds one side.
MAX_GRID = 1152
# Crops the vision tower sees: LLaVA-1.5 1, LLaVA-NeXT base + up to 4 any-res tiles (5); headroom for
# LLaVA-OneVision anyres_max_9, which encodes base + up to a 6 x 6 tile grid (37) before it
# interpolates the features down to 9 tiles' worth.
MAX_CROPS = 37
# Patches over all crops (N): NeXT 5 x 576 = 2,880, OneVision 37 x 729 = 26,973, Qwen2-VL 65,536.
MAX_PATCHES = 65_536
# LLM depth: Vicuna-7B 32, -13B 40, Yi-34B 60, Qwen2-72B 80.
MAX_LLM_LAYERS = 128
# Vision tower depth: CLIP-L 24, SigLIP-so400m 27, Qwen2-VL's ViT 32.
MAX_VISION_LAYERS = 64
# Patches x LLM layers (the per-layer KV maps, the largest thing built from a trace): OneVision-72B
# 26,973 x 80 = 2.2 M, Qwen2-VL-72B 65,536 x 80 = 5.2 M. 8 M keeps every map under ~70 MB.
MAX_PATCH_LAYERS = 8 * 1024 * 1024
# Side of a processed crop (pixels the vision tower sees): CLIP 336, SigLIP 384, Qwen2-VL up to
# 15,680 on its long side at 20:1; and all crops' views together (the app keeps one RGB view per
# crop), which is what bounds the memory.
MAX_PROCESSED_SIDE = 16_384
MAX_VIEW_PIXELS = 1 << 24                  # 37 crops of 384 px are 5.5 M
MAX_PATCH_SIZE = 64                        # 14 (CLIP, SigLIP, Qwen2-VL), 16, 32
# Text tokens before / after the image (S, T): Vicuna's context is 4,096, Qwen2's 32,768 (128 K with YaRN).
MAX_TEXT_TOKENS = 131_072
MAX_GENERATED = 4096                       # the adapters generate at most 1,024 tokens
MAX_MODEL_DIM = 1 << 20                    # hidden / intermediate size, heads, head dim (72B: 29,568)
MAX_VOCAB = 1 << 22                        # Qwen2 152 K, Gemma 256 K
MAX_BYTES_PER_ENTRY = 1 << 24              # K + V of one token in one layer (72B fp32: 16 KB)
# The JSON header: a LLaVA-NeXT trace's is ~10 KB; nesting is at most 5 deep.
MAX_META_CHARS = 4 * 1024 * 1024
MAX_META_DEPTH = 16
MAX_TEXT_CHARS = 1_000_000                 # any one string in the header


# ---------------------------------------------------------------- small typed readers
def _got(v) -> str:
    """What a value is, for a message (never the text of a string: it may be anything)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if len(repr(v)) <= 40 else f"a {len(repr(v))}-digit number"
    if isinstance(v, str):
        return f"a string of {len(v)} characters"
    if isinstance(v, list):
        return f"a list of {len(v)}"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def obj(v, name: str) -> dict:
    if not isinstance(v, dict):
        raise TraceError(f"{name} must be an object, got {_got(v)}")
    return v


def field(d: dict, key: str, name: str, optional: bool = False):
    if key not in d:
        if optional:
            return None
        raise TraceError(f"trace metadata lacks the required field {name}")
    return d[key]


def integer(v, name: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TraceError(f"{name} must be an integer, got {_got(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        where = f"{lo}..{hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
        raise TraceError(f"{name} = {v} is out of range ({where})")
    return v


def number(v, name: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TraceError(f"{name} must be a finite number, got {_got(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise TraceError(f"{name} = {v} is out of range")
    return float(v)


def string(v, name: str) -> str:
    if not isinstance(v, str):
        raise TraceError(f"{name} must be a string, got {_got(v)}")
    if len(v) > MAX_TEXT_CHARS:
        raise TraceError(f"{name} is {len(v)} characters long; the limit is {MAX_TEXT_CHARS}")
    return v


def boolean(v, name: str) -> bool:
    if not isinstance(v, bool):
        raise TraceError(f"{name} must be true or false, got {_got(v)}")
    return v


def items(v, name: str, kind, n: int | None = None, max_len: int | None = None, **bounds) -> list:
    """A list whose every item passes ``kind`` (integer, number or string), of length n (or <= max_len)."""
    if not isinstance(v, list):
        raise TraceError(f"{name} must be a list, got {_got(v)}")
    if n is not None and len(v) != n:
        raise TraceError(f"{name} must list {n} entries, got {len(v)}")
    if max_len is not None and len(v) > max_len:
        raise TraceError(f"{name} lists {len(v)} entries; at most {max_len}")
    for i, x in enumerate(v):
        kind(x, f"{name}[{i}]", **bounds)
    return v


def parse_meta(text) -> dict:
    """The header's JSON document, refused (never a RecursionError) when too large or too deep."""
    if not isinstance(text, str):
        raise TraceError("the trace metadata must be a JSON string")
    if len(text) > MAX_META_CHARS:
        raise TraceError(f"the trace metadata is {len(text) / 1e6:.1f} M characters; the limit is "
                         f"{MAX_META_CHARS / 1e6:.1f} M")
    depth = _depth_bound(text)
    if depth > MAX_META_DEPTH:
        raise TraceError(f"the trace metadata is nested {depth} deep; at most {MAX_META_DEPTH} levels")
    try:
        meta = json.loads(text)
    except RecursionError:
        raise TraceError(f"the trace metadata is nested too deeply (at most {MAX_META_DEPTH} levels)") from None
    except ValueError as e:        # JSONDecodeError, and ints beyond Python's digit limit
        raise TraceError(f"the trace metadata is malformed JSON ({str(e)[:120]})") from None
    if not isinstance(meta, dict):
        raise TraceError("trace metadata must be a JSON object")
    return meta


def _depth_bound(text: str) -> int:
    """The deepest nesting of brackets outside strings (a pre-scan, so the parser never recurses deep)."""
    if "[" not in text and "{" not in text:
        return 0
    # Brackets inside strings do not nest: drop the strings first (escaped quotes inside included).
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    opens = np.frombuffer(bare.encode("ascii", "ignore"), np.uint8)
    step = (opens == ord("[")).astype(np.int32) + (opens == ord("{")) - (opens == ord("]")) - (opens == ord("}"))
    return int(np.cumsum(step).max()) if step.size else 0


# ---------------------------------------------------------------- the metadata
def check_meta(m: dict) -> dict:
    """Type and bound every field the readers use; return the sizes the arrays are checked against."""
    model = obj(field(m, "model", "model"), "model")
    for k in ("id", "dtype", "device"):
        string(field(model, k, f"model.{k}"), f"model.{k}")
    for k in ("family", "layout"):
        if model.get(k) is not None:
            string(model[k], f"model.{k}")
    vision = obj(field(model, "vision", "model.vision"), "model.vision")
    G = integer(field(vision, "grid", "model.vision.grid"), "model.vision.grid", 1, MAX_GRID)
    integer(field(vision, "image_size", "model.vision.image_size"), "model.vision.image_size", 1, MAX_PROCESSED_SIDE)
    integer(field(vision, "patch_size", "model.vision.patch_size"), "model.vision.patch_size", 1, MAX_PATCH_SIZE)
    integer(field(vision, "num_layers", "model.vision.num_layers"), "model.vision.num_layers", 0, MAX_VISION_LAYERS)
    boolean(field(vision, "has_cls", "model.vision.has_cls"), "model.vision.has_cls")
    llm = obj(field(model, "llm", "model.llm"), "model.llm")
    L = integer(field(llm, "num_layers", "model.llm.num_layers"), "model.llm.num_layers", 1, MAX_LLM_LAYERS)
    for k in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim"):
        integer(field(llm, k, f"model.llm.{k}"), f"model.llm.{k}", 1, MAX_MODEL_DIM)
    integer(field(llm, "vocab_size", "model.llm.vocab_size"), "model.llm.vocab_size", 1, MAX_VOCAB)

    _check_config(obj(field(m, "config", "config"), "config"))

    inp = obj(field(m, "input", "input"), "input")
    string(field(inp, "question", "input.question"), "input.question")
    for k in ("prompt", "input_hash"):
        if inp.get(k) is not None:
            string(inp[k], f"input.{k}")
    image = obj(field(inp, "image", "input.image"), "input.image")
    from .images import MAX_PIXELS      # the largest image a run accepts
    w = integer(field(image, "width", "input.image.width"), "input.image.width", 1, MAX_PIXELS)
    h = integer(field(image, "height", "input.image.height"), "input.image.height", 1, MAX_PIXELS)
    if w * h > MAX_PIXELS:
        raise TraceError(f"input.image claims {w} x {h} pixels; runs accept at most {MAX_PIXELS:,}")
    string(field(image, "sha256", "input.image.sha256"), "input.image.sha256")
    processed = [_mapping(field(inp, "mapping", "input.mapping"), "input.mapping")]

    crops = field(m, "crops", "crops")
    if not isinstance(crops, list) or not crops:
        raise TraceError(f"crops must be a non-empty list, got {_got(crops)}")
    if len(crops) > MAX_CROPS:
        raise TraceError(f"crops lists {len(crops)} crops; supported models encode at most {MAX_CROPS}")
    grids = [_grid(obj(crop, f"crops[{c}]"), f"crops[{c}].grid") for c, crop in enumerate(crops)]
    seq = obj(field(m, "sequence", "sequence"), "sequence")
    N = integer(field(seq, "N", "sequence.N"), "sequence.N", 1, MAX_PATCHES)
    total = sum(r * c for r, c in grids)
    if total > MAX_PATCHES:
        raise TraceError(f"the crops' grids hold {total:,} patches; supported models encode at most {MAX_PATCHES:,}")
    if N != total:
        raise TraceError(f"sequence.N = {N} does not match the {total} patches of the crops' grids")
    if N * L > MAX_PATCH_LAYERS:
        raise TraceError(f"{N} patches x {L} LLM layers exceed what supported models produce ({MAX_PATCH_LAYERS:,})")
    # LLaVA-NeXT's stock packing adds an image_newline token after each row of a crop's grid, so the
    # vision block may hold up to one more token per grid row than there are patches.
    block_max = N + sum(r for r, _ in grids)
    N0 = integer(field(seq, "N0", "sequence.N0"), "sequence.N0", 0, block_max)
    if seq.get("N_vanilla") is not None:
        integer(seq["N_vanilla"], "sequence.N_vanilla", 1, block_max)
    S = integer(field(seq, "S", "sequence.S"), "sequence.S", 0, MAX_TEXT_TOKENS)
    T = integer(field(seq, "T", "sequence.T"), "sequence.T", 0, MAX_TEXT_TOKENS)
    for c, crop in enumerate(crops):
        if crop.get("name") is not None:
            string(crop["name"], f"crops[{c}].name")
        if crop.get("mapping") is not None:
            processed.append(_mapping(crop["mapping"], f"crops[{c}].mapping"))
        n = grids[c][0] * grids[c][1]
        items(crop.get("merged_windows", []), f"crops[{c}].merged_windows", integer, max_len=n, lo=0, hi=n - 1)
        if crop.get("tile") is not None:
            items(crop["tile"], f"crops[{c}].tile", integer, n=2, lo=0, hi=MAX_CROPS)
        if crop.get("window_patches") is not None:      # a window's side in patches (2w under a 2 x 2 merger)
            integer(crop["window_patches"], f"crops[{c}].window_patches", 1, MAX_GRID)
        if crop.get("token_patches") is not None:       # patches one unmerged token covers (4 under the merger)
            integer(crop["token_patches"], f"crops[{c}].token_patches", 1, 64)
    if sum(processed) > MAX_VIEW_PIXELS:
        raise TraceError(f"the crops' processed views total more than {MAX_VIEW_PIXELS:,} pixels")

    s1a = obj(field(m, "stage1a", "stage1a"), "stage1a")
    boolean(field(s1a, "enabled", "stage1a.enabled"), "stage1a.enabled")
    window = integer(field(s1a, "window", "stage1a.window"), "stage1a.window", 1,
                     max(G, *(max(g) for g in grids)))
    if s1a.get("threshold") is not None:
        number(s1a["threshold"], "stage1a.threshold")
    n = grids[0][0] * grids[0][1]
    items(field(s1a, "merged_windows", "stage1a.merged_windows"), "stage1a.merged_windows", integer,
          max_len=n, lo=0, hi=n - 1)
    s1b = obj(field(m, "stage1b", "stage1b"), "stage1b")
    boolean(field(s1b, "enabled", "stage1b.enabled"), "stage1b.enabled")
    if s1b.get("keep_rate") is not None:
        number(s1b["keep_rate"], "stage1b.keep_rate")
    if s1b.get("score") is not None:
        string(s1b["score"], "stage1b.score")
    key_tokens = field(s1b, "key_tokens", "stage1b.key_tokens")
    if not isinstance(key_tokens, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in key_tokens):
        raise TraceError(f"stage1b.key_tokens must be a list of integers, got {_got(key_tokens)}")
    if any(x < 0 or x >= N0 for x in key_tokens):
        raise TraceError(f"stage1b.key_tokens holds indices outside 0..{N0 - 1}")

    stage2 = _check_stage2(m, L, N0)
    entries = _check_counts(m, L, S, N0, T)
    _check_generation(m)
    if m.get("baseline") is not None:
        _check_baseline(obj(m["baseline"], "baseline"), block_max)   # its plan counts the block before its drop
    if m.get("tokenizer") is not None:
        tok = obj(m["tokenizer"], "tokenizer")
        if tok.get("special_tokens") is not None:
            items(tok["special_tokens"], "tokenizer.special_tokens", string, max_len=MAX_VOCAB)
    return {"G": G, "L": L, "N": N, "N0": N0, "S": S, "T": T, "window": window, "crops": len(crops),
            "grids": grids, "stage2": stage2, "entries": entries,
            "window_patches": [crop.get("window_patches") for crop in crops]}


def _check_stage2(m: dict, L: int, N0: int) -> list:
    """stage2: one record per prune layer, ascending."""
    stage2 = field(m, "stage2", "stage2")
    if not isinstance(stage2, list):
        raise TraceError(f"stage2 must be a list of prune-layer records, got {_got(stage2)}")
    prev = -1
    for i, s in enumerate(stage2):
        obj(s, f"stage2[{i}]")
        layer = integer(field(s, "layer", f"stage2[{i}].layer"), f"stage2[{i}].layer", 0, L - 1)
        if layer <= prev:
            raise TraceError("stage2 layers must be ascending")
        prev = layer
        for k in ("entering", "kept", "dropped"):
            integer(field(s, k, f"stage2[{i}].{k}"), f"stage2[{i}].{k}", 0, N0)
    return stage2


def _check_counts(m: dict, L: int, S: int, N0: int, T: int) -> list:
    """vision_tokens_per_layer and kv: per-layer counts; the KV entries per layer."""
    items(field(m, "vision_tokens_per_layer", "vision_tokens_per_layer"), "vision_tokens_per_layer", integer,
          n=L, lo=0, hi=N0)
    kv = obj(field(m, "kv", "kv"), "kv")
    entries = items(field(kv, "entries_per_layer", "kv.entries_per_layer"), "kv.entries_per_layer", integer,
                    n=L, lo=0, hi=S + N0 + T)
    items(field(kv, "vision_entries_per_layer", "kv.vision_entries_per_layer"), "kv.vision_entries_per_layer",
          integer, n=L, lo=0, hi=N0)
    integer(field(kv, "bytes_per_entry", "kv.bytes_per_entry"), "kv.bytes_per_entry", 1, MAX_BYTES_PER_ENTRY)
    return entries


def _check_generation(m: dict) -> None:
    """generation and timings."""
    gen = obj(field(m, "generation", "generation"), "generation")
    ids = items(field(gen, "token_ids", "generation.token_ids"), "generation.token_ids", integer,
                max_len=MAX_GENERATED, lo=0, hi=MAX_VOCAB)
    items(field(gen, "tokens", "generation.tokens"), "generation.tokens", string, n=len(ids))
    items(field(gen, "probs", "generation.probs"), "generation.probs", number, n=len(ids), lo=0.0, hi=1.001)
    string(field(gen, "answer", "generation.answer"), "generation.answer")
    for k in ("mode", "stop"):
        if gen.get(k) is not None:
            string(gen[k], f"generation.{k}")
    for k in ("temperature", "top_p"):
        if gen.get(k) is not None:
            number(gen[k], f"generation.{k}")
    for k in ("seed", "max_new_tokens"):
        if gen.get(k) is not None:
            integer(gen[k], f"generation.{k}")
    timings = obj(field(m, "timings", "timings"), "timings")
    for k in ("vision_s", "prefill_s", "decode_s", "total_s"):
        number(field(timings, k, f"timings.{k}"), f"timings.{k}", lo=0.0)


def _grid(crop: dict, name: str) -> tuple[int, int]:
    """A crop's patch grid [rows, cols] (version 2: not assumed square)."""
    g = field(crop, "grid", name)
    items(g, name, integer, n=2, lo=1, hi=MAX_GRID)
    return g[0], g[1]


def _mapping(v, name: str) -> int:
    """A crop's mapping record (processed = original * scale + offset); returns the pixels of its
    processed view (``processed``: one side of a square, or [width, height])."""
    m = obj(v, name)
    if m.get("kind") is not None:
        string(m["kind"], f"{name}.kind")
    number(field(m, "scale", f"{name}.scale"), f"{name}.scale")
    if m.get("scale_xy") is not None:
        items(m["scale_xy"], f"{name}.scale_xy", number, n=2)
    items(field(m, "offset", f"{name}.offset"), f"{name}.offset", number, n=2)
    for k in ("resized", "canvas"):
        if m.get(k) is not None:
            items(m[k], f"{name}.{k}", integer, n=2, lo=0, hi=1 << 24)
    p = m.get("processed", 1)
    if isinstance(p, list):
        w, h = items(p, f"{name}.processed", integer, n=2, lo=1, hi=MAX_PROCESSED_SIDE)
        return w * h
    return integer(p, f"{name}.processed", 1, MAX_PROCESSED_SIDE) ** 2


def _check_config(c: dict) -> None:
    """The run's knobs: the ones the summaries print are required (every trace has written them)."""
    from .config import MustDropConfig

    for k in ("merge", "key_set", "filter", "kv_trim"):
        boolean(field(c, k, f"config.{k}"), f"config.{k}")
    for k in ("preset", "positions"):
        string(field(c, k, f"config.{k}"), f"config.{k}")
    if c.get("method") is not None:
        string(c["method"], "config.method")
    for k in ("global_thr", "individual_thr", "merge_threshold", "key_keep_rate"):
        number(field(c, k, f"config.{k}"), f"config.{k}")
    if c.get("budget") is not None:
        number(c["budget"], "config.budget")
    items(field(c, "prune_layers", "config.prune_layers"), "config.prune_layers", integer,
          max_len=MAX_LLM_LAYERS, lo=0, hi=MAX_LLM_LAYERS)
    if "keep_counts" in c:
        items(c["keep_counts"], "config.keep_counts", integer, max_len=MAX_LLM_LAYERS, lo=0, hi=MAX_PATCHES)
    integer(field(c, "window", "config.window"), "config.window", 1, MAX_GRID)
    if c.get("pre_keep") is not None:
        integer(c["pre_keep"], "config.pre_keep", 0, MAX_PATCHES)
    if "seed" in c:
        integer(c["seed"], "config.seed")
    from . import methods

    if isinstance(c.get("method"), str) and c["method"] not in methods.names():
        # a plug-in not loaded here (its trace replays without it): its own checks cannot run, the knobs' do
        c = dict(c, method=methods.DEFAULT)
    try:
        MustDropConfig.from_dict(c)
    except (TypeError, ValueError) as e:
        raise TraceError(f"the trace's config cannot be read: {str(e)[:200]}") from None


def _check_baseline(b: dict, block_max: int) -> None:
    """A baseline's record; its plan counts tokens of the vision block (newline tokens included)."""
    if b.get("score") is not None:
        string(b["score"], "baseline.score")
    if b.get("params") is not None:
        obj(b["params"], "baseline.params")
    if b.get("plan") is None:
        return
    plan = obj(b["plan"], "baseline.plan")
    for k in ("method", "rule"):
        if plan.get(k) is not None:
            string(plan[k], f"baseline.plan.{k}")
    for k in ("budget", "ratio"):
        if plan.get(k) is not None:
            number(plan[k], f"baseline.plan.{k}")
    for k in ("n0", "pre_keep"):
        if plan.get(k) is not None:
            integer(plan[k], f"baseline.plan.{k}", 0, block_max)
    for k in ("layers", "keep"):
        if plan.get(k) is not None:
            items(plan[k], f"baseline.plan.{k}", integer, max_len=MAX_LLM_LAYERS, lo=0, hi=block_max)


# ---------------------------------------------------------------- the arrays
def array(arrays: dict, name: str, dtype, shape: tuple, what: str = "") -> np.ndarray:
    """The array ``name`` of exactly ``dtype`` and ``shape`` (None: any length on that axis)."""
    if name not in arrays:
        raise TraceError(f"trace lacks the array {name!r}")
    a = arrays[name]
    dt = np.dtype(dtype)
    ok = isinstance(a, np.ndarray) and a.dtype == dt and a.ndim == len(shape) and all(
        s is None or s == n for s, n in zip(shape, a.shape))
    if not ok:
        want = " x ".join("any" if s is None else str(s) for s in shape)
        kind = "a float" if dt.kind == "f" else "an integer"
        got = (f"{a.dtype} of {a.shape[0]}" if a.ndim == 1 else f"{a.dtype} of shape {a.shape}") \
            if isinstance(a, np.ndarray) else type(a).__name__
        size = f"{want} entries" if len(shape) == 1 else f"shape {want}"
        raise TraceError(f"{name} must be {kind} ({dt.name}) array of {size}{what}, got {got}")
    return a


def check_arrays(a: dict, c: dict) -> None:
    """Dtypes, shapes and value ranges of the token-level arrays, against the checked claims ``c``."""
    G, L, N, N0, S, T, w = c["G"], c["L"], c["N"], c["N0"], c["S"], c["T"], c["window"]
    groups = array(a, "tokens.groups", np.int64, (N0, None), " (N0 rows)")
    if groups.size and (groups.max() >= N or groups.min() < -1):
        raise TraceError(f"tokens.groups holds patch ids outside the grid 0..{N - 1}")
    weights = array(a, "tokens.weights", np.float32, groups.shape, " (the shape of tokens.groups)")
    if not np.isfinite(weights).all() or (weights < 0).any() or (weights > 1).any():
        raise TraceError("tokens.weights must be finite shares in [0, 1]")
    if (weights[groups < 0] != 0).any():
        raise TraceError("tokens.weights gives weight to a padding entry of tokens.groups")
    for flag in ("tokens.newline", "tokens.merged"):
        if flag in a:
            nl = array(a, flag, np.uint8, (N0,), " (N0)")
            if nl.size and nl.max() > 1:
                raise TraceError(f"{flag} must hold 0 or 1")
    for cr, (rows, cols) in enumerate(c["grids"]):
        name = "stage1a.similarity" if cr == 0 else f"stage1a.c{cr}.similarity"
        if name in a:
            grid = f"grid {rows}" if rows == cols else f"grid {rows} x {cols}"
            wp = c.get("window_patches", [None] * (cr + 1))[cr]
            shape = (rows // wp, cols // wp) if wp else (-(-rows // w), -(-cols // w))   # wp: whole windows only
            array(a, name, np.float32, shape, f" ({grid} / window {wp or w})")
    if "stage1b.key_score" in a:
        array(a, "stage1b.key_score", np.float32, (N0,), " (N0)")
    if "baseline.vision_score" in a:
        array(a, "baseline.vision_score", np.float32, (N,), " (N)")
    from .statuses import STATUS_NAMES

    codes = np.array(sorted(STATUS_NAMES), np.int8)
    for i, s in enumerate(c["stage2"]):
        p = f"stage2.L{s['layer']}"
        V = s["entering"]
        toks = array(a, f"{p}.tokens", np.int64, (V,), f" (stage2[{i}].entering)")
        if V and (toks.min() < 0 or toks.max() >= N0):
            raise TraceError(f"{p}.tokens holds token ids outside 0..{N0 - 1}")
        n = a.get(f"{p}.status").shape[0] if isinstance(a.get(f"{p}.status"), np.ndarray) else V
        n = 0 if n == 0 else V            # no stage-2 result at this layer: all three empty
        for name, dt in (("status", np.int8), ("global_share", np.float32), ("individual_max", np.float32)):
            array(a, f"{p}.{name}", dt, (n,), "" if n else " (empty, as the status array is)")
        if n and not np.isin(a[f"{p}.status"], codes).all():
            raise TraceError(f"{p}.status holds codes other than {', '.join(str(x) for x in codes)}")
    for layer in range(L):
        kv = array(a, f"kv.L{layer}", np.int64, (c["entries"][layer],), f" (kv.entries_per_layer[{layer}])")
        if kv.size and (kv.min() < 0 or kv.max() >= S + N0 + T):
            raise TraceError(f"kv.L{layer} holds indices outside the prefill sequence 0..{S + N0 + T - 1}")
