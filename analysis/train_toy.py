"""Train the toy LLaVA from scratch on the scene world, on CPU, within a wall-clock budget.

    python -m analysis.train_toy --out runs/toy-v6 --minutes 88 --seed 0 --merge-share 0.5 --log runs/train_toy_v6.log

Recipe (why each part is there; measured probes are in shared/docs/toy-model-notes.md and the
model card, assets/toy-llava/README.md):
- Position from the start: the tower's patch position embeddings are initialised with a 2-D
  sin-cos code as strong as the patch content (--pos-init), instead of CLIP's N(0, 0.02), which is
  ~100x weaker than the content and left object tokens without their position.
- Phase 1, vision tower alone (at most --vision-minutes, or until pooled shape accuracy and pooled
  centre R^2 over the last 100 steps reach --vision-target and --centre-target): auxiliary heads
  on the projected tokens (colour, centre flag and patch position per patch; shape and centre per
  OBJECT, from the coverage-weighted mean of its tokens) and the CLS attention loss. A step costs
  about a third of a joint step. Shape is the slow part: the tower sits near chance for ~1500
  steps, then takes off; the centre is readable (R^2 ~0.8) after ~200 steps.
- Phase 2, joint, with the schedule below run over the remaining budget:
- Packed questions: K questions per image share one pass over the 576 image tokens (see
  analysis/packing.py), so each step supervises B*K answers for the cost of B images.
- Answer loss: cross-entropy on the one-word answer and on the </s> after it; for position
  questions also a linear readout of the two named objects' centre offset (dx, dy) from the answer
  row (--w-offset; head discarded at save), a dense signal for the comparison behind the word.
- Text->vision attention supervision: at the decoder's MustDrop pruning layers, the attention of
  --sup-heads heads (the others stay free) of the post-image prompt rows is pulled (cross-entropy
  over the image columns of the full softmax) toward the normalised patch mask of the objects the
  question is about, each head on its own (--per-head): even heads toward the first named object,
  odd heads toward the second, which differ only for position questions; in position questions
  the rows from the end of the first name up to the second name pull every head toward the first
  object (the easy "object just named" look-up; the answer rows can copy it from there); other
  rows before the question's last attribute word are pulled toward all objects. This teaches the look-up that
  plain answer loss learns too slowly, and it is exactly the attention MustDrop's stage 2 reads.
  The probabilities are computed from q/k forward hooks for those rows only; the model runs sdpa.
- Name pointers (--w-name, at --name-layer 0, below the look-up layers): the same supervised heads
  of each row from the last attribute word on attend to the words that name the object(s) to find,
  even heads the first name, odd heads the second. The look-up layers' queries then already carry
  "which object"; without them answer loss alone takes ~75 minutes to find that binding, and
  position questions stay at chance until it is found.
- Question mix (--type-weights): position questions, the slowest to learn, are drawn most often;
  existence questions, learnt first, least.
- CLS attention supervision: in the last vision layer, the CLS query's head-mean attention is
  pulled toward all object patches, which is what MustDrop's stage 1b key set reads.
- The phase-1 auxiliary losses continue (heads discarded at save).
- Token-dropping augmentation: a share of batches leave out most background tokens (object tokens
  are mostly kept), with positions compacted or not, so answers survive pruning; dropping is
  total at first (only object tokens: a curriculum that lets the answer rows find the question
  words and the objects among few distractors) and background tokens are phased in over the
  budget; dropped tokens are physically removed, so those steps are also cheaper.
- Merged batches (--merge-share): after the background ramp, that share of the undropped batches
  runs MustDrop's own stage 1a merge (mustdrop.stages.local_spatial_merge, at the adapter's hook
  point) in the vision tower, so the decoder learns to read merged 3 x 3 windows. Without it the
  64 preset kept 88.9% of unpruned accuracy, lost mostly to merging; with 0.5 it keeps 93.6%.
The saved model is a stock LlavaForConditionalGeneration checkpoint; checkpoints are written every
time the validation score improves (unpruned accuracy; with --merge-share the mean of unpruned and
merged accuracy), so a usable model exists even if the run is cut short.
--device cuda (with --max-steps for a step-based schedule) exists for recipe search on a GPU; the
shipped model is trained on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from analysis.packing import N_IMG, PromptCache, pack
from analysis.toy_model import MUSTDROP_DEFAULTS, build_model, pixel_values, save
from analysis.toyworld import (COLOR_NAMES, GRID, PATCH_SIZE, QUESTION_TYPES, SHAPES, generate_scene,
                               make_sample, scene_questions, scene_seed)
from mustdrop.hooks import hidden_states_of, with_hidden_states
from mustdrop.stages import cls_key_score, local_spatial_merge


class QKRecorder:
    """Forward hooks that keep the q_proj / k_proj outputs of chosen attention modules."""

    def __init__(self, attns):
        self.store: dict[int, dict[str, torch.Tensor]] = {}
        self.handles = []
        for i, attn in enumerate(attns):
            self.store[i] = {}
            for name in ("q_proj", "k_proj"):
                h = getattr(attn, name).register_forward_hook(self._hook(i, name))
                self.handles.append(h)

    def _hook(self, i, name):
        def fn(module, args, output):
            self.store[i][name] = output
        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


def patch_labels(scenes) -> dict[str, torch.Tensor]:
    """Per-patch targets for the auxiliary heads: colour, shape, centre flag (B, 576)."""
    B = len(scenes)
    color = np.zeros((B, N_IMG), np.int64)
    shape = np.zeros((B, N_IMG), np.int64)
    centre = np.zeros((B, N_IMG), np.float32)
    for b, sc in enumerate(scenes):
        cov = np.stack([o.patch_mask.reshape(-1) for o in sc.objects])
        best, arg = cov.max(0), cov.argmax(0)
        cidx = np.array([COLOR_NAMES.index(o.color) + 1 for o in sc.objects])
        sidx = np.array([SHAPES.index(o.shape) + 1 for o in sc.objects])
        color[b] = np.where(best >= 0.3, cidx[arg], np.where(best > 0, -100, 0))
        shape[b] = np.where(best >= 0.3, sidx[arg], np.where(best > 0, -100, 0))
        for o in sc.objects:
            cx, cy = o.center
            centre[b, int(cy // 14) * GRID + int(cx // 14)] = 1.0
    return {"color": torch.from_numpy(color), "shape": torch.from_numpy(shape),
            "centre": torch.from_numpy(centre)}


def image_tokens(model, images: np.ndarray, dev) -> torch.Tensor:
    """The projected image tokens the decoder receives, (B, 576, d), with gradients."""
    m = model.model
    vis = m.vision_tower(pixel_values(images).to(dev), output_hidden_states=True)
    return m.multi_modal_projector(vis.hidden_states[-2][:, 1:])


def merged_image_tokens(model, images: np.ndarray, dev, threshold: float, window: int = 3):
    """The projected image tokens after MustDrop's stage 1a, image by image, with gradients: the
    library's own merge (mustdrop.stages.local_spatial_merge) on the output of vision layer 0, at the
    hook point the adapter uses. Returns the tokens padded to (B, max N0, d) and each image's groups
    (N0, window^2), the patch ids every token covers, in the order the decoder receives them."""
    layer1 = model.model.vision_tower.encoder.layers[1]
    tokens, groups = [], []
    for im in images:
        box = {}

        def merge(module, args, kwargs):
            res = local_spatial_merge(hidden_states_of(args, kwargs)[0], GRID, window, threshold)
            box["groups"] = res.groups
            return None if res.merged_windows.numel() == 0 else with_hidden_states(args, kwargs, res.tokens[None])

        handle = layer1.register_forward_pre_hook(merge, with_kwargs=True)
        try:
            tokens.append(image_tokens(model, im[None], dev)[0])
        finally:
            handle.remove()
        groups.append(box["groups"].cpu().numpy())
    n = max(t.shape[0] for t in tokens)
    padded = torch.stack([F.pad(t, (0, 0, 0, n - t.shape[0])) for t in tokens])
    return padded, groups


def object_means(img: torch.Tensor, scenes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coverage-weighted mean of each object's tokens, (n_objects, d), its shape ids and its centre
    as (row, col) in patch units / (GRID - 1), the convention of the per-patch position target:
    what an attention head spread over the object reads, and what it should find there."""
    w, b_idx, y, c = [], [], [], []
    for b, sc in enumerate(scenes):
        for ob in sc.objects:
            w.append(ob.patch_mask.reshape(-1)); b_idx.append(b); y.append(SHAPES.index(ob.shape))
            cx, cy = ob.center
            c.append(((cy - PATCH_SIZE / 2) / PATCH_SIZE / (GRID - 1),
                      (cx - PATCH_SIZE / 2) / PATCH_SIZE / (GRID - 1)))
    w = torch.from_numpy(np.stack(w)).to(img.device)
    pooled = (w[:, :, None] * img[torch.tensor(b_idx, device=img.device)]).sum(1) / w.sum(1, keepdim=True)
    return (pooled, torch.tensor(y, device=img.device),
            torch.tensor(c, dtype=torch.float32, device=img.device))


