"""The four MustDrop decisions as pure tensor functions.

Nothing here knows about models or hooks (see ``adapters/`` for that): every function takes tensors
and returns plain results, so each decision can be tested on its own and checked against the golden
vectors computed by the authors' code (liuting20/MustDrop @ 909afa5).

Numbering used throughout:
- patches of a G x G grid are row-major, ``patch = row * G + col``;
- windows of size w x w tile the grid row-major, ``window = (row // w) * (G // w) + (col // w)``;
- "vision positions" index the vision block as it is at a given moment (after merging, after each
  prune layer), always in the order the language model sees it.

On an accelerator these functions do not read values back to the host, except where a result's
size depends on data (the merged-window count of stage 1a, the kept count of stage 2): a read-back
stalls the device until all queued work is done. Index checks on caller input run on host tensors
only (they are free there); tensors already on a device are trusted (they come from these stages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import vision_tokens

# Status codes of each vision token entering a prune layer (stage 2): defined once, in a leaf
# module the trace also reads; re-exported here where the filter sets them.
from .statuses import (DROPPED, KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY,  # noqa: E402,F401
                       KEPT_PROTECTED, STATUS_NAMES)


def check_grid(grid: int, window: int) -> None:
    """Refuse grids and windows the local merge cannot tile, naming the bad value."""
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 2:
        raise ValueError(f"window must be an integer >= 2 (a window of one patch has no pairs), got {window!r}")
    if window > grid:
        raise ValueError(f"window {window} is larger than the {grid} x {grid} patch grid")
    if grid % window != 0:
        raise ValueError(f"window {window} does not divide the {grid} x {grid} patch grid (grid % window = {grid % window})")


def check_unit_interval(name: str, value: float) -> float:
    """A threshold or rate must be a finite number in [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not math.isfinite(v) or v < 0.0 or v > 1.0:
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value!r}")
    return v


def check_prune_layers(prune_layers, num_layers: int) -> list[int]:
    """Prune layers must be distinct, ascending layer indices below the depth."""
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    layers = [int(x) for x in prune_layers]
    for x, raw in zip(layers, prune_layers):
        if x != raw:
            raise ValueError(f"prune layers must be integers, got {raw!r}")
    for x in layers:
        if x < 0 or x >= num_layers:
            raise ValueError(f"prune layer {x} is outside the language model's layers 0..{num_layers - 1}")
    for a, b in zip(layers, layers[1:]):
        if b <= a:
            raise ValueError(f"prune layers must be strictly ascending without duplicates, got {layers}")
    return layers


def window_patch_ids(grid: int, window: int) -> torch.Tensor:
    """(num_windows, window**2) original patch ids of each window, ascending within a window."""
    check_grid(grid, window)
    g = grid // window
    rows = torch.arange(grid).view(g, window, 1, 1)
    cols = torch.arange(grid).view(1, 1, g, window)
    ids = rows * grid + cols                              # (g, w, g, w)
    return ids.permute(0, 2, 1, 3).reshape(g * g, window * window)


@lru_cache(maxsize=32)
def _window_ids_on(grid: int, window: int, device: torch.device) -> torch.Tensor:
    """window_patch_ids, built once per device: a host-to-device copy blocks until the device is idle,
    and the ids are the same for every image. Read-only: callers index with it, never write to it."""
    return window_patch_ids(grid, window).to(device)


def window_similarity(patches: torch.Tensor, grid: int, window: int) -> torch.Tensor:
    """Mean cosine similarity over ordered pairs of distinct patches in each window, (G/w, G/w)."""
    return _window_similarity_flat(patches, grid, window).view(grid // window, grid // window)


def _window_similarity_flat(patches: torch.Tensor, grid: int, window: int) -> torch.Tensor:
    """window_similarity in window order, (num_windows,)."""
    check_grid(grid, window)
    if patches.dim() != 2 or patches.shape[0] != grid * grid:
        raise ValueError(f"expected {grid * grid} patch tokens of shape (N, C), got {tuple(patches.shape)}")
    x = patches.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w2 = window * window
    xw = x[_window_ids_on(grid, window, x.device)]          # (num_windows, w2, C)
    gram = torch.bmm(xw, xw.transpose(1, 2))
    off_diag = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    return off_diag / (w2 * (w2 - 1))


@dataclass
class MergeResult:
    tokens: torch.Tensor          # (1 + N0, C): CLS, merged windows (most similar first), unmerged patches
    similarity: torch.Tensor      # (G/w, G/w) float32
    merged_windows: torch.Tensor  # (r,) window ids, most similar first
    groups: torch.Tensor          # (N0, w*w) original patch ids covered by each output token, -1 padded


def local_spatial_merge(tokens: torch.Tensor, grid: int, window: int, threshold: float,
                        num_prefix: int = 1) -> MergeResult:
    """Stage 1a: merge each w x w window whose patches are similar into one token.

    ``tokens`` is the output of vision encoder layer 0 for one image, (num_prefix + G*G, C): the
    CLS token first for CLIP (num_prefix 1), nothing before the patches for SigLIP (num_prefix 0).
    Windows with similarity >= threshold become the plain mean of their patches and move to the
    front of the vision block, most similar first; every other patch follows in ascending order.
    """
    check_grid(grid, window)
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"merge threshold must be a finite number, got {threshold!r}")
    if tokens.dim() != 2 or tokens.shape[0] != num_prefix + grid * grid:
        raise ValueError(f"expected {num_prefix} prefix + {grid * grid} patch tokens, got {tuple(tokens.shape)}")
    patches = tokens[num_prefix:]
    flat = _window_similarity_flat(patches, grid, window)
    return _merge_windows(tokens, patches, grid, window, flat, *_window_order(flat, threshold), num_prefix)


