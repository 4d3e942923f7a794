"""Qwen2-VL and Qwen2.5-VL (transformers' Qwen2VLForConditionalGeneration and
Qwen2_5_VLForConditionalGeneration), hooks only: dynamic resolution, one (rows, cols) patch grid per image,
each LLM token a 2 x 2 block of patches (the merger), 3-D rotary positions (M-RoPE) in the decoder.

Where each stage sits (the reasons are in :mod:`.qwen_vl_geometry`, with the pure functions):
- 1a local spatial merge: on the LLM token grid, after the tower (its output features merged by window);
- 1b key token set: mean attention received in the tower's last block (no CLS token), from forward hooks
  on that block's attention (its qkv output, its sequence boundaries and rotary tables); Qwen2.5-VL's
  window order is undone before the score is read per token;
- stage 2 and 3: the shared machinery; the prefill gets the M-RoPE ids this host lays out (merged tokens
  at their window centre), and decoding continues on the diagonal after the prompt's last position.
``positions="reference"`` is refused (3-D positions have no compaction). A method selecting before the
LLM (FasterVLM, a plug-in) gets the merger's tokens on their rows x cols grid, scored by the received
attention; one that requires a square grid or a one-token projector (pooling, VisionZip: their
``requires``) is refused with its reason and this host's.

The processor is the torchvision-free one of :mod:`mustdrop.adapters.processors` (images only).
"""

from __future__ import annotations

import sys

import torch

from .. import methods, stages
from ..hooks import HookSet, attached
from ..loading import ModelLoadError
from . import qwen_vl_geometry as geo
from .base import Host, VisionResult

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