def position_code(n_rows: int, n_cols: int, dim: int) -> torch.Tensor:
    """A 2-D sin-cos code of each patch's grid position, (n_rows * n_cols, dim), row-major: half the
    channels for the row, half for the column, frequencies spaced geometrically from a half wave
    across the grid (monotone, so linear in position to first order) to a period of 4 patches.

    Used to initialise the CLIP tower's (trainable) patch position embeddings, as MAE does with its
    fixed 2-D sin-cos table. Left at CLIP's N(0, 0.02) they are about 100x smaller than the patch
    content, and position never reaches the object tokens (pooled centre R^2 0.05 in x, 0.00 in y,
    analysis.probe_position on a checkpoint trained without this table), which keeps relative-position
    questions at chance.
    """
    n_freq = dim // 4
    omega = torch.logspace(math.log10(math.pi / n_cols), math.log10(math.pi / 2), n_freq)
    rows = torch.arange(n_rows, dtype=torch.float32).repeat_interleave(n_cols)
    cols = torch.arange(n_cols, dtype=torch.float32).repeat(n_rows)
    parts = []
    for coord in (rows, cols):
        ang = coord[:, None] * omega[None]
        parts += [torch.sin(ang), torch.cos(ang)]
    return torch.cat(parts, dim=1)


def init_position_embeddings(model, images: np.ndarray, scale: float) -> None:
    """Overwrite the vision tower's patch position embeddings (not the CLS one) with
    `position_code`, scaled so its per-channel std is `scale` times that of the patch embedding's
    output on `images`: position then starts as strong as content."""
    emb = model.model.vision_tower.embeddings
    with torch.no_grad():
        content = emb.patch_embedding(pixel_values(images).to(emb.patch_embedding.weight.device))
        code = position_code(GRID, GRID, emb.position_embedding.weight.shape[1])
        code = code / code.std() * content.std() * scale
        emb.position_embedding.weight[1:] = code.to(emb.position_embedding.weight)


