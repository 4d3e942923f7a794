"""Packing several questions about one image into one training sequence, exactly equivalent to
single-turn inference.

Sequence: [<s> USER :] [576 image tokens] [block 1] [block 2] ... where each block is one question's
post-image prompt ("what color is the star ? ASSISTANT :") followed by its answer and </s>. A 4-D
boolean attention mask lets each block see only the prefix, the (kept) image tokens and itself,
and every block's position ids restart right after the image, so each block computes exactly what
a single-turn prompt would. The image tokens, the costly part, are processed once for K questions.

The same builder applies token-dropping augmentation: dropped image tokens are left out of the
sequence, optionally with positions compacted the way MustDrop's reference re-numbers them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from analysis.toyworld import COLOR_NAMES, GRID, SHAPES, Question, Scene

N_IMG = GRID * GRID
ATTRIBUTE_WORDS = set(COLOR_NAMES) | set(SHAPES)


@dataclass
class Block:
    """Token ids of one question block and what is supervised in it."""
    ids: list[int]          # prompt ids after the image, then answer id, then eos id
    n_prompt: int           # number of prompt ids (the answer is predicted at row n_prompt - 1)
    focus_from: int         # prompt rows from this index on are supervised toward the targets
    qtype: str
    answer_id: int
    target: np.ndarray      # (576,) normalised patch coverage of the question's target objects
    target_a: np.ndarray    # (576,) the first named object's coverage (position questions), else target
    target_b: np.ndarray    # (576,) the second named object's coverage (position questions), else target
    offset: tuple[float, float] | None = None  # position questions: centre of the first named object
                                               # minus the second's, (dx, dy) in pixels
    first_from: int | None = None  # position questions: prompt rows [first_from, focus_from) follow
                                   # the first object's name and are supervised toward it alone
    name_a: tuple[int, ...] = ()   # prompt indices of the attribute words naming the first object
                                   # (position questions), else of every attribute word
    name_b: tuple[int, ...] = ()   # ... naming the second object, else the same as name_a


@dataclass
class Packed:
    embeds_ids: torch.Tensor     # (B, L) token ids, image slots hold the image token id
    position_ids: torch.Tensor   # (B, L)
    mask: torch.Tensor           # (B, 1, L, L) bool, True = may attend
    img_index: torch.Tensor      # (B, V) which of the 576 image tokens fill the V image slots
    answer_rows: torch.Tensor    # (N, 2) [b, row] rows that predict the answer
    answer_ids: torch.Tensor     # (N,)
    eos_rows: torch.Tensor       # (N, 2) rows that predict eos (the answer token's row)
    qtypes: list[str]
    sup_rows: list[torch.Tensor]     # per sample: prompt rows whose attention is supervised
    sup_targets: list[torch.Tensor]  # per sample: (R_b, 3, V) target distributions over image slots:
                                     # [all targets, first named object, second named object]
    sup_weights: list[torch.Tensor]  # per sample: (R_b,)
    answer_offsets: torch.Tensor     # (N, 2) the blocks' `offset` in pixels, NaN where there is none
    name_targets: list[torch.Tensor]  # per sample: (R_b, 2, L) distributions over sequence columns
                                      # on the words naming [first, second] object, for sup_rows
    name_weights: list[torch.Tensor]  # per sample: (R_b,), 0 where a row has no name target


class PromptCache:
    """Token ids of a question's post-image prompt, taken from the real chat template once."""

    def __init__(self, processor):
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self._cache: dict[str, list[int]] = {}
        from analysis.toy_model import prompt
        ids = self.tok(prompt(processor, "what"), add_special_tokens=False)["input_ids"]
        self.prefix = ids[: ids.index(self.image_id)]

    def after_image(self, question: str) -> list[int]:
        if question not in self._cache:
            from analysis.toy_model import prompt
            ids = self.tok(prompt(self.processor, question), add_special_tokens=False)["input_ids"]
            self._cache[question] = ids[ids.index(self.image_id) + 1:]
        return self._cache[question]

    def block(self, scene: Scene, q: Question) -> Block:
        ids = self.after_image(q.text)
        toks = self.tok.convert_ids_to_tokens(ids)
        attr = [i for i, t in enumerate(toks) if t in ATTRIBUTE_WORDS]
        focus_from = attr[-1] if attr else 0
        ans = self.tok.convert_tokens_to_ids(q.answer)
        def norm(ids_):
            t = scene.union_patch_mask(list(ids_)).reshape(-1)
            return (t / max(t.sum(), 1e-9)).astype(np.float32)

        tgt = norm(q.targets)
        offset, first_from = None, None
        name_a = name_b = tuple(attr)
        if q.qtype == "position":
            a, b = norm(q.targets[:1]), norm(q.targets[1:])
            (xa, ya), (xb, yb) = (scene.objects[i].center for i in q.targets[:2])
            offset = (float(xa - xb), float(ya - yb))
            rel = toks.index("relative")
            name_a = tuple(i for i in attr if i < rel)
            name_b = tuple(i for i in attr if i > rel)
            first_from = name_a[-1]  # the last word of the first name
        else:
            a, b = tgt, tgt
        return Block(ids + [ans, self.tok.eos_token_id], len(ids), focus_from, q.qtype, ans, tgt, a, b,
                     offset, first_from, name_a, name_b)