def windows_to_merge(similarity: torch.Tensor, threshold: float, count: int | None = None) -> torch.Tensor:
    """Stage 1a's choice of windows, most similar first (ties in window order): every window at/above
    ``threshold``, or the ``count`` most similar ones when a count is imposed (the batch rule)."""
    order, r = _window_order(similarity, threshold, count)
    return order[:r]


def _window_order(similarity, threshold, count=None):
    """Every window, most similar first (ties in window order), and how many of them merge."""
    flat = similarity.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices
    r = int((flat >= float(threshold)).sum()) if count is None else int(count)   # the one read-back: the merged length is a dynamic shape
    return order, r


def local_spatial_merge_batch(tokens: torch.Tensor, grid: int, window: int, threshold: float,
                              num_prefix: int = 1) -> list[MergeResult]:
    """Stage 1a on a batch (the authors' code on LLaVA-NeXT crops): r is the MINIMUM over the batch
    of the windows at/above threshold, and every item merges its own r most similar windows, so
    that all items keep one length."""
    check_grid(grid, window)
    if tokens.dim() != 3:
        raise ValueError(f"expected a batch (B, prefix + N, C), got {tuple(tokens.shape)}")
    patches = [t[num_prefix:] for t in tokens]
    sims = [_window_similarity_flat(p, grid, window) for p in patches]
    r = min(windows_to_merge(s, threshold).numel() for s in sims)
    return [_merge_windows(t, p, grid, window, s, *_window_order(s, threshold, count=r), num_prefix)
            for t, p, s in zip(tokens, patches, sims)]


