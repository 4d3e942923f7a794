"""Qwen2-VL / Qwen2.5-VL geometry and stage 1, as pure functions (no model, no hooks): what the Qwen host
(:mod:`mustdrop.hosts.qwen_vl`) asks, kept here so that each rule is tested on its own.

The processor resizes the image to (H, W) pixels with ``smart_resize`` (both sides multiples of
patch * merge = 28, the area within min/max pixels, the aspect ratio nearly kept; no crop, no pad) and
cuts it into an (rows, cols) = (H/14, W/14) patch grid, not square. The vision tower's merger folds each
2 x 2 block of patches into one LLM token, so the LLM sees a (rows/2, cols/2) token grid in raster order;
token (r, c) covers patches (2r + i, 2c + j), i, j in {0, 1}, a quarter each. Patch ids are the trace's:
row * cols + col.

Stage 1a: where the local merge happens on this tower. On the token grid after the merger, not on
patch windows inside the tower:
- the merger reads every 4 consecutive rows of the patch sequence as one 2 x 2 block (``view(-1, 4C)``):
  a patch sequence shortened inside the tower no longer splits into 2 x 2 blocks, unless whole blocks
  vanish, which makes the 2 x 2 block the unit of merging anyway;
- the tower's attention windows (Qwen2.5-VL: 112 px windows in all but 4 blocks), its rotary positions
  and its sequence boundaries are derived from the grid before the first block; a sequence shortened
  after block 0 would need every later block's windows and positions rebuilt by hand, and the tower
  would no longer be transformers' own computation;
- the paper merges spatially adjacent, similar tokens so that fewer of them enter the LLM; here the
  tokens that enter the LLM are the 2 x 2 merged ones, and their neighbours on the token grid are
  exactly the spatially adjacent tokens.
So a w x w window of LLM tokens (2w x 2w patches) whose tokens are similar (mean pairwise cosine of
the merger outputs >= threshold) becomes their plain mean, moved to the front of the vision block most
similar first, as in the authors' code. The windows tile the largest top-left part of the token grid
that w divides (dynamic resolution gives any grid); border tokens outside it are never merged. What
this gives up: the paper's merge also saves the vision layers after layer 0; here the tower runs whole.

Positions (M-RoPE): the LLM gives each token a (temporal, row, column) position. Text tokens sit on
the diagonal (t = h = w = their running position); image token (r, c) of an image starting at running
position s sits at (s, s + r, s + c); the text after the image continues at s + max(rows/2, cols/2).
A merged token sits at the centre of the tokens it averages (its mean row and column, a half-integer
for even windows): it keeps the spatial meaning the other tokens' positions carry.
``positions="original"`` keeps every survivor's own 3-D position after a drop (the columns of the
(3, 1, L) ids are gathered, nothing renumbered). ``positions="reference"`` is refused: the authors'
compaction renumbers the survivors 0..L'-1 on one axis, but here the image's span on every axis is
max(rows, cols)/2 however many of its tokens survive, so there is no sequence to compact; renumbering
the survivors one by one would throw away the row / column layout that M-RoPE encodes (a 2-D image
read as a 1-D strip), which is not what the reference did to LLaVA's 1-D positions either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REFERENCE_POSITIONS_REFUSED = (
    "positions='reference' is not defined for Qwen2-VL / Qwen2.5-VL: their rotary positions are 3-D "
    "(temporal, row, column), and the image spans max(rows, cols)/2 positions on each axis however many of "
    "its tokens survive, so the authors' compaction (survivors renumbered 0..n-1 on one axis) has nothing to "
    "compact; renumbering would read the image as a 1-D strip. Use positions='original' (every survivor keeps "
    "its own 3-D position)")


# ----------------------------------------------------------------------------- grid and pixels
def resized_size(width: int, height: int, patch: int, merge: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) in pixels the processor resizes a width x height image to: transformers' own
    smart_resize (the PIL image processor's copy, importable without torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(int(height), int(width), factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    return int(w), int(h)


def image_mapping(width: int, height: int, resized_w: int, resized_h: int) -> dict:
    """How the processor turned the original image into the processed one (a plain resize, aspect nearly
    kept): processed (u, v) = (x * scale_xy[0], y * scale_xy[1]), in the trace's mapping record."""
    sx, sy = resized_w / width, resized_h / height
    return {"kind": "resize", "scale": sx, "scale_xy": [sx, sy], "resized": [resized_w, resized_h],
            "offset": [0, 0], "processed": [resized_w, resized_h]}