def r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Coefficient of determination over all entries, per column then averaged."""
    ss_res = ((pred - target) ** 2).sum(0)
    ss_tot = ((target - target.mean(0)) ** 2).sum(0).clamp_min(1e-9)
    return float((1 - ss_res / ss_tot).mean())


class RunningMeans:
    """Per-key means of step statistics between two log lines."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add(self, stats: dict) -> None:
        for k, v in stats.items():
            self.values.setdefault(k, []).append(v)

    def flush(self) -> str:
        line = " ".join(f"{k} {np.mean(v):.3f}" for k, v in self.values.items())
        self.values = {}
        return line


class Trainer:
    def __init__(self, args):
        self.args = args
        self.dev = torch.device(args.device)
        self.model, self.processor = build_model(args.seed, text_width=args.text_width,
                                                 text_heads=args.text_heads)
        self.model.to(self.dev)
        self.cache = PromptCache(self.processor)
        lm = self.model.model.language_model
        self.lm = lm
        self.sup_layers = list(MUSTDROP_DEFAULTS["prune_layers"])
        self.text_rec = QKRecorder([lm.layers[i].self_attn for i in self.sup_layers])
        self.name_rec = QKRecorder([lm.layers[args.name_layer].self_attn]) if args.w_name > 0 else None
        self.vis_rec = QKRecorder([self.model.model.vision_tower.encoder.layers[-1].self_attn])
        d = self.model.config.text_config.hidden_size
        self.aux = torch.nn.Linear(d, 7 + 5 + 1 + 2).to(self.dev)
        # Reads (dx, dy) of the two named objects off the answer row of position questions.
        self.offset_head = torch.nn.Linear(d, 2).to(self.dev)
        torch.manual_seed(args.seed)
        if args.pos_init > 0:
            probe = np.stack([generate_scene(scene_seed("train", i)).image for i in range(8)])
            init_position_embeddings(self.model, probe, args.pos_init)
        params = (list(self.model.parameters()) + list(self.aux.parameters())
                  + list(self.offset_head.parameters()))
        self.opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
        self.rng = np.random.default_rng(args.seed)
        self.type_weights = parse_type_weights(args.type_weights)
        self.train_index = 0
        pos = np.stack(np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij"), -1).reshape(-1, 2)
        self.patch_pos = torch.from_numpy(pos / (GRID - 1)).float().to(self.dev)

    # ---- data -------------------------------------------------------------------------------
    def train_batch(self, frac: float):
        """Scenes, question blocks, per-image keep masks and compaction flags, and whether the batch
        goes through stage 1a merging instead (only after the background ramp, --merge-share of the
        batches that drop nothing)."""
        a = self.args
        scenes, blocks, keeps, compact = [], [], [], []
        # Curriculum: object tokens only at first, background tokens phased in from 15% to 60% of
        # the budget; after that a share of batches stays dropped as pruning augmentation.
        ramp = min(1.0, max(0.0, (frac - a.ramp_start) / (a.ramp_end - a.ramp_start)))
        p_drop = 1.0 - (1.0 - a.drop_late) * ramp
        keep_max = a.keep_early + (a.drop_keep_max - a.keep_early) * ramp
        drop = self.rng.random() < p_drop  # per batch: a dropped batch is physically shorter
        for _ in range(a.batch):
            sc = generate_scene(scene_seed("train", self.train_index))
            self.train_index += 1
            qs = scene_questions(sc, a.k, self.rng, self.type_weights)
            scenes.append(sc)
            blocks.append([self.cache.block(sc, q) for q in qs])
            if drop:
                on_obj = sc.union_patch_mask().reshape(-1) > 0
                f = self.rng.uniform(0.0, keep_max)
                keep = np.where(on_obj, self.rng.random(N_IMG) < 0.95, self.rng.random(N_IMG) < f)
                keeps.append(keep)
                compact.append(bool(self.rng.random() < 0.5))
            else:
                keeps.append(None)
                compact.append(False)
        merge = bool(a.merge_share > 0 and not drop and frac >= a.ramp_end and self.rng.random() < a.merge_share)
        return scenes, blocks, keeps, compact, merge

    # ---- model ------------------------------------------------------------------------------
    def forward(self, images: np.ndarray, pk, with_aux: bool = True, img: torch.Tensor | None = None):
        if img is None:
            img = image_tokens(self.model, images, self.dev)
        P = len(self.cache.prefix)
        V = pk.img_index.shape[1]
        slots = torch.gather(img, 1, pk.img_index[..., None].expand(-1, -1, img.shape[-1]))
        emb = self.lm.embed_tokens(pk.embeds_ids)
        emb = torch.cat([emb[:, :P], slots, emb[:, P + V:]], dim=1)
        deep = bool(self.args.deep_layers) and self.model.training
        out = self.lm(inputs_embeds=emb, attention_mask=pk.mask, position_ids=pk.position_ids,
                      use_cache=False, output_hidden_states=deep)
        h = out.last_hidden_state
        head = self.model.lm_head
        rows = (pk.answer_rows[:, 0], pk.answer_rows[:, 1])
        self.answer_hidden = h[rows]
        ans_logits = head(self.answer_hidden)
        eos_logits = head(h[pk.eos_rows[:, 0], pk.eos_rows[:, 1]])
        # Deep supervision: the answer read out (through the final norm and the tied head) from
        # intermediate layers, so the look-up circuit gets a short gradient path early on.
        self.deep_logits = ([head(self.lm.norm(out.hidden_states[i][rows])) for i in self.args.deep_layers]
                            if deep else [])
        return img, emb, ans_logits, eos_logits

    def head_scores(self, qk: dict, pk, b: int, rows: torch.Tensor, rope) -> torch.Tensor:
        """Masked pre-softmax attention scores (Hs, R, L) of the --sup-heads supervised heads for the
        given rows of sample b, from the q_proj / k_proj outputs a QKRecorder kept: the model runs
        sdpa, and only these rows' probabilities are needed."""
        cfg = self.model.config.text_config
        H, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        Hs = self.args.sup_heads
        cos, sin = rope
        L = qk["k_proj"].shape[1]
        q = qk["q_proj"][b, rows].view(-1, H, hd)[:, :Hs].transpose(0, 1)[None]  # (1,Hs,R,hd)
        k = qk["k_proj"][b].view(L, H, hd)[:, :Hs].transpose(0, 1)[None]         # (1,Hs,L,hd)
        q, _ = apply_rotary_pos_emb(q, q, cos[b:b + 1, rows], sin[b:b + 1, rows])
        _, k = apply_rotary_pos_emb(k, k, cos[b:b + 1], sin[b:b + 1])
        s = (q @ k.transpose(-1, -2))[0] * hd ** -0.5
        return s.masked_fill(~pk.mask[b, 0, rows][None], float("-inf"))

    def text_attention_loss(self, emb, pk) -> torch.Tensor:
        Hs = self.args.sup_heads
        rope = self.lm.rotary_emb(emb, pk.position_ids)
        per_head = self.args.per_head
        P = len(self.cache.prefix)
        V = pk.img_index.shape[1]
        losses = []
        for li in range(len(self.sup_layers)):
            for b in range(len(pk.sup_rows)):
                s = self.head_scores(self.text_rec.store[li], pk, b, pk.sup_rows[b], rope)
                if per_head:
                    # Each supervised head has its own target: even heads the first named object,
                    # odd heads the second (the same object unless the question names two).
                    p = s.softmax(-1)[:, :, P:P + V]                          # (Hs,R,V)
                    t = pk.sup_targets[b][:, 1 + torch.arange(Hs, device=p.device) % 2].transpose(0, 1)
                    ce = -(t * torch.log(p + 1e-6)).sum(-1).mean(0)
                else:
                    p = s.softmax(-1).mean(0)[:, P:P + V]                    # (R,V)
                    ce = -(pk.sup_targets[b][:, 0] * torch.log(p + 1e-6)).sum(-1)
                losses.append((ce * pk.sup_weights[b]).sum() / pk.sup_weights[b].sum())
        return torch.stack(losses).mean()

    def name_attention_loss(self, emb, pk) -> torch.Tensor:
        """Text->text pointer supervision at --name-layer (below the image look-up layers): the
        supervised heads of each prompt row from the last attribute word on attend to the words
        naming the object(s) the row must find, even heads the first name, odd heads the second
        (the same words unless the question names two objects). This hands the image look-up
        layers a query that already says which object, the binding that answer loss alone takes
        ~75 minutes to find for position questions."""
        Hs = self.args.sup_heads
        rope = self.lm.rotary_emb(emb, pk.position_ids)
        losses = []
        for b in range(len(pk.sup_rows)):
            sel = pk.name_weights[b] > 0
            if not bool(sel.any()):
                continue
            s = self.head_scores(self.name_rec.store[0], pk, b, pk.sup_rows[b][sel], rope)
            logp = s.log_softmax(-1).clamp_min(-30.0)
            t = pk.name_targets[b][sel][:, torch.arange(Hs, device=s.device) % 2].transpose(0, 1)
            losses.append(-(t * logp).sum(-1).mean())
        if not losses:
            return emb.sum() * 0.0
        return torch.stack(losses).mean()

    def cls_attention_loss(self, scenes) -> torch.Tensor:
        cfg = self.model.config.vision_config
        H, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        rec = self.vis_rec.store[0]
        # the score stage 1b ranks the key set by at inference (adapters call the same function)
        p = cls_key_score(rec["q_proj"], rec["k_proj"], H, hd ** -0.5).mean(1)      # (B,576)
        t = np.stack([sc.union_patch_mask().reshape(-1) for sc in scenes])
        t = torch.from_numpy(t / t.sum(1, keepdims=True)).to(p.device)
        return -(t * torch.log(p + 1e-6)).sum(-1).mean()

    def aux_loss(self, img, scenes) -> tuple[torch.Tensor, dict]:
        """Auxiliary losses on the projected image tokens; also returns the pooled shape accuracy
        and the pooled centre R^2.

        Colour, object centre and patch position are per patch. Shape is per OBJECT: the
        coverage-weighted mean of the object's tokens must name its shape, which is exactly what an
        attention head spread over the object reads. A per-patch shape target would ask interior
        patches (flat colour) for something only the outline shows; measured, it keeps the tower
        at chance for thousands of steps, while the pooled target takes off after about 2000.
        The object's centre is read by the same linear head from the pooled tokens (weighted by
        --w-pos, like the per-patch position): relative-position answers need it there.
        """
        lab = {k: v.to(self.dev) for k, v in patch_labels(scenes).items()}
        o = self.aux(img)
        lc = F.cross_entropy(o[..., :7].reshape(-1, 7), lab["color"].reshape(-1), ignore_index=-100)
        lz = F.binary_cross_entropy_with_logits(o[..., 12], lab["centre"],
                                                pos_weight=torch.tensor(20.0, device=self.dev))
        lp = F.mse_loss(o[..., 13:15], self.patch_pos.expand(len(scenes), -1, -1))
        pooled, y, centre = object_means(img, scenes)
        po = self.aux(pooled)
        logits = po[:, 8:12]
        ls = F.cross_entropy(logits, y)
        lcen = F.mse_loss(po[:, 13:15], centre)
        loss = lc + ls + 0.5 * lz + self.args.w_pos * (lp + lcen)
        return loss, {"shape_acc": (logits.argmax(-1) == y).float().mean().item(),
                      "centre_r2": r2(po[:, 13:15].detach(), centre)}

    def offset_loss(self, pk) -> torch.Tensor:
        """MSE of (dx, dy) / 100 px between the two named objects, read linearly off the answer row
        of each position question: a dense signal for the comparison that the one-word answer
        (left/right/above/below) teaches only through its sign."""
        sel = ~torch.isnan(pk.answer_offsets[:, 0])
        if not bool(sel.any()):
            return self.answer_hidden.sum() * 0.0
        pred = self.offset_head(self.answer_hidden[sel])
        return F.mse_loss(pred, pk.answer_offsets[sel] / 100.0)

    def vision_step(self, step: int) -> dict:
        """Phase 1: the vision tower and projector alone, on the auxiliary and CLS losses (3-4x
        cheaper than a joint step), until object shape is readable from the pooled tokens."""
        a = self.args
        scenes = [generate_scene(scene_seed("train", self.train_index + i)) for i in range(a.batch)]
        self.train_index += a.batch
        img = image_tokens(self.model, np.stack([sc.image for sc in scenes]), self.dev)
        l_aux, aux_stats = self.aux_loss(img, scenes)
        l_cls = self.cls_attention_loss(scenes)
        loss = a.w_aux * l_aux + a.w_cls * l_cls
        for g in self.opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / a.warmup)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 2.0)
        self.opt.step()
        return {"aux": l_aux.item(), "cls": l_cls.item(), **aux_stats}

    # ---- loop -------------------------------------------------------------------------------
    def lr_at(self, step: int, frac: float) -> float:
        warm = min(1.0, (step + 1) / self.args.warmup)
        return self.args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    def packed(self, scenes, blocks, merge: bool, keeps=None, compact=None):
        """(images, packed batch on the device, image tokens): with merge, the tokens stage 1a
        leaves and a batch laid out on them; else None, and forward computes all 576."""
        images = np.stack([sc.image for sc in scenes])
        if merge:
            img, groups = merged_image_tokens(self.model, images, self.dev, self.args.merge_threshold)
            return images, to_device(pack(self.cache, scenes, blocks, groups=groups), self.dev), img
        return images, to_device(pack(self.cache, scenes, blocks, keeps, compact), self.dev), None

    def step(self, frac: float, step: int) -> dict:
        a = self.args
        scenes, blocks, keeps, compact, merge = self.train_batch(frac)
        images, pk, merged = self.packed(scenes, blocks, merge, keeps, compact)
        img, emb, ans_logits, eos_logits = self.forward(images, pk, img=merged)
        l_ans = F.cross_entropy(ans_logits, pk.answer_ids)
        l_eos = F.cross_entropy(eos_logits, torch.full_like(pk.answer_ids, self.processor.tokenizer.eos_token_id))
        l_att = self.text_attention_loss(emb, pk)
        if merge:
            # The per-patch targets and the CLS target are laid out on the 576 unmerged patches.
            l_cls = l_aux = l_ans * 0.0
            aux_stats = {}
        else:
            l_cls = self.cls_attention_loss(scenes)
            l_aux, aux_stats = self.aux_loss(img, scenes)
        l_off = self.offset_loss(pk)
        l_name = self.name_attention_loss(emb, pk) if self.name_rec else l_off * 0.0
        loss = (l_ans + 0.5 * l_eos + a.w_att * l_att + a.w_cls * l_cls + a.w_aux * l_aux
                + a.w_offset * l_off + a.w_name * l_name)
        if self.deep_logits:
            l_deep = torch.stack([F.cross_entropy(lg, pk.answer_ids) for lg in self.deep_logits]).mean()
            loss = loss + a.w_deep * l_deep
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(step, frac)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 2.0)
        self.opt.step()
        hits = (ans_logits.argmax(-1) == pk.answer_ids).float().cpu()
        out = {"loss": loss.item(), "ans": l_ans.item(), "eos": l_eos.item(), "att": l_att.item(),
               "cls": l_cls.item(), "aux": l_aux.item(), "offset": l_off.item(), "name": l_name.item(),
               "acc": hits.mean().item(), **aux_stats}
        pos = torch.tensor([t == "position" for t in pk.qtypes])
        if bool(pos.any()):
            out["pos_acc"] = hits[pos].mean().item()
        if merge:
            out["merged_acc"] = hits.mean().item()
        return out

    @torch.no_grad()
    def validate(self, val, merged: bool = False) -> dict:
        """Greedy first-token accuracy on fixed validation questions (one question per image); with
        merged=True the decoder reads the image tokens left by stage 1a merging instead."""
        self.model.eval()
        correct: dict[str, list[int]] = {t: [] for t in QUESTION_TYPES}
        bs = 25
        for i in range(0, len(val), bs):
            chunk = val[i:i + bs]
            images, pk, img = self.packed([s.scene for s in chunk], [[s.block] for s in chunk], merged)
            _, _, logits, eos_logits = self.forward(images, pk, img=img)
            ok = (logits.argmax(-1) == pk.answer_ids).tolist()
            for t, o in zip(pk.qtypes, ok):
                correct[t].append(int(o))
        self.model.train()
        per = {t: float(np.mean(v)) for t, v in correct.items() if v}
        per["all"] = float(np.mean([o for v in correct.values() for o in v]))
        return per