def _merge_windows(tokens, patches, grid, window, flat_sim, order, r, num_prefix) -> MergeResult:
    """Merge the first ``r`` windows of ``order`` (every window, most similar first). ``patches``
    is ``tokens[num_prefix:]``, ``flat_sim`` the window similarity in window order."""
    merged = order[:r]
    w2 = window * window
    ids = _window_ids_on(grid, window, tokens.device)
    merged_ids = ids[merged]                                       # (r, w2)
    merged_tokens = patches[merged_ids].mean(dim=1)                # plain mean, sizes not carried
    # the unmerged patches in ascending order: the patches of the other windows, sorted (distinct
    # ids); nonzero on a mask would read their count back from the device
    rest = torch.sort(ids[order[r:]].flatten()).values
    out = torch.cat([tokens[:num_prefix], merged_tokens.to(tokens.dtype), patches[rest]], dim=0)
    # a merged window's w2 patches, then each unmerged patch alone, -1 padded
    groups = torch.cat([merged_ids, torch.nn.functional.pad(rest.unsqueeze(1), (0, w2 - 1), value=-1)])
    return MergeResult(out, flat_sim.view(grid // window, grid // window), merged, groups)


def key_token_set(cls_attn: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """Stage 1b: the ceil(keep_rate * N) tokens with the highest head-mean CLS attention, ascending.

    ``cls_attn`` is (H, N): post-softmax attention of the CLS query to the N patch tokens of the
    last vision layer, CLS->CLS removed and not renormalised; or its head mean (N,), float32, where
    the caller has it already.
    """
    keep_rate = check_unit_interval("key keep rate", keep_rate)
    if cls_attn.dim() not in (1, 2):
        raise ValueError(f"cls_attn must be (heads, tokens) or a head mean (tokens,), got {tuple(cls_attn.shape)}")
    score = cls_attn.float().mean(dim=0) if cls_attn.dim() == 2 else cls_attn.float()
    k = min(math.ceil(keep_rate * score.numel()), score.numel())
    return torch.sort(torch.topk(score, k).indices).values


def key_token_set_per_crop(score: torch.Tensor, crop_of: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """Stage 1b on several crops (LLaVA-NeXT): each crop keeps its own ceil(keep_rate * n_c) tokens.

    ``score`` is (H, V) or (V,) over the vision block, ``crop_of`` (V,) the crop of each position
    (-1 for tokens of no crop, e.g. newline rows, which are never key tokens). Returns positions in
    the block, ascending."""
    score = score if score.dim() == 2 else score.unsqueeze(0)
    if crop_of.shape[0] != score.shape[1]:
        raise ValueError(f"crop_of has {crop_of.shape[0]} entries for {score.shape[1]} scored tokens")
    chosen = []
    for c in torch.unique(crop_of[crop_of >= 0]).tolist():
        mine = torch.nonzero(crop_of == c).flatten()
        chosen.append(mine[key_token_set(score[:, mine], keep_rate).to(mine.device)])
    if not chosen:
        return torch.zeros(0, dtype=torch.long, device=score.device)
    return torch.sort(torch.cat(chosen)).values


def cls_key_score(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float, has_cls: bool = True) -> torch.Tensor:
    """The key-set score of each patch, (B, H, N), from one vision layer's q / k projections (B, L, C).

    With a CLS token (first position): the CLS query's post-softmax attention to the N patches,
    CLS->CLS removed and not renormalised (the authors' stage 1b). Without one (SigLIP):
    ``mean_received_attention``, the documented substitute. One function for inference (adapters,
    and the vision-side baselines) and for the shipped model's training, so both read the same score.
    """
    b, length, c = k.shape
    hd = c // num_heads
    keys = k.float().reshape(b, length, num_heads, hd)                          # (B, L, H, hd)
    if has_cls:
        # the CLS query against every key: one batched matmul over B * H of (1, hd) x (hd, L), the
        # one (CLS query) @ keys^T runs with the same operands, without its broadcasting views
        q0 = q[:, :1].float().reshape(b * num_heads, 1, hd)
        logits = torch.bmm(q0, keys.permute(0, 2, 3, 1).reshape(b * num_heads, hd, length))
        return torch.softmax(logits.view(b, num_heads, length) * scale, dim=-1)[..., 1:]
    keys = keys.transpose(1, 2)                                                 # (B, H, L, hd)
    qs = q.float().reshape(b, length, num_heads, hd).transpose(1, 2)
    probs = torch.softmax((qs @ keys.transpose(-1, -2)) * scale, dim=-1)
    return torch.stack([mean_received_attention(p) for p in probs])


def mean_received_attention(attn: torch.Tensor) -> torch.Tensor:
    """Key-set score for towers without a CLS token (SigLIP): per head, the mean over all queries of
    the attention each token receives, (H, N) from post-softmax (H, N, N). Documented substitute;
    the authors' code cannot run without CLS at all."""
    if attn.dim() != 3 or attn.shape[1] != attn.shape[2]:
        raise ValueError(f"attn must be (heads, N, N), got {tuple(attn.shape)}")
    return attn.float().mean(dim=1)


@dataclass
class FilterResult:
    kept: torch.Tensor            # (V',) kept vision positions, ascending (key set united back in)
    key_after: torch.Tensor       # the key tokens inside ``kept``: positions, or a (V',) bool mask where the
                                  # key tokens were given as a mask
    global_share: torch.Tensor    # (V,) share of the text rows' total attention to vision going to each token
    individual_max: torch.Tensor  # (V,) max attention any single text row gives each token
    status: torch.Tensor          # (V,) int8 status code (KEPT_* / DROPPED), see STATUS_NAMES
    _dropped: int | torch.Tensor  # a count, or the (V,) bool mask of the tokens the two conditions alone
                                  # would drop, counted only when ``dropped_by_filter_only`` is read

    @property
    def dropped_by_filter_only(self) -> int | torch.Tensor:
        """How many tokens the two conditions alone would drop (a 0-dim tensor where reading it would
        stall the device). Counted when read: a run does not need it, the trace counts the statuses."""
        d = self._dropped
        return d.sum() if isinstance(d, torch.Tensor) and d.dtype == torch.bool else d

    @dropped_by_filter_only.setter
    def dropped_by_filter_only(self, value) -> None:
        self._dropped = value


def dual_attention_filter(attn: torch.Tensor, global_thr: float, individual_thr: float,
                          key_tokens: torch.Tensor) -> FilterResult:
    """Stage 2: drop a vision token only when its global share AND its individual max are low.

    ``attn`` is (H, T, V): attention probabilities of the T post-image text rows to the V current
    vision tokens (sliced from a softmax over all keys). Key tokens are always united back in; they
    come as positions, or as a (V,) bool mask (then ``key_after`` is the mask over the kept tokens:
    a caller filtering layer after layer carries the mask with one gather per layer instead of a
    sort and a search). The only value read back to the host is the kept count (``kept`` has a
    data-dependent size).
    """
    global_thr = check_unit_interval("global threshold", global_thr)
    individual_thr = check_unit_interval("individual threshold", individual_thr)
    if attn.dim() != 3:
        raise ValueError(f"attn must be (heads, text rows, vision tokens), got {tuple(attn.shape)}")
    v = attn.shape[-1]
    as_mask = key_tokens.dtype == torch.bool
    if as_mask:
        if tuple(key_tokens.shape) != (v,):
            raise ValueError(f"a key token mask must have one entry per vision token ({v}), got {tuple(key_tokens.shape)}")
        is_key = key_tokens.to(attn.device)
    else:
        key_tokens = key_tokens.to(device=attn.device, dtype=torch.long)
        _check_host_indices(key_tokens, v, "key token positions")
        is_key = torch.zeros(v, dtype=torch.bool, device=attn.device).index_fill_(0, key_tokens, True)
    mean_attn = attn.float().mean(dim=0)                   # (T, V)
    column_sum = mean_attn.sum(dim=0)
    global_share = column_sum / column_sum.sum()
    individual_max = mean_attn.amax(dim=0)
    low_global = global_share < global_thr
    low_individual = individual_max < individual_thr
    drop = low_global & low_individual
    dropped = drop > is_key                                # both low and not a key token
    # KEPT_BOTH 0, KEPT_GLOBAL 1 (low individual only), KEPT_INDIVIDUAL 2 (low global only),
    # KEPT_KEY 3 (both low, key token), DROPPED 4 (both low): low_individual + 2 low_global + dropped
    # in one sum instead of masked writes, each of which would turn its mask into indices (a
    # read-back on an accelerator)
    status = torch.stack([low_individual, low_global, low_global, dropped]).sum(0, dtype=torch.int8)
    kept = torch.nonzero(~dropped).flatten()
    key_after = is_key[kept] if as_mask else torch.searchsorted(kept, torch.sort(key_tokens).values)
    return FilterResult(kept, key_after, global_share, individual_max, status, drop)


def _check_host_indices(idx: torch.Tensor, n: int, name: str) -> None:
    """Refuse indices outside 0..n-1, on host tensors only (reading device values would stall it)."""
    if idx.device.type != "cpu" or not idx.numel():
        return
    values = idx.tolist()
    if min(values) < 0 or max(values) >= n:
        raise ValueError(f"{name} must lie in 0..{n - 1}")


def kv_keep_indices(num_layers: int, prune_layers, S: int, T: int, N0: int,
                    kept_per_prune_layer, selections=None, only_trimmed: bool = False) -> list:
    """Stage 3: for each layer, indices (into the sequence it processed in prefill) still cached.

    Layers before the first prune layer keep everything; layers from the first through the last
    prune layer keep only the tokens that survived the last prune layer (the composition of the
    per-layer kept positions); later layers already hold only those and keep everything.
    Indices live where the kept positions do; layers with the same indices share one tensor.

    ``selections``, where the caller has them (the adapter built them to shorten the sequence):
    per prune layer, the indices into the whole sequence entering it that it kept,
    ``cat(arange(S), S + kept, the T text positions)``, or None where it kept everything. The
    trimmed layers' indices are then composed from them, one gather per drop after the first,
    instead of being rebuilt from the kept positions; the result is the same. ``only_trimmed``:
    None in place of the indices of every layer that keeps all it processed (a caller that trims
    only the others need not build them).
    """
    layers = check_prune_layers(prune_layers, num_layers)
    kept_per_prune_layer = [torch.as_tensor(k, dtype=torch.long) for k in kept_per_prune_layer]
    if len(kept_per_prune_layer) != len(layers):
        raise ValueError(f"need one kept set per prune layer ({len(layers)}), got {len(kept_per_prune_layer)}")
    if selections is not None and len(selections) != len(layers):
        raise ValueError(f"need one selection per prune layer ({len(layers)}), got {len(selections)}")
    device = kept_per_prune_layer[0].device if layers else torch.device("cpu")
    seq_len = [S + N0 + T]
    v = N0
    for k in kept_per_prune_layer:
        _check_host_indices(k, v, "kept positions")
        v = k.numel()
        seq_len.append(S + v + T)
    everything, head, trimmed = {}, None, {}
    final_vision = [None] * len(layers)
    if selections is not None:
        # trimmed[i]: positions, in the whole sequence entering prune layer i, of the final survivors
        # (None while no later drop removed anything: everything is kept)
        composed = None
        for i in range(len(layers) - 1, -1, -1):
            if selections[i] is not None:
                sel = torch.as_tensor(selections[i], dtype=torch.long)
                _check_host_indices(sel, seq_len[i], "selected positions")
                composed = sel if composed is None else sel[composed]
            if composed is not None:
                trimmed[i] = composed
    else:
        # final_vision[i]: positions, in the vision block entering prune layer i, of the final survivors.
        alive = kept_per_prune_layer[-1] if layers else None
        for i in range(len(layers) - 1, -1, -1):
            if i < len(layers) - 1:
                alive = kept_per_prune_layer[i][alive]
            final_vision[i] = alive
    out = []
    stage = 0   # how many prune layers lie strictly before the current layer
    for layer in range(num_layers):
        length = seq_len[stage]
        if not layers or layer < layers[0] or layer > layers[-1] or (selections is not None and stage not in trimmed):
            # keeps everything (in the selections' case: nothing was dropped from this stage on)
            if only_trimmed:
                out.append(None)
            else:
                if length not in everything:
                    everything[length] = torch.arange(length, device=device)
                out.append(everything[length])
        else:
            if stage not in trimmed:
                head = torch.arange(S, device=device) if head is None else head
                v_here = length - S - T
                trimmed[stage] = torch.cat([head, S + final_vision[stage],
                                            torch.arange(S + v_here, length, device=device)])
            out.append(trimmed[stage])
        if stage < len(layers) and layer == layers[stage]:
            stage += 1
    return out


# ---------------------------------------------------------------------------------------------
# Same-budget baselines. They return FilterResult too, so that the adapter, the trace and every
# view treat them exactly like MustDrop's stage 2 (status: KEPT_BOTH or DROPPED).

def keep_count_for_budget(budget: float, n0: int, layer: int, num_layers: int) -> int:
    """Tokens to keep after a single drop at ``layer`` so that the mean over layers of the vision
    tokens each layer processes (compute convention) equals ``budget``."""
    if not math.isfinite(float(budget)) or budget < 0:
        raise ValueError(f"token budget must be a finite number >= 0, got {budget!r}")
    check_prune_layers([layer], num_layers)
    after = num_layers - layer - 1
    if after == 0:
        return n0
    lowest = (layer + 1) * n0 / num_layers
    if budget < lowest - 1e-9:
        raise ValueError(f"token budget {budget:g} cannot be reached by one drop after layer {layer}: the "
                         f"{layer + 1} layers before it already average {lowest:.1f} tokens; drop earlier")
    r = round((budget * num_layers - (layer + 1) * n0) / after)
    return int(min(max(r, 0), n0))


def _single_drop_result(kept: torch.Tensor, v: int, score: torch.Tensor) -> FilterResult:
    kept = torch.sort(kept).values
    status = torch.full((v,), DROPPED, dtype=torch.int8, device=score.device)
    status[kept] = KEPT_BOTH
    return FilterResult(kept, torch.zeros(0, dtype=torch.long, device=score.device), score, score, status,
                        v - kept.numel())


def fastv_keep(attn: torch.Tensor, keep: int) -> FilterResult:
    """FastV: keep the ``keep`` vision tokens the LAST token attends to most (head mean)."""
    if attn.dim() != 3:
        raise ValueError(f"attn must be (heads, text rows, vision tokens), got {tuple(attn.shape)}")
    score = attn[:, -1, :].float().mean(0)
    keep = min(max(int(keep), 0), score.numel())
    return _single_drop_result(torch.topk(score, keep).indices, score.numel(), score)


def random_keep(attn: torch.Tensor, keep: int, seed: int) -> FilterResult:
    """Random drop: a seeded uniform choice of ``keep`` tokens (scores recorded, not used)."""
    v = attn.shape[-1]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    kept = torch.randperm(v, generator=gen)[: min(max(int(keep), 0), v)]
    if attn.is_cuda:     # a copy from pinned memory does not wait for the device's queue
        kept = kept.pin_memory().to(attn.device, non_blocking=True)
    kept = kept.to(attn.device)
    score = attn.float().mean(0).sum(0)
    return _single_drop_result(kept, v, score / score.sum().clamp_min(1e-30))


def pool_groups(grid: int, side: int) -> torch.Tensor:
    """Spatial pooling baseline: the grid patches each cell of a side x side adaptive average pool
    covers (the windows of torch's adaptive_avg_pool2d), (side*side, k) padded with -1."""
    if not 1 <= side <= grid:
        raise ValueError(f"pooled side must be in 1..{grid}, got {side}")
    spans = [(math.floor(i * grid / side), math.ceil((i + 1) * grid / side)) for i in range(side)]
    cells = [[r * grid + c for r in range(r0, r1) for c in range(c0, c1)] for r0, r1 in spans for c0, c1 in spans]
    k = max(len(c) for c in cells)
    out = torch.full((len(cells), k), -1, dtype=torch.long)
    for i, c in enumerate(cells):
        out[i, : len(c)] = torch.tensor(c)
    return out


def with_protected(res: FilterResult, protected: torch.Tensor, recount: bool = True) -> FilterResult:
    """Unite positions that are never dropped (LLaVA-NeXT newline rows) back into a decision.

    Their status becomes KEPT_PROTECTED. ``recount`` re-counts the drops for a baseline, whose
    count is what it actually dropped; MustDrop's filter keeps the count its two conditions alone
    would drop (the protected positions are already in its key set)."""
    protected = protected.to(device=res.status.device, dtype=torch.long)
    if not protected.numel():
        return res
    res.kept = torch.unique(torch.cat([res.kept, protected]))
    res.status[protected] = KEPT_PROTECTED
    if recount:
        res.dropped_by_filter_only = (res.status == DROPPED).sum()
    return res


# ---------------------------------------------------------------------------------------------
# Budget plans: how each baseline meets a layer-averaged budget (compute convention: the mean over
# LLM layers of the vision tokens each layer processes). A plan is computed once per sample from
# the budget, the vision tokens n0 the baseline starts from and the depth, and recorded in the trace.

FASTV_MIN_KEEP = 0.5      # FastV's R = 50%: its drop after K never keeps less than half
PDROP_MIN_RATIO = 0.5     # PyramidDrop's lambda = 0.5: each of its drops never keeps less than half
VISIONZIP_CONTEXTUAL = 10 / 64   # VisionZip's 54 dominant + 10 contextual tokens for 64 (same share at 128, 192)


@dataclass(frozen=True)
class BudgetPlan:
    """Where a baseline drops and how many it keeps. ``pre_keep`` < ``n0`` means tokens are dropped
    before the LLM; ``keep[i]`` tokens survive the drop after LLM layer ``layers[i]``."""

    method: str
    budget: float
    n0: int
    pre_keep: int
    layers: tuple = ()
    keep: tuple = ()
    ratio: float | None = None
    rule: str = ""

    def tokens_per_layer(self, num_layers: int) -> list[int]:
        return vision_tokens.per_layer(self.pre_keep, zip(self.layers, self.keep), num_layers)

    def layer_average(self, num_layers: int) -> float:
        return vision_tokens.layer_average(self.tokens_per_layer(num_layers))

    def to_dict(self) -> dict:
        return {"method": self.method, "budget": self.budget, "n0": self.n0, "pre_keep": self.pre_keep,
                "layers": list(self.layers), "keep": list(self.keep), "ratio": self.ratio, "rule": self.rule}


def _check_budget(budget) -> float:
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"token budget must be a number, got {budget!r}") from None
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"token budget must be a finite number > 0, got {budget!r}")
    return b


def _spans(layers, num_layers) -> list[int]:
    """Layers processed with the count left by each drop: from after layers[i] up to layers[i+1]."""
    ends = list(layers[1:]) + [num_layers - 1]
    return [e - p for p, e in zip(layers, ends)]


def _fit_counts(budget: float, n: int, layers, num_layers: int, ratio: float) -> tuple[int, ...]:
    """Counts kept after each drop: round(n * ratio^i), the last one solved so that the layer
    average equals the budget to the nearest whole token of that last stage."""
    spans = _spans(layers, num_layers)
    counts = [int(min(max(round(n * ratio ** (i + 1)), 0), n)) for i in range(len(layers))]
    fixed = (layers[0] + 1) * n + sum(s * c for s, c in zip(spans[:-1], counts[:-1]))
    upper = counts[-2] if len(counts) > 1 else n
    counts[-1] = int(min(max(round((budget * num_layers - fixed) / spans[-1]), 0), upper))
    return tuple(counts)


def plan_single_drop(method: str, budget: float, n0: int, layer: int, num_layers: int) -> BudgetPlan:
    """FastV / random drop: one drop after LLM layer K (``layer``), never refusing a budget.

    If the drop after K can meet the budget keeping at least FASTV_MIN_KEEP of its tokens, it
    alone does: keep = round((budget L - (K+1) n0) / (L-K-1)). Otherwise tokens are first dropped
    before the LLM, to n' = round(budget L / ((K+1) + (L-K-1) / 2)), and the drop after K keeps the
    count that makes the layer average equal the budget from n' (about n'/2). Either way the layer
    average is the budget up to rounding to whole tokens (within 0.5 of a token)."""
    budget = _check_budget(budget)
    check_prune_layers([layer], num_layers)
    if layer >= num_layers - 1:
        raise ValueError(f"a drop after the last layer ({layer}) changes nothing; choose K <= {num_layers - 2}")
    n0 = int(n0)
    after = num_layers - layer - 1
    if budget * num_layers >= n0 * ((layer + 1) + after * FASTV_MIN_KEEP) - 1e-9:
        pre = n0
        rule = "one drop after layer K"
    else:
        pre = int(min(max(round(budget * num_layers / ((layer + 1) + after * FASTV_MIN_KEEP)), 1), n0))
        rule = "drop before the LLM to n', then one drop after layer K keeping about half"
    keep = _fit_counts(budget, pre, [layer], num_layers, 1.0)
    return BudgetPlan(method, budget, n0, pre, (int(layer),), keep, None, rule)


def pyramid_layers(num_layers: int, stages_count: int = 4) -> tuple[int, ...]:
    """PyramidDrop's schedule scaled to a depth: drops at the ends of the first three of four equal
    segments (after layers 7, 15, 23 of 32, as its layers 8 / 16 / 24 start the next segment)."""
    if num_layers < 2:
        raise ValueError(f"a language model of {num_layers} layer(s) has no room for drop layers")
    out: list[int] = []
    for i in range(1, stages_count):
        x = min(max(round(i * num_layers / stages_count) - 1, 0), num_layers - 2)
        if not out or x > out[-1]:
            out.append(x)
    return tuple(out)


def plan_pyramid(budget: float, n0: int, layers, num_layers: int) -> BudgetPlan:
    """PyramidDrop: after each of ``layers`` the same share lambda of the entering tokens is kept,
    ranked by the last instruction token's attention; lambda is solved (bisection) so that the layer
    average equals the budget, the last stage's count rounded to hit it to the nearest token. Where
    even lambda = PDROP_MIN_RATIO exceeds the budget, tokens are first dropped before the LLM, to
    the n' at which lambda = PDROP_MIN_RATIO meets it."""
    budget = _check_budget(budget)
    layers = check_prune_layers(layers, num_layers)
    if not layers or layers[-1] >= num_layers - 1:
        raise ValueError(f"PyramidDrop needs drop layers before the last layer {num_layers - 1}, got {layers}")
    n0 = int(n0)
    spans = _spans(layers, num_layers)

    def average(n, lam):
        return n * ((layers[0] + 1) + sum(s * lam ** (i + 1) for i, s in enumerate(spans))) / num_layers

    if budget >= n0 - 1e-9:
        return BudgetPlan("pdrop", budget, n0, n0, tuple(layers), (n0,) * len(layers), 1.0, "budget >= n0: no drop")
    if average(n0, PDROP_MIN_RATIO) <= budget + 1e-9:
        pre, lo, hi = n0, PDROP_MIN_RATIO, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if average(n0, mid) < budget else (lo, mid)
        lam, rule = (lo + hi) / 2, "one share lambda kept at every drop, solved for the budget"
    else:
        lam = PDROP_MIN_RATIO
        pre = int(min(max(round(budget / average(1, lam)), 1), n0))
        rule = "drop before the LLM to n', then lambda = 0.5 at every drop"
    return BudgetPlan("pdrop", budget, n0, pre, tuple(layers), _fit_counts(budget, pre, layers, num_layers, lam),
                      lam, rule)


def plan_vision_side(method: str, budget: float, n0: int) -> BudgetPlan:
    """FasterVLM / VisionZip select before the LLM: every layer then holds the same count, round(budget)."""
    budget = _check_budget(budget)
    pre = int(min(max(round(budget), 1), int(n0)))
    return BudgetPlan(method, budget, int(n0), pre, (), (), None, "round(budget) tokens selected before the LLM")


def evenly_spaced(n: int, k: int) -> torch.Tensor:
    """k of n positions spread evenly in raster order, ascending: the content-blind choice used for
    the part of a text-ranked baseline's budget that must be dropped before the LLM ranks anything."""
    k = min(max(int(k), 0), int(n))
    return torch.unique(((torch.arange(k, dtype=torch.float64) + 0.5) * n / max(k, 1)).floor().long())


def top_score_tokens(score: torch.Tensor, keep: int) -> torch.Tensor:
    """FasterVLM: the ``keep`` tokens with the highest vision-side score (CLS attention, head mean),
    ascending (the order the LLM then sees them in)."""
    keep = min(max(int(keep), 0), score.numel())
    return torch.sort(torch.topk(score.float(), keep).indices).values


@dataclass
class VisionZipResult:
    tokens: torch.Tensor      # (K, C): prefix (CLS), dominant patches ascending, contextual tokens
    groups: torch.Tensor      # (K, k) patches each output token covers, -1 padded (the CLS row covers none)
    dominant: torch.Tensor    # patch ids of the dominant tokens, ascending
    targets: torch.Tensor     # patch ids the contextual tokens are built on


def visionzip_split(keep: int, num_prefix: int) -> tuple[int, int]:
    """(dominant patches, contextual tokens) of a VisionZip budget: contextual = round(keep * 10/64),
    the rest dominant, the CLS token (kept, as VisionZip keeps it) counted among the dominant."""
    keep = int(keep)
    contextual = min(max(round(keep * VISIONZIP_CONTEXTUAL), 1 if keep - num_prefix > 1 else 0), keep - num_prefix)
    return max(keep - num_prefix - contextual, 0), max(contextual, 0)


def visionzip_merge(hidden: torch.Tensor, score: torch.Tensor, metric: torch.Tensor, dominant: int,
                    contextual: int, num_prefix: int = 1) -> VisionZipResult:
    """VisionZip (Yang et al. 2024, dvlab-research/VisionZip clip_encoder.py) on one image.

    ``hidden`` (num_prefix + N, C) is the vision feature layer's output, ``score`` (N,) the head-mean
    CLS attention of that layer to the patches, ``metric`` (num_prefix + N, d) its head-mean keys.
    Dominant: the prefix (CLS) and the ``dominant`` patches of highest score. Contextual: of the
    remaining M patches (ascending), every (M // contextual)-th is a target; every other one joins
    the target whose key it is most cosine-similar to; a contextual token is its target's hidden state
    PLUS the mean of the states joining it (VisionZip adds, it does not average the target in)."""
    n = hidden.shape[0] - num_prefix
    if score.shape != (n,) or metric.shape[0] != hidden.shape[0]:
        raise ValueError(f"score must be ({n},) and metric ({hidden.shape[0]}, d); got {tuple(score.shape)}, "
                         f"{tuple(metric.shape)}")
    dominant = min(max(int(dominant), 0), n)
    dom = top_score_tokens(score, dominant)
    is_dom = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    is_dom[dom] = True
    rest = torch.nonzero(~is_dom).flatten()
    contextual = min(max(int(contextual), 0), rest.numel())
    parts = [hidden[:num_prefix], hidden[num_prefix + dom]]
    rows = [[-1]] * num_prefix + [[int(p)] for p in dom.tolist()]
    targets = torch.zeros(0, dtype=torch.long, device=hidden.device)
    if contextual:
        m = metric[num_prefix + rest].float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        step = max(1, rest.numel() // contextual)
        t_idx = torch.arange(0, rest.numel(), step, device=hidden.device)[:contextual]
        is_t = torch.zeros(rest.numel(), dtype=torch.bool, device=hidden.device)
        is_t[t_idx] = True
        others = torch.nonzero(~is_t).flatten()
        assign = (m[others] @ m[t_idx].T).argmax(dim=1)
        h_rest = hidden[num_prefix + rest].float()
        counts = torch.bincount(assign, minlength=contextual).clamp_min(1).unsqueeze(1).float()
        agg = torch.zeros(contextual, hidden.shape[1], device=hidden.device).index_add_(0, assign, h_rest[others])
        parts.append((h_rest[t_idx] + agg / counts).to(hidden.dtype))
        targets = rest[t_idx]
        members = rest[others]
        for c in range(contextual):
            rows.append([int(targets[c])] + members[assign == c].tolist())
    width = max(len(r) for r in rows)
    groups = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        groups[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return VisionZipResult(torch.cat(parts, dim=0), groups.to(hidden.device), dom, targets)