def token_grid(rows: int, cols: int, merge: int = 2) -> tuple[int, int]:
    """(rows, cols) of the LLM token grid of a rows x cols patch grid."""
    if rows % merge or cols % merge:
        raise ValueError(f"a {rows} x {cols} patch grid does not fold into {merge} x {merge} blocks")
    return rows // merge, cols // merge


def token_patches(rows: int, cols: int, merge: int = 2) -> torch.Tensor:
    """(rows/merge * cols/merge, merge^2) patch ids each LLM token covers, tokens in raster order of the
    token grid (the merger's output order), patches row-major inside the block (the processor's order)."""
    tr, tc = token_grid(rows, cols, merge)
    r = torch.arange(tr).view(tr, 1, 1, 1) * merge + torch.arange(merge).view(1, 1, merge, 1)
    c = torch.arange(tc).view(1, tc, 1, 1) * merge + torch.arange(merge).view(1, 1, 1, merge)
    return (r * cols + c).reshape(tr * tc, merge * merge)


def token_values_on_patches(values: torch.Tensor, rows: int, cols: int, merge: int = 2) -> torch.Tensor:
    """(rows * cols,) float32: each patch carries the value of the LLM token that covers it (``values``
    one per token, raster order of the token grid)."""
    out = torch.empty(rows * cols, dtype=torch.float32, device=values.device)
    out[token_patches(rows, cols, merge).to(values.device)] = values.detach().float().unsqueeze(1)
    return out


def patch_rows_of_tokens(rows: int, cols: int, merge: int = 2) -> torch.Tensor:
    """(tokens, merge^2) rows of the processor's pixel_values that each token's patches are: it flattens
    patches as (t, rows/merge, cols/merge, merge, merge), so token k's patches are rows k*m^2 .. k*m^2+m^2-1."""
    tr, tc = token_grid(rows, cols, merge)
    return torch.arange(tr * tc * merge * merge).view(tr * tc, merge * merge)


def token_boxes(mapping: dict, rows: int, cols: int, merge: int = 2) -> torch.Tensor:
    """(tokens, 4) float64 (x0, y0, x1, y1) region of each LLM token on the ORIGINAL image, in pixels."""
    tr, tc = token_grid(rows, cols, merge)
    pw, ph = mapping["processed"]
    sx, sy = mapping["scale_xy"]
    cell_w, cell_h = pw / cols * merge / sx, ph / rows * merge / sy
    r, c = torch.meshgrid(torch.arange(tr, dtype=torch.float64), torch.arange(tc, dtype=torch.float64), indexing="ij")
    r, c = r.flatten(), c.flatten()
    return torch.stack([c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h], dim=1)


def expand_to_patches(token_groups: torch.Tensor, rows: int, cols: int, merge: int = 2):
    """Patch groups and weights of LLM tokens that each cover some original tokens (``token_groups``
    (N0, k) token ids, -1 padded): (N0, k * merge^2) patch ids, -1 padded, and their float32 shares
    (1 / (covered tokens * merge^2) each, 0 on padding)."""
    patches = token_patches(rows, cols, merge).to(token_groups.device)
    real = token_groups >= 0
    groups = torch.where(real.unsqueeze(-1), patches[token_groups.clamp_min(0)], torch.full_like(patches[:1], -1))
    groups = groups.reshape(token_groups.shape[0], -1)
    n = (real.sum(1, keepdim=True) * merge * merge).clamp_min(1).float()
    weights = torch.where(groups >= 0, 1.0 / n, torch.zeros((), dtype=torch.float32))
    return groups, weights.float()


