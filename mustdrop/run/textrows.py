"""Stage 2's text-row scoring: the attention of the T text rows over all L keys, T x L per head.

Never L x L: q is recomputed for the T rows only (the prune layer's q_proj output + RoPE at their
positions), the keys are the layer's own, already rotated, from the cache. Softmax runs over ALL keys
(the normalisation needs them), causal within the text rows. Equal to eager attention's rows (to
3e-10); shared by every host, which supplies the RoPE (``Host.rows_rope``).
"""

from __future__ import annotations

from functools import lru_cache

import torch


def text_rows_attention(attn_module, hidden, position_embeddings, keys, T: int, rope) -> torch.Tensor:
    """Attention probabilities of the last T rows over all L keys, (1, H, T, L), in float32.

    Costs T x L per head: q is recomputed for the T rows only (q_proj + RoPE at their positions) and
    the keys are the layer's own, already rotated, from the cache. Softmax runs over ALL keys (the
    normalisation needs them), causal within the text rows. Equal to eager attention's rows.
    """
    cos, sin = position_embeddings
    L = hidden.shape[1]
    queries = attn_module.q_proj(hidden[:, L - T:])

    def rotate(q):
        return rope(q, q, cos[:, L - T:], sin[:, L - T:])[0] * attn_module.scaling
    return text_rows_probs(queries, keys, attn_module.head_dim, rotate).unsqueeze(0)


@lru_cache(maxsize=32)
def _later_rows(T: int, groups: int, device: torch.device) -> torch.Tensor:
    """(groups * T, T) bool, True where text row t (of each of ``groups`` query heads sharing a key
    head) would see a later text row: the causal mask of the text rows' own columns. Built once per
    shape and device (read-only: masked_fill_ reads it)."""
    return torch.ones(T, T, dtype=torch.bool).triu(1).repeat(groups, 1).to(device)


def text_rows_probs(queries, keys, head_dim: int, rotate) -> torch.Tensor:
    """(H, T, L) float32 probabilities of T query rows over the L cached keys. ``queries`` is the
    q_proj output of the rows (1, T, H * head_dim); ``rotate`` applies RoPE and the attention
    scaling to (1, H, T, head_dim). Causal within the T rows, which are the last T of the L."""
    T = queries.shape[1]
    q = rotate(queries.view(1, T, -1, head_dim).transpose(1, 2))           # (1, H, T, hd)
    H, kv, L = q.shape[1], keys.shape[1], keys.shape[-2]
    # grouped-query heads share their key head: one batched matmul over the key heads, keys not copied
    scores = torch.bmm(q.reshape(kv, H // kv * T, head_dim).float(), keys[0].float().mT)   # (kv, g*T, L)
    scores[..., L - T:].masked_fill_(_later_rows(T, H // kv, scores.device), float("-inf"))
    return torch.softmax(scores, dim=-1).view(H, T, L)


class RowsRope:
    """RoPE (with the attention scaling folded in) for the T text rows at every prune layer, from
    the full-length tables the first prune layer receives: later prune layers slice them at their
    rows' positions instead of recomputing or re-shaping tables. With the standard rotate-half RoPE
    the rotation is q * cos + roll(q) * sin' (sin' = sin with its first half negated), equal to
    rotate_half's concatenation of -q2 and q1 bit for bit; any other RoPE goes through ``rope``.

    ``grouped``: the query heads share key heads, so the rotated rows are regrouped by key head
    next, which copies them unless they are contiguous. The two products are then summed with the
    contiguous one (the roll's) first: addition commutes exactly, and the sum comes out contiguous,
    so the regrouping is a view. Without grouping the order stays, and so does the strided layout
    the batched matmul has always been given."""

    def __init__(self, position_embeddings, scaling: float, rope=None, grouped: bool = False):
        cos, sin = position_embeddings                     # (1, L0, hd): positions 0..L0-1
        self.rope, self.scaling, self.grouped = rope, scaling, grouped
        if rope is None:           # float32 tables: the scores are float32, half-precision q is promoted
            # (1, L0, hd) tables broadcast over the heads of (1, H, T, hd); sin' * scaling is sin times
            # (-scaling, ..., +scaling, ...), equal bit for bit to negating its first half, then scaling
            self.cos = cos.float() * scaling
            self.sin = sin.float() * _signed_scale(cos.shape[-1], float(scaling), cos.device)
        else:
            self.cos, self.sin = cos, sin

    def __call__(self, q, start: int):
        end = start + q.shape[-2]
        if self.rope is None:
            cos, sin = self.cos[:, start:end], self.sin[:, start:end]
            if self.grouped:
                return q.roll(q.shape[-1] // 2, -1) * sin + q * cos
            return q * cos + q.roll(q.shape[-1] // 2, -1) * sin
        return self.rope(q, q, self.cos[:, start:end], self.sin[:, start:end])[0] * self.scaling


@lru_cache(maxsize=32)
def _signed_scale(head_dim: int, scaling: float, device: torch.device) -> torch.Tensor:
    """(head_dim,) float32: -scaling on the first half, +scaling on the second (read-only)."""
    half = head_dim // 2
    return torch.tensor([-scaling] * half + [scaling] * (head_dim - half), dtype=torch.float32).to(device)


_RowsRope = RowsRope   # the name tests and benchmarks knew it by