class QwenVLHost(Host):
    family = "qwen_vl"
    label = "Qwen2-VL / Qwen2.5-VL"
    layout = "single"
    has_cls = False
    position_modes = ("original",)
    vision_lacks = {
        "square_grid": "a Qwen image's token grid is rows x cols (dynamic resolution), each token 2 x 2 patches",
        "vision_hidden": "the Qwen merger folds each 2 x 2 block of patches into one token and is the projector: "
                         "no state maps to one LLM token on its own",
    }

    def __init__(self, model, processor):
        if model.config.model_type not in MODEL_TYPES:
            raise ModelLoadError(f"the Qwen-VL host runs model types {MODEL_TYPES}, not {model.config.model_type!r}")
        super().__init__(model, processor)
        vc = self.vision_config
        self.visual = model.model.visual
        self.vision_layers = self.visual.blocks
        self.patch = int(vc.patch_size)
        self.merge = int(vc.spatial_merge_size)
        self.image_token_id = model.config.image_token_id
        self.windowed = model.config.model_type == "qwen2_5_vl"
        self.grid = None                      # per image (dynamic resolution): see crops[0]["grid"]
        # A host serves one run at a time (its hooks sit on the one model): what the run's decode and
        # trace need of its image is kept here between encode / prefill_kwargs and decode / vision_meta.
        self._positions = None                # (next position, L0) of the run in progress
        self._grid_seen = None                # (rows, cols) of its image

    # ------------------------------------------------------------------ checks and inputs
    def check(self, config) -> None:
        if config.positions == "reference" and config.enabled:
            raise ValueError(geo.REFERENCE_POSITIONS_REFUSED)
        self.refuse_method(config)
        if config.merge:
            geo.check_window_size(config.window)        # the grid is per image: checked in encode
        if config.filter and not (config.method == "pdrop" and not config.prune_layers):
            if not config.prune_layers:
                raise ValueError("stage 2 is on but no prune layer is given: name at least one, or switch stage 2 off")
            stages.check_prune_layers(config.prune_layers, self.num_layers)

    def num_images(self, inputs) -> int:
        return int(inputs["image_grid_thw"].shape[0])

    def inputs(self, img, question):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = self.processor(images=img, text=prompt, return_tensors="pt")
        device = self.model.device
        return {"input_ids": inputs["input_ids"],
                "pixel_values": inputs["pixel_values"].to(device=device, dtype=self.visual.dtype),
                "image_grid_thw": inputs["image_grid_thw"].to(device)}, prompt

    def vision_meta(self) -> dict:
        """The tower's record; grid and image_size are the run's image's (dynamic resolution): the longer
        side of its patch grid and of its processed pixels (each crop's [rows, cols] is in crops)."""
        vc = self.vision_config
        ip = self.processor.image_processor
        rows, cols = self._grid_seen or (0, 0)
        return {"image_size": max(rows, cols) * self.patch, "patch_size": self.patch, "grid": max(rows, cols),
                "spatial_merge_size": self.merge,
                "num_layers": len(self.vision_layers), "has_cls": False, "model_type": vc.model_type,
                "min_pixels": ip.size["shortest_edge"], "max_pixels": ip.size["longest_edge"],
                "window_attention": self.windowed}

    def key_score_name(self) -> str:
        return ("mean attention received in the last vision block, from the queries of its attention "
                "segment (the image" + (", or its 112 px window" if self.windowed else "") + "), head mean, "
                "averaged over each token's patches (no CLS token: documented substitute)")

    # ------------------------------------------------------------------ stage 1
    def encode(self, inputs, img, config) -> VisionResult:
        thw = inputs["image_grid_thw"]
        t, rows, cols = (int(v) for v in thw[0].tolist())
        if t != 1:
            raise ValueError("MustDrop Lens runs still images on Qwen-VL (one temporal patch), not videos")
        from ..trace_checks import MAX_GRID, MAX_PATCHES, MAX_PROCESSED_SIDE
        side = min(MAX_GRID, MAX_PROCESSED_SIDE // self.patch)
        if max(rows, cols) > side or rows * cols > MAX_PATCHES:   # refused before the tower runs, not by the trace after it
            raise ValueError(f"this {img.width} x {img.height} image becomes a {rows} x {cols} patch grid at the "
                             f"checkpoint's max_pixels; traces hold at most {side} patches a side: use an image "
                             f"of at most {side * self.patch} px a side")
        tr, tc = geo.token_grid(rows, cols, self.merge)
        self._grid_seen = (rows, cols)
        method = methods.get(config.method)
        hooks, seen = HookSet(), {}
        want_score = method.needs_vision_score if method.selects_before_llm else config.key_set
        if want_score:
            self._hook_last_block(hooks, seen)
        with attached(hooks):
            out = self.model.model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=thw)
        features = out.pooler_output[0]                                   # (tr * tc, D), raster order
        device = features.device
        token_score = patch_score = None
        if want_score:
            patch_score, token_score = self._received_scores(seen, thw, rows, cols)
        mapping = geo.image_mapping(img.width, img.height, cols * self.patch, rows * self.patch)
        crop = {"name": "image", "grid": [rows, cols], "token_grid": [tr, tc], "mapping": mapping,
                "merged_windows": [], "window_patches": config.window * self.merge,
                "token_patches": self.merge * self.merge}
        empty = torch.zeros(0, dtype=torch.long, device=device)
        if method.selects_before_llm:
            return self._select_before_llm(method, config, features, token_score, patch_score, crop)
        similarity = None
        token_groups = torch.arange(tr * tc, device=device).unsqueeze(1)
        if config.merge:
            try:
                geo.check_window(tr, tc, config.window)
            except ValueError as e:
                raise ValueError(f"stage 1a: {e} ({img.width} x {img.height} px); use a smaller window or switch "
                                 "stage 1a off") from None
            res = geo.merge_token_windows(features, tr, tc, config.window, config.merge_threshold)
            features, token_groups, similarity = res.tokens, res.groups, res.similarity
            crop["merged_windows"] = res.merged_windows
        groups, weights = geo.expand_to_patches(token_groups, rows, cols, self.merge)
        if config.key_set:
            real = token_groups >= 0
            ts = token_score.to(device)[token_groups.clamp_min(0)] * real
            key_score = ts.sum(1) / real.sum(1)
            key_tokens = stages.key_token_set(key_score, config.key_keep_rate).to(device)
        else:
            key_score, key_tokens = None, empty
        return VisionResult(features, groups, key_tokens, key_score, empty.cpu(), [crop], [similarity],
                            weights=weights)

    def _select_before_llm(self, method, config, features, token_score, patch_score, crop) -> VisionResult:
        """A method that selects before the LLM (FasterVLM, a plug-in), on the merger's tokens: it sees
        them on their (rows/2, cols/2) grid with the received-attention score per token, and its choice
        is drawn on the 2 x 2 patches of each chosen token."""
        rows, cols = crop["grid"]
        builtin = methods.is_builtin(method.name)
        plan = methods.checked_plan(method, config.budget, features.shape[0], config, self.num_layers, builtin)
        last = len(self.vision_layers) - 1
        x = methods.VisionInputs(features, None, plan.pre_keep, config, score=token_score,
                                 vision_layer=last if method.needs_vision_score else None,
                                 grid_shape=tuple(crop["token_grid"]))
        sel = methods.checked_select_vision(method, x, builtin)
        groups, weights = geo.expand_to_patches(sel.groups, rows, cols, self.merge)
        baseline = {"plan": plan.to_dict(),
                    "params": ({"vision_layer": last} if method.needs_vision_score else {}) | dict(sel.params)}
        if sel.score is not None:      # recorded per patch: the received attention itself where that is the score
            baseline.update(score=self.key_score_name(), vision_score=patch_score if sel.score is token_score
                            else geo.token_values_on_patches(sel.score, rows, cols, self.merge))
        empty = torch.zeros(0, dtype=torch.long, device=features.device)
        return VisionResult(sel.features, groups, empty, None, empty.cpu(), [crop], [None], baseline=baseline,
                            weights=weights)

    def _hook_last_block(self, hooks, seen) -> None:
        """Keep the last block's qkv output and the sequence boundaries / rotary tables its attention got."""
        attn = self.vision_layers[-1].attn

        def keep_kwargs(module, args, kwargs):
            seen["cu_seqlens"], seen["rope"] = kwargs["cu_seqlens"], kwargs["position_embeddings"]
        hooks.pre("vision.last.attn.segments", attn, keep_kwargs)
        hooks.post("vision.last.attn.qkv", attn.qkv, lambda m, a, k, o: seen.__setitem__("qkv", o))

    def _received_scores(self, seen, thw, rows, cols):
        """Stage 1b's score: per patch (raster ids, (rows * cols,)) and per LLM token ((rows/2 * cols/2,))."""
        attn = self.vision_layers[-1].attn
        qkv = seen["qkv"]
        n = qkv.shape[0]
        q, k, _ = qkv.reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = seen["rope"]
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        q, k = rope(q, k, cos, sin)
        per_row = geo.received_attention(q, k, seen["cu_seqlens"], attn.scaling)       # the block's row order
        unit = self.merge * self.merge
        per_unit = per_row.view(-1, unit)                                              # (tokens, 4)
        if self.windowed:          # rows were permuted into windows, whole 2 x 2 units at a time
            from transformers.vision_utils import get_vision_window_index
            window_index, _ = get_vision_window_index(thw, self.merge, self.vision_config.window_size, self.patch)
            per_unit = per_unit[torch.argsort(window_index.to(per_unit.device))]
        token_score = per_unit.mean(1)
        patch_score = torch.empty(rows * cols, dtype=torch.float32, device=per_unit.device)
        patch_score[geo.token_patches(rows, cols, self.merge).to(per_unit.device).flatten()] = per_unit.flatten()
        return patch_score, token_score

    # ------------------------------------------------------------------ decoder positions
    def prefill_kwargs(self, inputs, S: int, N0: int, T: int, vision: VisionResult | None = None) -> dict:
        """The M-RoPE position ids of the prompt as the LLM gets it (the model cannot lay them out from
        embeddings), and the bookkeeping decode needs: its first position and the model's rope_deltas."""
        rows, cols = vision.crops[0]["grid"]
        tr, tc = geo.token_grid(rows, cols, self.merge)
        centres = self.token_centres(vision.groups, rows, cols)
        ids, next_position = geo.mrope_position_ids(S, T, centres, tr, tc)
        L0 = ids.shape[-1]
        self._positions = (next_position, L0)
        device = self.model.device
        self.model.model.rope_deltas = torch.tensor([[geo.rope_delta(next_position, L0)]], device=device)
        return {"position_ids": ids.to(device)}

    def token_centres(self, groups: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """(N0, 2) (row, col) of each vision token on the token grid, from the patches it covers (so that
        any selection of the block, merged or not, carries its positions with it)."""
        g = groups.cpu()
        real = g >= 0
        pr = torch.div(g.clamp_min(0), cols, rounding_mode="floor").double()
        pc = (g.clamp_min(0) % cols).double()
        n = real.sum(1).double()
        mean_r, mean_c = (pr * real).sum(1) / n, (pc * real).sum(1) / n
        half = (self.merge - 1) / 2                  # a token's patches' mean sits half a block in
        return torch.stack([(mean_r - half) / self.merge, (mean_c - half) / self.merge], dim=1)

    def decode_position_ids(self, start: int, n: int, device) -> torch.Tensor:
        if self._positions is None:
            raise RuntimeError("decode positions asked for before the prefill laid them out")
        next_position, L0 = self._positions
        return geo.decode_position_ids(next_position, start, L0, n, device)
