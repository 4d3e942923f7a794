"""The Trace: every MustDrop decision of one run, as plain data that outlives the run.

A trace file is ONE safetensors file: its arrays are the tensors, and its header metadata holds
the JSON document under the key "mustdrop_trace". Read it without our code:

    from safetensors.numpy import load_file; from safetensors import safe_open; import json
    meta = json.loads(safe_open(path, "np").metadata()["mustdrop_trace"]); arrays = load_file(path)

JSON document (``meta``), schema "mustdrop-trace/2" (files of "mustdrop-trace/1" are read too,
converted on load: see GEOMETRY below):
  model       id, dtype, device, vision {image_size, patch_size, grid, num_layers, has_cls},
              llm {num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim, vocab_size}
  config      the MustDropConfig of the run (see mustdrop.config)
  input       question, prompt, image {width, height, sha256}, input_hash,
              mapping {kind, scale, resized [w, h], offset [x, y], processed}: processed pixel
              (u, v) = original pixel (x, y) * scale + offset (resize then centre crop, or pad)
  sequence    S (tokens before the image), T (tokens after it), N (patches of every crop, the sum
              of rows * cols), N0 (vision tokens entering the LLM after stage 1a)
  stage1a     enabled, window, threshold, merged_windows (most similar first)
  stage1b     enabled, keep_rate, score (which score ranks the key set), key_tokens (ids in the
              merged numbering 0..N0-1)
  crops       per crop: name, grid [rows, cols] (its patch grid, not assumed square), mapping (as
              input.mapping, for that crop; processed is one side, or [width, height]), merged_windows;
              optional window_patches (a stage 1a window's side in patches when it is not stage1a.window,
              e.g. 2w under Qwen-VL's 2 x 2 merger; patches of no whole window get similarity NaN);
              optional token_patches (patches one unmerged token covers, 4 under a 2 x 2 merger; default
              1): patch.merged marks the tokens that cover more patches than that
  stage2      one entry per prune layer: layer, entering, kept, dropped
  vision_tokens_per_layer   vision tokens each LLM layer processed in prefill
  kv          entries_per_layer and vision_entries_per_layer after the trim, bytes_per_entry (K+V)
  generation  mode, temperature, top_p, seed, max_new_tokens, token_ids, tokens, probs, answer, stop
  timings     vision_s, prefill_s, decode_s, total_s
  method      the method's name (mustdrop.methods); method_info (optional; older traces: the
              registered method's) how its decisions are explained: name, label, statuses {code:
              name}, scores {global_share / individual_max: what that array holds for this method},
              dropped (the inspector's sentence), legend, thresholds (scores compared with the
              config's thresholds: MustDrop's filter). Stored so that a plug-in's trace replays
              where the plug-in is not installed (mustdrop.methods.words_of reads it)
  baseline    (same-budget baselines only, optional) plan {method, budget, n0, pre_keep (tokens
              kept before the LLM), layers, keep (kept after each), ratio, rule}, params (method
              parameters, e.g. VisionZip's dominant / contextual counts), score (what ranked them)

Arrays. "Token ids" are the merged numbering 0..N0-1 (the order the LLM sees the vision block).
  tokens.groups              (N0, k) int64: original patches each vision token covers, -1 padded
  tokens.weights             (N0, k) float32: each covered patch's share of the token (0 on padding;
                             a row sums to 1): 1 for one patch, 1/k each for a merged window of k,
                             1/4 each under a 2 x 2 patch merger, interpolation weights for an
                             interpolated grid
  tokens.merged              (N0,) uint8, optional: 1 for the tokens stage 1a built (without it: the tokens
                             covering more patches than token_patches; a host whose tokens mix patches
                             unmerged writes it)
  stage1a.similarity         (G/w, G/w) float32 window similarity (when stage 1a ran)
  stage1b.key_score          (N0,) float32 the score that ranked the key set (when stage 1b ran):
                             head-mean CLS attention, or the substitute meta["stage1b"]["score"]
                             names (SigLIP towers have no CLS). Files that call it
                             stage1b.cls_attention are read under the new name.
  stage2.L{l}.tokens         (V,) int64 token ids entering prune layer l, in sequence order
  stage2.L{l}.global_share   (V,) float32;  stage2.L{l}.individual_max (V,) float32
  stage2.L{l}.status         (V,) int8, the status codes below (STATUS_NAMES)
  kv.L{l}                    (n,) int64 indices into the prefill sequence (S + N0 + T) still cached
  baseline.vision_score      (N,) float32 vision-side baseline's score of every original patch (optional)
  Original-patch coordinates (G x G), derived from the above so that no view re-maps anything:
  patch.token (int64), patch.merged (uint8), patch.similarity (float32), patch.key (uint8),
  patch.key_score (float32, NaN without stage 1b), patch.dropped_after_layer (int64, -1 = never),
  patch.stage2.L{l}.status (int8, NOT_ENTERING = -1), patch.stage2.L{l}.global_share /
  .individual_max (float32, NaN = not entering), patch.kv_cached (num_layers, G, G) uint8,
  patch.vision_score (float32, when baseline.vision_score is present).
  A patch with patch.token -1 reaches the LLM in no token (a LLaVA-NeXT tile's unpadded border).
Several crops (LLaVA-NeXT: base image + any-res tiles): meta "crops" lists each crop's name,
grid, mapping and merged windows; tokens.groups then holds global ids offset(crop) + row * cols + col
(offset: the patches of the crops before it); crop 0's maps are patch.*, crop c's are patch.c{c}.*,
each (rows, cols) of its crop (kv_cached: (num_layers, rows, cols)); stage1a.c{c}.similarity per
crop; tokens.newline (N0,) uint8 marks the newline-row tokens (never dropped, cover no patch).

GEOMETRY. Version 2 makes the geometry explicit: crops[c].grid and tokens.weights. A version-1 file
(every crop a G x G grid, model.vision.grid; one patch per token, merged tokens their window) is
converted on load: each crop gets grid [G, G], tokens.weights 1/k over each token's k patches, and
meta["upgraded_from"] names the version read. Every reader draws from the explicit geometry.

Loading treats the file as untrusted (traces are shared): mustdrop.trace_checks bounds every size
the header claims by what a supported model produces and types every field above, before any
array is read or map built; each problem is one TraceError naming the field.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import trace_checks as checks
# Stage-2 status codes (stage2.L{l}.status) are defined once, in the leaf module statuses.py.
from .statuses import (DROPPED, KEPT_BOTH, KEPT_CODES, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY,  # noqa: F401
                       KEPT_PROTECTED, NOT_ENTERING, STATUS_NAMES)
from .trace_checks import TraceError

SCHEMA_VERSION = "mustdrop-trace/2"
V1 = "mustdrop-trace/1"
READABLE_VERSIONS = (V1, SCHEMA_VERSION)
METADATA_KEY = "mustdrop_trace"
MAX_TRACE_BYTES = 64 * 1024 * 1024

# Array names of older files, read under today's names.
RENAMED_ARRAYS = {"stage1b.cls_attention": "stage1b.key_score"}


@dataclass
class Trace:
    meta: dict
    arrays: dict

    # ---------------------------------------------------------------- building
    @classmethod
    def build(cls, meta: dict, arrays: dict) -> "Trace":
        """Add the original-patch maps to a run's decisions and validate the whole."""
        t = cls(meta, dict(arrays))
        if "tokens.weights" not in t.arrays and "tokens.groups" in t.arrays:
            t.arrays["tokens.weights"] = equal_weights(t.arrays["tokens.groups"])
        t.arrays.update(patch_maps(t))
        t.validate()
        return t

    # ---------------------------------------------------------------- accessors
    @property
    def grid(self) -> int:
        """The side of crop 0's grid, for the views that draw square grids (LLaVA-1.5 and NeXT
        crops are square); ``crop_grid`` gives any crop's (rows, cols)."""
        return self.crop_grid(0)[0]

    def crop_grid(self, crop: int = 0) -> tuple[int, int]:
        """(rows, cols) of one crop's patch grid."""
        r, c = self.meta["crops"][crop]["grid"]
        return int(r), int(c)

    def crop_offset(self, crop: int = 0) -> int:
        """Global id of a crop's first patch: the patches of the crops before it."""
        return sum(r * c for r, c in (self.crop_grid(i) for i in range(crop)))

    @property
    def num_layers(self) -> int:
        return int(self.meta["model"]["llm"]["num_layers"])

    @property
    def prune_layers(self) -> list[int]:
        return [int(s["layer"]) for s in self.meta["stage2"]]

    @property
    def answer(self) -> str:
        return self.meta["generation"]["answer"]

    @property
    def n_crops(self) -> int:
        """How many crops (images the vision tower saw): 1, or base image + tiles for LLaVA-NeXT."""
        crops = self.meta.get("crops")
        return len(crops) if isinstance(crops, list) and crops else 1

    def crop_name(self, crop: int = 0) -> str:
        crops = self.meta.get("crops")
        if isinstance(crops, list) and 0 <= crop < len(crops) and isinstance(crops[crop], dict):
            return str(crops[crop].get("name", f"crop {crop}"))
        return "image"

    def crop_mapping(self, crop: int = 0) -> dict:
        """processed (u, v) = (x * sx + ox, y * sy + oy) of one crop, from the trace's mapping record."""
        crops = self.meta.get("crops")
        if isinstance(crops, list) and 0 <= crop < len(crops) and isinstance(crops[crop], dict) \
                and isinstance(crops[crop].get("mapping"), dict):
            return crops[crop]["mapping"]
        return self.meta["input"]["mapping"]

    # ---------------------------------------------------------------- patch queries (G x G per crop)
    def patch(self, name: str, crop: int = 0) -> np.ndarray:
        """A patch map of one crop by name ("token", "key", "stage2.L2.status", "kv_cached" ...)."""
        return self.arrays[crop_prefix(crop) + name]

    def has_patch(self, name: str, crop: int = 0) -> bool:
        return crop_prefix(crop) + name in self.arrays

    def stage2(self, layer: int) -> dict | None:
        """The meta record (layer, entering, kept, dropped) of prune layer ``layer``, None if not one."""
        return next((s for s in self.meta["stage2"] if s["layer"] == layer), None)

    def stage2_patch(self, layer: int, name: str, crop: int = 0) -> np.ndarray:
        """A stage-2 map at prune layer ``layer``: "status" (NOT_ENTERING where the token had gone),
        "global_share" or "individual_max" (NaN where the token had gone)."""
        return self.patch(f"stage2.L{layer}.{name}", crop)

    def has_token(self, crop: int = 0) -> np.ndarray:
        """(G, G) bool: the patch reaches the LLM in some token (False: a tile's unpadded border)."""
        return self.patch("token", crop) >= 0

    def processed_at(self, layer: int, crop: int = 0) -> np.ndarray:
        """(G, G) bool: the patch's token was in the sequence when LLM layer ``layer`` ran in prefill."""
        d = self.patch("dropped_after_layer", crop)
        return ((d < 0) | (d >= layer)) & self.has_token(crop)

    def alive_after(self, layer: int, crop: int = 0) -> np.ndarray:
        """(G, G) bool: the patch's token is still in the sequence after LLM layer ``layer``."""
        d = self.patch("dropped_after_layer", crop)
        return ((d < 0) | (d > layer)) & self.has_token(crop)

    def kv_cached_at(self, layer: int, crop: int = 0) -> np.ndarray:
        """(G, G) bool: LLM layer ``layer`` holds the patch's K/V after prefill (and the stage-3 trim)."""
        return self.patch("kv_cached", crop)[layer].astype(bool)

    def stage2_layer_for(self, layer: int | None = None) -> int | None:
        """The prune layer whose stage-2 decisions a view of LLM layer ``layer`` shows: the last prune
        layer at or before it, else (nothing dropped yet, or no layer given) the first prune layer;
        None when stage 2 did not run. The app and the slides both use this rule."""
        prune = self.prune_layers
        if not prune:
            return None
        before = [p for p in prune if layer is not None and p <= layer]
        return before[-1] if before else prune[0]

    @property
    def start_layer(self) -> int:
        """The LLM layer a view opens at: the first prune layer (layer 0 without stage 2)."""
        return self.prune_layers[0] if self.prune_layers else 0

    @property
    def is_vanilla(self) -> bool:
        """A run of the unpruned model: the config enabled no stage and no baseline."""
        from .config import MustDropConfig

        cfg = self.meta.get("config")
        if isinstance(cfg, dict) and cfg.get("method", "mustdrop") != "mustdrop":
            return False        # a method's run (maybe a plug-in not loaded here, whose config cannot be checked)
        try:
            return not MustDropConfig.from_dict(cfg).enabled
        except (TypeError, ValueError) as e:
            raise TraceError(f"the trace's config cannot be read: {str(e)[:200]}") from None

    # ---------------------------------------------------------------- files
    def save(self, path) -> Path:
        """Write atomically (temporary file in the same folder, then rename)."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.ascontiguousarray(v) for k, v in self.arrays.items()}
        fd, tmp = tempfile.mkstemp(prefix=".trace-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(arrays, tmp, metadata={METADATA_KEY: json.dumps(self.meta, allow_nan=False)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path) -> "Trace":
        """Read and validate; refuse anything else with a clear TraceError (never evaluates code)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise TraceError(f"trace file not found: {path.name}")
        size = path.stat().st_size
        if size > MAX_TRACE_BYTES:
            raise TraceError(f"{path.name} is {size / 1e6:.1f} MB; trace files are limited to "
                             f"{MAX_TRACE_BYTES / 1e6:.0f} MB")
        try:
            with safe_open(str(path), "np") as f:
                header = f.metadata() or {}
                if METADATA_KEY not in header:
                    raise TraceError(f"no '{METADATA_KEY}' metadata: not a MustDrop trace")
                meta = checks.parse_meta(header[METADATA_KEY])
                upgraded = meta.get("schema") == V1
                if upgraded:
                    meta = meta_from_v1(meta)
                # Every claimed size is checked before an array is read or a map is built from it.
                claims = cls(meta, {})._check_meta()
                for k in f.keys():                # stored maps are rebuilt below, not read; shapes still checked
                    if k.startswith("patch."):
                        _check_patch_shape(k, tuple(f.get_slice(k).get_shape()), claims)
                arrays = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("patch.")}
        except TraceError as e:
            raise TraceError(f"{path.name}: {e}") from None
        except Exception as e:  # noqa: BLE001 - any decode failure (SafetensorError, OSError, ...)
            raise TraceError(f"{path.name} is not a MustDrop trace (a safetensors file with a "
                             f"'{METADATA_KEY}' header): {str(e)[:200]}") from None
        for old, new in RENAMED_ARRAYS.items():
            if old in arrays and new not in arrays:
                arrays[new] = arrays.pop(old)
        groups = arrays.get("tokens.groups")
        if upgraded and isinstance(groups, np.ndarray) and groups.ndim == 2 and groups.dtype == np.int64:
            arrays["tokens.weights"] = equal_weights(groups)
        t = cls(meta, arrays)
        try:
            checks.check_arrays(arrays, claims)
        except TraceError as e:
            raise TraceError(f"{path.name}: {e}") from None
        # The patch maps are rebuilt from the validated token-level records: forged maps cannot mislead.
        try:
            t.arrays = arrays | patch_maps(t)
        except (KeyError, IndexError, ValueError, TypeError) as e:     # a gap in the checks: still a message
            raise TraceError(f"{path.name}: the trace's records are inconsistent ({type(e).__name__})") from None
        return t

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check version, every field the readers use (type, length, range, the bounds of
        mustdrop.trace_checks), the arrays' dtypes and shapes; raise TraceError naming the first problem."""
        claims = self._check_meta()
        checks.check_arrays(self.arrays, claims)
        for k, v in self.arrays.items():
            if k.startswith("patch."):
                _check_patch_shape(k, v.shape, claims)

    def _check_meta(self) -> dict:
        m = self.meta
        if not isinstance(m, dict):
            raise TraceError("trace metadata must be a JSON object")
        if m.get("schema") != SCHEMA_VERSION:
            v = m.get("schema")
            if v in READABLE_VERSIONS:
                raise TraceError(f"a {v!r} trace must be converted first (Trace.load does)")
            shown = repr(v) if isinstance(v, str) and re.fullmatch(r"[\w./-]{1,40}", v) else checks._got(v)
            raise TraceError(f"unknown trace schema {shown}; this version reads "
                             f"{' and '.join(repr(x) for x in READABLE_VERSIONS)}")
        return checks.check_meta(m)