# ----------------------------------------------------------------------------- stage 1a
@dataclass
class TokenMerge:
    """Stage 1a on the token grid: the vision block for the LLM and where each of its tokens came from."""

    tokens: torch.Tensor           # (N0, D): merged windows (most similar first), then unmerged tokens ascending
    groups: torch.Tensor           # (N0, w*w) ids of the original LLM tokens each covers, -1 padded
    similarity: torch.Tensor       # (rows // w, cols // w) float32 window similarity
    merged_windows: torch.Tensor   # (r,) window ids (raster over the window grid), most similar first


def window_token_ids(rows: int, cols: int, window: int, device=None) -> torch.Tensor:
    """(num_windows, w*w) token ids of each w x w window tiling the top-left (rows//w*w, cols//w*w) part
    of a rows x cols token grid, windows in raster order, tokens row-major inside."""
    check_window(rows, cols, window)
    wr, wc = rows // window, cols // window
    r = torch.arange(wr, device=device).view(wr, 1, 1, 1) * window + torch.arange(window, device=device).view(1, 1, window, 1)
    c = torch.arange(wc, device=device).view(1, wc, 1, 1) * window + torch.arange(window, device=device).view(1, 1, 1, window)
    return (r * cols + c).reshape(wr * wc, window * window)


def check_window_size(window: int) -> None:
    """Refuse a window that is no window, naming the bad value (the grid is checked per image)."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 2:
        raise ValueError(f"window must be an integer >= 2 (a window of one token has no pairs), got {window!r}")


def check_window(rows: int, cols: int, window: int) -> None:
    """Refuse windows the token grid cannot hold one of, naming the bad value."""
    check_window_size(window)
    if window > min(rows, cols):
        raise ValueError(f"window {window} is larger than the {rows} x {cols} token grid of this image")


def window_similarity(tokens: torch.Tensor, rows: int, cols: int, window: int) -> torch.Tensor:
    """(rows // w, cols // w) float32: mean cosine similarity over the ordered pairs of distinct tokens of
    each window (the reference's measure, on LLM tokens)."""
    if tokens.dim() != 2 or tokens.shape[0] != rows * cols:
        raise ValueError(f"expected {rows * cols} tokens of shape (N, D), got {tuple(tokens.shape)}")
    x = tokens.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w2 = window * window
    xw = x[window_token_ids(rows, cols, window, x.device)]
    gram = torch.bmm(xw, xw.transpose(1, 2))
    off_diag = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    return (off_diag / (w2 * (w2 - 1))).view(rows // window, cols // window)


def merge_token_windows(tokens: torch.Tensor, rows: int, cols: int, window: int, threshold: float) -> TokenMerge:
    """Stage 1a on a rows x cols LLM token grid: each w x w window with similarity >= threshold becomes the
    plain mean of its tokens and moves to the front, most similar first (ties in window order); every other
    token follows in ascending order, border tokens outside the windows included."""
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"merge threshold must be a finite number, got {threshold!r}")
    sim = window_similarity(tokens, rows, cols, window)
    flat = sim.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices
    r = int((flat >= threshold).sum())
    merged = order[:r]
    ids = window_token_ids(rows, cols, window, tokens.device)
    merged_ids = ids[merged]
    keep = torch.ones(rows * cols, dtype=torch.bool, device=tokens.device)
    keep[merged_ids.flatten()] = False
    rest = torch.arange(rows * cols, device=tokens.device)[keep]
    out = torch.cat([tokens[merged_ids].mean(dim=1).to(tokens.dtype), tokens[rest]], dim=0)
    w2 = window * window
    groups = torch.cat([merged_ids, torch.nn.functional.pad(rest.unsqueeze(1), (0, w2 - 1), value=-1)])
    return TokenMerge(out, groups, sim, merged)


def token_centres(token_groups: torch.Tensor, token_cols: int) -> torch.Tensor:
    """(N0, 2) float64 (row, col) of each LLM token on the token grid: the mean of the original tokens it
    covers (an unmerged token: its own cell; a merged window: its centre)."""
    real = token_groups >= 0
    g = token_groups.clamp_min(0)
    r, c = torch.div(g, token_cols, rounding_mode="floor").double(), (g % token_cols).double()
    n = real.sum(1).clamp_min(1).double()
    return torch.stack([(r * real).sum(1) / n, (c * real).sum(1) / n], dim=1)


# ----------------------------------------------------------------------------- stage 1b
def received_attention(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scaling: float,
                       budget: int = 1 << 24) -> torch.Tensor:
    """(N,) float32: the mean attention each row receives from the queries that can attend to it (those
    of its own segment of ``cu_seqlens``: the whole image, or its attention window), then the head mean.
    The documented substitute for CLS attention on a tower without CLS. ``q``, ``k``: (N, H, hd), rotated.
    Computed in chunks of query rows, never holding more than about ``budget`` scores."""
    N, H, _ = q.shape
    out = torch.zeros(N, dtype=torch.float32, device=q.device)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    for a, b in zip(bounds[:-1], bounds[1:]):
        n = b - a
        if n <= 0:
            continue
        kk = k[a:b].float().transpose(0, 1)                         # (H, n, hd)
        step = max(1, budget // (H * n))
        acc = torch.zeros(H, n, dtype=torch.float32, device=q.device)
        for s in range(a, b, step):
            qq = q[s:min(b, s + step)].float().transpose(0, 1)      # (H, m, hd)
            p = torch.softmax(torch.matmul(qq, kk.transpose(1, 2)) * scaling, dim=-1)
            acc += p.sum(1)
        out[a:b] = (acc / n).mean(0)
    return out


# ----------------------------------------------------------------------------- M-RoPE positions
def mrope_position_ids(S: int, T: int, centres: torch.Tensor, token_rows: int, token_cols: int) -> tuple[torch.Tensor, float]:
    """(3, 1, S + N0 + T) position ids of a prompt with S text tokens, one image whose N0 LLM tokens sit at
    ``centres`` ((N0, 2) row, col on its token grid), then T text tokens; and the position of the first
    decoded token. As get_rope_index lays them out for a single image (temporal index 0); long when every
    position is whole, else float32 (merged even windows sit at half-integer centres)."""
    N0 = centres.shape[0]
    span = max(token_rows, token_cols)
    head = torch.arange(S, dtype=torch.float64).expand(3, S)
    vis = torch.stack([torch.full((N0,), float(S), dtype=torch.float64), S + centres[:, 0].double(),
                       S + centres[:, 1].double()])
    tail = (S + span + torch.arange(T, dtype=torch.float64)).expand(3, T)
    ids = torch.cat([head, vis, tail], dim=1).unsqueeze(1)
    whole = bool(torch.equal(ids, ids.round()))
    return (ids.long() if whole else ids.float()), S + span + T


def shorten_position_ids(position_ids: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """(3, B, n) ids of the survivors, ``alive`` their original sequence indices: each keeps its own 3-D
    position (positions="original")."""
    return position_ids[..., alive.to(position_ids.device)]


def decode_position_ids(next_position: float, start: int, L0: int, n: int, device=None) -> torch.Tensor:
    """(1, n) position ids of n decode steps, the first at sequence index ``start``: text continues on the
    diagonal from ``next_position`` (the prompt's sequence index L0), whatever was dropped."""
    first = int(round(next_position)) + (start - L0)
    return torch.arange(first, first + n, device=device).view(1, -1)


def rope_delta(next_position: float, L0: int) -> int:
    """transformers' ``rope_deltas`` bookkeeping for the model: decode position minus cache length, where
    the cache length counted is the prompt's L0 entries of layer 0."""
    return int(round(next_position)) - L0