def pack(cache: PromptCache, scenes: list[Scene], blocks: list[list[Block]],
         keeps: list[np.ndarray | None] | None = None, compact: list[bool] | None = None,
         focus_weight: float = 1.0, context_weight: float = 0.3,
         groups: list[np.ndarray] | None = None) -> Packed:
    """Build one batch. keeps[b] is a (576,) bool of the image tokens left in (None = all).

    Dropped image tokens are removed from the sequence, which is exactly equivalent to masking
    them out as keys everywhere, and cheaper. Kept tokens keep their original positions, or with
    compact[b] are re-numbered consecutively as in MustDrop's reference.

    groups[b], when given, says that image b went through stage 1a merging: (N0, w*w) the patch ids
    each of its N0 tokens covers (-1 padded, MustDrop's provenance), in the order the tokens reach
    the decoder; the image slots then hold those N0 tokens at consecutive positions, as stock
    inference places them, and attention targets are summed over each token's patches.
    """
    B = len(scenes)
    P = len(cache.prefix)
    if groups is not None:
        if keeps is not None and any(k is not None for k in keeps):
            raise ValueError("merged images (groups) cannot also drop tokens (keeps)")
        kept = [np.arange(len(g)) for g in groups]
    else:
        kept = [np.arange(N_IMG) if keeps is None or keeps[b] is None else np.flatnonzero(keeps[b])
                for b in range(B)]
    V = max(len(k) for k in kept)
    base = P + V
    L = base + max(sum(len(k.ids) for k in bl) for bl in blocks)
    ids = np.full((B, L), cache.tok.pad_token_id, np.int64)
    pos = np.zeros((B, L), np.int64)
    seg = np.full((B, L), -1, np.int64)
    img_index = np.zeros((B, V), np.int64)
    ans_rows, ans_ids, eos_rows, qtypes, offsets = [], [], [], [], []
    sup_rows, sup_t, sup_w, name_t, name_w = [], [], [], [], []
    for b in range(B):
        kb, n_kept = kept[b], len(kept[b])
        is_compact = groups is not None or (compact is not None and compact[b])
        ids[b, :P] = cache.prefix
        ids[b, P:P + n_kept] = cache.image_id
        seg[b, :P + n_kept] = 0
        pos[b, :P] = np.arange(P)
        pos[b, P:P + n_kept] = P + (np.arange(n_kept) if is_compact else kb)
        img_index[b, :n_kept] = kb
        after = P + (n_kept if is_compact else N_IMG)

        def restrict(t):
            out = np.zeros(V, np.float32)
            if groups is not None:
                g = groups[b]
                out[:n_kept] = np.where(g >= 0, t[np.maximum(g, 0)], 0.0).sum(1)
            else:
                out[:n_kept] = t[kb]
            return out / max(out.sum(), 1e-9)

        all_t = restrict(scenes[b].union_patch_mask().reshape(-1))
        start = base
        rows, tg, wt, nt, nw = [], [], [], [], []
        no_names = np.zeros((2, L), np.float32)
        for k, blk in enumerate(blocks[b]):
            n = len(blk.ids)
            ids[b, start:start + n] = blk.ids
            seg[b, start:start + n] = k + 1
            pos[b, start:start + n] = after + np.arange(n)
            r_ans = start + blk.n_prompt - 1
            ans_rows.append((b, r_ans)); ans_ids.append(blk.answer_id); qtypes.append(blk.qtype)
            eos_rows.append((b, r_ans + 1))
            offsets.append(blk.offset if blk.offset is not None else (float("nan"),) * 2)
            focus_t = np.stack([restrict(blk.target), restrict(blk.target_a), restrict(blk.target_b)])
            context_t = np.stack([all_t] * 3)
            first_t = np.stack([restrict(blk.target_a)] * 3)
            names = np.zeros((2, L), np.float32)   # [first, second] name's words, as columns
            for j, idx in enumerate((blk.name_a, blk.name_b)):
                if idx:
                    names[j, start + np.array(idx)] = 1.0 / len(idx)
            names_w = 1.0 if blk.name_a else 0.0     # count questions name nothing
            for i in range(blk.n_prompt):
                rows.append(start + i)
                if i >= blk.focus_from:
                    tg.append(focus_t); wt.append(focus_weight)
                    nt.append(names); nw.append(names_w)
                elif blk.first_from is not None and i >= blk.first_from:
                    # Between the two names every head looks at the object (and the words) just
                    # named, the easy look-up colour and shape questions teach; later rows can then
                    # copy it from this row.
                    tg.append(first_t); wt.append(focus_weight)
                    nt.append(names[[0, 0]]); nw.append(1.0)
                else:
                    tg.append(context_t); wt.append(context_weight)
                    nt.append(no_names); nw.append(0.0)
            start += n
        sup_rows.append(torch.tensor(rows))
        sup_t.append(torch.from_numpy(np.stack(tg)))
        sup_w.append(torch.tensor(wt))
        name_t.append(torch.from_numpy(np.stack(nt)))
        name_w.append(torch.tensor(nw))
    r = np.arange(L)
    causal = r[None, :] <= r[:, None]
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    mask = causal[None] & same & (seg[:, :, None] >= 0)
    pad = seg < 0
    mask[:, :, 0] |= pad  # padding rows attend to <s> and themselves only
    mask |= np.eye(L, dtype=bool)[None]
    return Packed(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(mask)[:, None],
                  torch.from_numpy(img_index), torch.tensor(ans_rows), torch.tensor(ans_ids),
                  torch.tensor(eos_rows), qtypes, sup_rows, sup_t, sup_w,
                  torch.tensor(offsets, dtype=torch.float32), name_t, name_w)