def _check_patch_shape(name: str, shape: tuple, claims: dict) -> None:
    grids, L = claims["grids"], claims["L"]
    part = name.split(".")[1] if name.count(".") else ""
    c = int(part[1:]) if name.startswith("patch.c") and part[1:].isdigit() else 0
    if c >= len(grids):
        raise TraceError(f"{name} names crop {c}; the trace has {len(grids)}")
    want = (L, *grids[c]) if name.endswith("kv_cached") else tuple(grids[c])
    if tuple(shape) != want:
        raise TraceError(f"{name} has shape {tuple(shape)}, expected {want}")


def crop_prefix(c: int) -> str:
    """Array-name prefix of crop c's patch maps: "patch." for the first (only) crop, "patch.c{c}." after."""
    return "patch." if c == 0 else f"patch.c{c}."


def patch_maps(t: Trace) -> dict:
    """Every decision in original-patch coordinates (G x G per crop), from the token-level records."""
    m, a = t.meta, t.arrays
    L = t.num_layers
    S, N0, N = m["sequence"]["S"], m["sequence"]["N0"], m["sequence"]["N"]
    groups = a["tokens.groups"]
    token_of_patch = np.full(N, -1, dtype=np.int64)
    # a patch several tokens cover (an interpolated grid) is drawn as the token with the largest share
    # of it (ties: the later token, as when every patch had one token)
    tok, k = np.nonzero(groups >= 0)
    patch = groups[tok, k]
    share = a["tokens.weights"][tok, k] if "tokens.weights" in a else np.ones(patch.size, np.float32)
    order = np.lexsort((tok, share, patch))
    last = np.r_[patch[order][1:] != patch[order][:-1], True]
    token_of_patch[patch[order][last]] = tok[order][last]
    sizes = (groups >= 0).sum(1)
    have = token_of_patch >= 0
    out = {}

    def spread(values, fill=np.nan, dtype=np.float32):
        res = np.full(N, fill, dtype=dtype)
        res[have] = np.asarray(values)[token_of_patch[have]]
        return res

    unit = np.ones(N, dtype=np.int64)      # patches one unmerged token covers (4 under a 2 x 2 merger)
    for c in range(t.n_crops):
        R, C = t.crop_grid(c)
        unit[t.crop_offset(c):t.crop_offset(c) + R * C] = int(m["crops"][c].get("token_patches") or 1)
    # stage 1a's tokens: as the trace records them (tokens.merged), else those covering more patches
    # than one unmerged token does
    tok_of = np.maximum(token_of_patch, 0)
    merged_of_patch = (a["tokens.merged"].astype(bool)[tok_of] if "tokens.merged" in a
                       else sizes[tok_of] > unit)
    maps = {"token": token_of_patch,
            "merged": (have & merged_of_patch).astype(np.uint8)}
    is_key = np.zeros(N0, dtype=np.uint8)
    is_key[m["stage1b"]["key_tokens"]] = 1
    maps["key"] = spread(is_key, 0, np.uint8)
    if "stage1b.key_score" in a:
        maps["key_score"] = spread(a["stage1b.key_score"])
    if "baseline.vision_score" in a:
        maps["vision_score"] = np.asarray(a["baseline.vision_score"], dtype=np.float32)
    dropped_after = np.full(N0, -1, dtype=np.int64)
    for s in m["stage2"]:
        p = f"stage2.L{s['layer']}"
        toks = a[f"{p}.tokens"]
        status_tok = np.full(N0, NOT_ENTERING, dtype=np.int8)
        g_tok = np.full(N0, np.nan, dtype=np.float32)
        i_tok = np.full(N0, np.nan, dtype=np.float32)
        if a[f"{p}.status"].size:
            status_tok[toks] = a[f"{p}.status"]
            g_tok[toks] = a[f"{p}.global_share"]
            i_tok[toks] = a[f"{p}.individual_max"]
            dropped_after[toks[a[f"{p}.status"] == DROPPED]] = s["layer"]
        maps[f"{p}.status"] = spread(status_tok, NOT_ENTERING, np.int8)
        maps[f"{p}.global_share"] = spread(g_tok)
        maps[f"{p}.individual_max"] = spread(i_tok)
    maps["dropped_after_layer"] = spread(dropped_after, -1, np.int64)
    cached = np.zeros((L, N), dtype=np.uint8)
    for layer in range(L):
        idx = a[f"kv.L{layer}"]
        tok = idx[(idx >= S) & (idx < S + N0)] - S
        in_cache = np.zeros(N0, dtype=np.uint8)
        in_cache[tok] = 1
        cached[layer] = spread(in_cache, 0, np.uint8)
    w = m["stage1a"]["window"]
    for c in range(t.n_crops):
        R, C = t.crop_grid(c)
        start = t.crop_offset(c)
        pre, sl = crop_prefix(c), slice(start, start + R * C)
        for name, v in maps.items():
            out[f"{pre}{name}"] = v[sl].reshape(R, C)
        out[f"{pre}kv_cached"] = cached[:, sl].reshape(L, R, C)
        sim = a.get("stage1a.similarity" if c == 0 else f"stage1a.c{c}.similarity")
        if sim is not None:       # windows of window_patches patches a side (2w under a 2 x 2 merger);
            wp = int(m["crops"][c].get("window_patches") or w)                # validated by trace_checks
            rows, cols = np.divmod(np.arange(R * C), C)
            wr, wc = rows // wp, cols // wp
            inside = (wr < sim.shape[0]) & (wc < sim.shape[1])   # border patches of no window: NaN
            vals = np.full(R * C, np.nan, np.float32)
            vals[inside] = sim[wr[inside], wc[inside]]
            out[f"{pre}similarity"] = vals.reshape(R, C)
    return out