def parse_type_weights(spec: str) -> dict[str, float] | None:
    """'color=1,position=3' -> {'color': 1.0, 'position': 3.0}; '' -> None (uniform)."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in QUESTION_TYPES:
            raise ValueError(f"--type-weights wants type=weight pairs over {QUESTION_TYPES}, got {part!r}")
        out[name.strip()] = float(value)
    return out


def to_device(pk, dev):
    """The packed batch with every tensor (also inside lists) on `dev`."""
    if dev.type == "cpu":
        return pk
    for name, v in vars(pk).items():
        if torch.is_tensor(v):
            setattr(pk, name, v.to(dev, non_blocking=True))
        elif isinstance(v, list) and v and torch.is_tensor(v[0]):
            setattr(pk, name, [x.to(dev, non_blocking=True) for x in v])
    return pk


class ValSample:
    def __init__(self, sample, cache):
        self.scene = sample.scene
        from analysis.toyworld import Question
        self.block = cache.block(sample.scene, Question(sample.qtype, sample.question, sample.answer,
                                                        sample.targets))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="assets/toy-llava")
    ap.add_argument("--minutes", type=float, default=85.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", default="runs/train_toy.log")
    ap.add_argument("--batch", type=int, default=6, help="images per step")
    ap.add_argument("--k", type=int, default=8, help="questions packed per image")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--w-att", type=float, default=1.5)
    ap.add_argument("--sup-heads", type=int, default=2,
                    help="decoder heads whose attention is supervised (the others stay free)")
    ap.add_argument("--w-cls", type=float, default=0.3)
    ap.add_argument("--w-aux", type=float, default=1.0)
    ap.add_argument("--w-pos", type=float, default=10.0,
                    help="weight of the per-patch position and pooled object-centre regressions")
    ap.add_argument("--w-offset", type=float, default=1.0,
                    help="weight of the (dx, dy) readout at the answer row of position questions")
    ap.add_argument("--pos-init", type=float, default=1.0,
                    help="initialise patch position embeddings with a 2-D sin-cos code at this "
                         "multiple of the patch content's std (0 = CLIP's random init)")
    ap.add_argument("--keep-early", type=float, default=0.05,
                    help="at the start a dropped image keeps at most this share of background tokens")
    ap.add_argument("--drop-keep-max", type=float, default=0.5,
                    help="after the ramp a dropped image keeps a U(0, this) share of background tokens")
    ap.add_argument("--drop-late", type=float, default=0.3, help="share of dropped batches after the ramp")
    ap.add_argument("--ramp-start", type=float, default=0.15, help="budget fraction where background phases in")
    ap.add_argument("--ramp-end", type=float, default=0.6)
    ap.add_argument("--val-n", type=int, default=150)
    ap.add_argument("--val-every", type=float, default=6.0, help="minutes between validations")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (the shipped model) or cuda for recipe search")
    ap.add_argument("--max-steps", type=int, default=0,
                    help="stop after this many steps and run the schedule by steps, not minutes (0 = off)")
    ap.add_argument("--val-every-steps", type=int, default=0, help="validate every N steps instead of minutes")
    ap.add_argument("--per-head", action=argparse.BooleanOptionalAction, default=True,
                    help="supervise each head on its own target (position questions: one head per object)")
    ap.add_argument("--w-name", type=float, default=1.0,
                    help="weight of the text->text pointer supervision toward the named objects' words")
    ap.add_argument("--name-layer", type=int, default=0,
                    help="decoder layer whose supervised heads point at the name words")
    ap.add_argument("--type-weights", default="color=1,shape=1,exists=0.5,count=1.5,position=3",
                    help="question-type draw weights for training ('' = uniform); position questions "
                         "are the slowest to learn, existence the fastest")
    ap.add_argument("--merge-share", type=float, default=0.5,
                    help="after the background ramp, this share of the undropped batches goes through "
                         "MustDrop's stage 1a merge (the library's function), so the decoder learns to "
                         "read merged windows (0 = off: the decoder never sees a merged window)")
    ap.add_argument("--merge-threshold", type=float, default=0.8,
                    help="stage 1a similarity threshold used by --merge-share (the authors' 0.8)")
    ap.add_argument("--deep-layers", type=int, nargs="*", default=[],
                    help="also read the answer out of these decoder layers' hidden states")
    ap.add_argument("--w-deep", type=float, default=0.5)
    ap.add_argument("--text-width", type=int, default=128)
    ap.add_argument("--text-heads", type=int, default=4)
    ap.add_argument("--vision-minutes", type=float, default=16.0,
                    help="phase 1 (vision tower alone) lasts at most this long ...")
    ap.add_argument("--vision-target", type=float, default=0.93,
                    help="... or until pooled shape accuracy over the last 100 steps reaches this")
    ap.add_argument("--centre-target", type=float, default=0.85,
                    help="... and pooled object-centre R^2 over the last 100 steps reaches this")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)

    torch.set_num_threads(args.threads)
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    logf = open(args.log, "a", buffering=1)

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")

    log(f"args {json.dumps(vars(args))}")
    tr = Trainer(args)
    n_params = sum(p.numel() for p in tr.model.parameters())
    log(f"model params {n_params / 1e6:.2f}M")
    val = [ValSample(make_sample("val", i), tr.cache) for i in range(args.val_n)]
    out = Path(args.out)
    budget = args.minutes * 60
    t0 = time.time()
    best, curve, step = -1.0, [], 0
    stats = RunningMeans()

    vstep, recent, recent_r2, last_val = 0, [], [], -1
    while time.time() - t0 < min(args.vision_minutes * 60, budget):
        s = tr.vision_step(vstep)
        vstep += 1
        recent = (recent + [s["shape_acc"]])[-100:]
        recent_r2 = (recent_r2 + [s["centre_r2"]])[-100:]
        stats.add(s)
        if vstep % 50 == 0:
            log(f"vision step {vstep} t {(time.time() - t0) / 60:.1f}m {stats.flush()} "
                f"shape_acc_100 {np.mean(recent):.3f} centre_r2_100 {np.mean(recent_r2):.3f}")
        if (len(recent) == 100 and np.mean(recent) >= args.vision_target
                and np.mean(recent_r2) >= args.centre_target):
            break
    t_joint = time.time()
    joint_budget = budget - (t_joint - t0)
    stats = RunningMeans()
    next_val = (t_joint - t0) + args.val_every * 60
    log(f"vision phase done: {vstep} steps, {(t_joint - t0) / 60:.1f}m, shape_acc_100 {np.mean(recent or [0]):.3f} "
        f"centre_r2_100 {np.mean(recent_r2 or [0]):.3f}")

    def progress() -> float:
        """Joint-phase schedule position in [0, 1]: by steps when --max-steps is set, else by wall clock."""
        if args.max_steps:
            return step / args.max_steps
        return (time.time() - t_joint) / joint_budget

    while True:
        elapsed = time.time() - t0
        if elapsed >= budget or (args.max_steps and step >= args.max_steps):
            break
        stats.add(tr.step(progress(), step))
        step += 1
        if step % 20 == 0:
            log(f"step {step} t {elapsed / 60:.1f}m lr {tr.lr_at(step, progress()):.2e} {stats.flush()} "
                f"s/step {(time.time() - t_joint) / step:.2f}")
        due = (step % args.val_every_steps == 0) if args.val_every_steps else time.time() - t0 >= next_val
        if due:
            next_val += args.val_every * 60
            best = _validate_and_save(tr, val, out, step, t0, best, curve, log)
            last_val = step
    if last_val != step:
        best = _validate_and_save(tr, val, out, step, t0, best, curve, log)
    log(f"done steps {step} best val score {best:.3f}")


def _validate_and_save(tr, val, out, step, t0, best, curve, log) -> float:
    """Validate, log, and keep the checkpoint when its selection score strictly improves. The score
    is unpruned accuracy; with --merge-share it is the mean of unpruned and stage-1a-merged accuracy,
    so the kept checkpoint is the one that reads both kinds of image token best."""
    v = tr.validate(val)
    minutes = (time.time() - t0) / 60
    row = {"step": step, "minutes": round(minutes, 2), **{k: round(x, 4) for k, x in v.items()}}
    score = v["all"]
    if tr.args.merge_share > 0:
        vm = tr.validate(val, merged=True)
        row.update({f"merged_{k}": round(x, 4) for k, x in vm.items()})
        score = (v["all"] + vm["all"]) / 2
    row["score"] = round(score, 4)
    curve.append(row)
    log(f"VAL step {step} t {minutes:.1f}m acc {v['all']:.3f} "
        + " ".join(f"{k} {x:.2f}" for k, x in v.items() if k != "all")
        + (f" merged_acc {row['merged_all']:.3f} score {score:.3f}" if "merged_all" in row else ""))
    if score > best:
        best = score
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        save(tr.model, tr.processor, tmp)
        out.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        tmp.rmdir()
        log(f"saved {out} (val {best:.3f})")
    (out.parent / (out.name + ".curve.json")).write_text(json.dumps(curve, indent=1))
    return best


if __name__ == "__main__":
    main()