def equal_weights(groups: np.ndarray) -> np.ndarray:
    """(N0, k) float32: each token's k covered patches share it equally (1/k), 0 on padding: the
    weights of every LLaVA token (one patch, or a merged window averaged)."""
    real = groups >= 0
    k = np.maximum(real.sum(1, keepdims=True), 1).astype(np.float32)
    return np.where(real, np.float32(1) / k, np.float32(0)).astype(np.float32)


def meta_from_v1(meta: dict) -> dict:
    """A version-1 header in version 2's form: every crop a G x G grid (model.vision.grid); the
    tokens' equal weights are added with the arrays. G is checked here (it sizes the crops' grids);
    everything else is left for the checks of version 2 to name."""
    try:
        G = meta["model"]["vision"]["grid"]
    except (KeyError, TypeError):
        return meta                     # the checks name the missing field
    checks.integer(G, "model.vision.grid", 1, checks.MAX_GRID)
    crops = meta.get("crops")
    if crops is None:                   # the oldest files: one crop, described by input and stage1a
        inp, s1a = meta.get("input"), meta.get("stage1a")
        crops = [{"name": "image", "mapping": inp.get("mapping") if isinstance(inp, dict) else None,
                  "merged_windows": s1a.get("merged_windows", []) if isinstance(s1a, dict) else []}]
    if isinstance(crops, list):
        crops = [dict(c, grid=[G, G]) if isinstance(c, dict) else c for c in crops]
    return dict(meta, schema=SCHEMA_VERSION, upgraded_from=V1, crops=crops)
