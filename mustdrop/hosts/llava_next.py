"""MustDrop on transformers' LlavaNextForConditionalGeneration (any-res: base image + tiles).

Two layouts of the vision block, chosen with ``layout``:

- "stock" (default): transformers' own packing — the base image's 24 x 24 tokens, then the tiles
  unpadded and laid out row by row with an ``image_newline`` token closing every row. Shortening
  inside the encoder would break that packing (it assumes 24 x 24 per tile), so stage 1a measures
  window similarity where the authors do (after vision layer 0, per crop) and merges the encoder's
  OUTPUT features of each similar window into one token at the place of its first patch (the
  encoder itself runs unmerged: a documented difference). Stage 1b ranks each crop's tokens by the
  CLS attention mass of their patches (last vision layer) and keeps ceil(rate * n) per crop. The
  newline tokens are never dropped and never drawn as patches.
- "reference": the authors' flat concatenation, the layout the published LLaVA-NeXT numbers were
  produced with: every crop merged inside the encoder with ONE merge count for all crops (the
  minimum over them), key sets per crop with per-crop offsets, crops concatenated flat without
  unpadding or newline tokens.

Every decision is mapped back to pixels of the original image through each crop's mapping.
"""

from __future__ import annotations

import math

import torch

from .. import stages
from ..loading import ModelLoadError
from ..hooks import HookSet, attached, hidden_states_of, with_hidden_states
from .base import VisionResult
from .llava import LlavaHost

LAYOUTS = ("stock", "reference")


class LlavaNextHost(LlavaHost):
    """LLaVA-NeXT: the CLIP tower and its hooks as LLaVA-1.5, several square crops, two layouts."""

    family = "llava_next"

    def __init__(self, model, processor, layout: str = "stock"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        super().__init__(model, processor)
        if not self.has_cls:
            raise ModelLoadError("LLaVA-NeXT with a tower without CLS is not supported")
        self.layout = layout
        self.pinpoints = model.config.image_grid_pinpoints

    def method_refusal(self, method) -> str | None:
        if method.selects_before_llm:
            return f"the {method.name} baseline is defined on one 24 x 24 grid; use LLaVA-1.5 models"
        return super().method_refusal(method)

    def encode(self, inputs, img, config) -> VisionResult:
        if self.layout == "reference":
            return self._encode_reference(inputs, img, config)
        return self._encode_stock(inputs, img, config)

    # ------------------------------------------------------------------ crops and their pixels
    def _crops(self, img, n_crops):
        """Each crop's name and mapping: crop pixel (u, v) = (x * sx + ox, y * sy + oy)."""
        from transformers.image_processing_utils import select_best_resolution

        size = self.vision_config.image_size
        W, H = img.width, img.height
        grid = [self.grid, self.grid]
        crops = [{"name": "base", "grid": grid, "mapping": {"kind": "resize", "scale": size / W, "scale_xy": [size / W, size / H],
                                              "offset": [0, 0], "resized": [size, size], "processed": size}}]
        bh, bw = select_best_resolution((H, W), self.pinpoints)
        scale_w, scale_h = bw / W, bh / H
        if scale_w < scale_h:   # transformers' get_patch_output_size
            new_w, new_h = bw, min(math.ceil(H * scale_w), bh)
        else:
            new_h, new_w = bh, min(math.ceil(W * scale_h), bw)
        paste_x, paste_y = (bw - new_w) // 2, (bh - new_h) // 2
        cols = bw // size
        for t in range(n_crops - 1):
            i, j = divmod(t, cols)
            crops.append({"name": f"tile {i},{j}", "tile": [i, j], "grid": list(grid),
                          "mapping": {"kind": "anyres_tile", "scale": new_w / W, "scale_xy": [new_w / W, new_h / H],
                                      "offset": [paste_x - j * size, paste_y - i * size],
                                      "resized": [new_w, new_h], "canvas": [bw, bh], "processed": size}})
        return crops

    def _pixel_crops(self, inputs):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        n = image_size_to_num_patches(image_size=inputs["image_sizes"][0], grid_pinpoints=self.pinpoints,
                                      patch_size=self.vision_config.image_size)
        return inputs["pixel_values"][0, :n]

    # ------------------------------------------------------------------ stock layout
    def _encode_stock(self, inputs, img, config) -> VisionResult:
        G, G2 = self.grid, self.grid * self.grid
        features, layer0, qk = self.packed_features(inputs, config)
        n_crops = self._pixel_crops(inputs).shape[0]
        ids = self._packed_patch_ids(inputs, n_crops).to(features.device)    # global patch id, -1 = newline
        crops = self._crops(img, n_crops)
        similarity = [None] * n_crops
        merged_windows = [[] for _ in range(n_crops)]
        keep = torch.ones(ids.numel(), dtype=torch.bool, device=features.device)
        groups = [[int(i)] if i >= 0 else [] for i in ids.tolist()]
        features = features.clone()
        if config.merge:
            win = stages.window_patch_ids(G, config.window).to(features.device)
            pos_of = torch.full((n_crops * G2,), -1, dtype=torch.long, device=features.device)
            real = ids >= 0
            pos_of[ids[real]] = torch.nonzero(real).flatten()
            for c in range(n_crops):
                sim = stages.window_similarity(layer0["h"][c, 1:], G, config.window)
                similarity[c] = sim
                for wdx in stages.windows_to_merge(sim, config.merge_threshold).tolist():
                    pos = pos_of[win[wdx] + c * G2]
                    pos = torch.sort(pos[pos >= 0]).values
                    if pos.numel() < 2:
                        continue                       # unpadded away (or one patch left): nothing to merge
                    features[pos[0]] = features[pos].float().mean(0).to(features.dtype)
                    keep[pos[1:]] = False
                    groups[int(pos[0])] = (win[wdx] + c * G2).tolist()
                    for p in pos[1:].tolist():
                        groups[p] = None
                    merged_windows[c].append(wdx)
        positions = torch.nonzero(keep).flatten()
        features = features[positions]
        groups = [groups[p] for p in positions.tolist()]
        newline = torch.tensor([len(g) == 0 for g in groups], device=features.device)
        key_score, key_tokens = None, torch.zeros(0, dtype=torch.long, device=features.device)
        if config.key_set:
            patch_score = self.key_scores(qk).mean(1).flatten()             # (n_crops * G2,) head mean
            key_score = torch.tensor([float(patch_score[g].sum()) if g else 0.0 for g in groups],
                                     device=features.device)
            crop_of = torch.tensor([g[0] // G2 if g else -1 for g in groups], device=features.device)
            key_tokens = stages.key_token_set_per_crop(key_score, crop_of, config.key_keep_rate)
        for c, crop in enumerate(crops):
            crop["merged_windows"] = merged_windows[c]
        return VisionResult(features, _pad_groups(groups, features.device), key_tokens, key_score,
                            torch.nonzero(newline).flatten(), crops, similarity)

    def _packed_patch_ids(self, inputs, n_crops) -> torch.Tensor:
        """Run transformers' own packing on patch ids instead of features: where each packed row comes from."""
        G2 = self.grid * self.grid
        ids = torch.arange(n_crops * G2, dtype=torch.float64).view(n_crops, G2, 1)
        packed, _ = self.model.model.pack_image_features(
            [ids], inputs["image_sizes"].cpu(), vision_feature_select_strategy="default",
            image_newline=torch.tensor([-1.0], dtype=torch.float64))
        return packed[0][:, 0].round().long()

    # ------------------------------------------------------------------ reference layout
    def _encode_reference(self, inputs, img, config) -> VisionResult:
        G2 = self.grid * self.grid
        pixels = self._pixel_crops(inputs)
        hooks, box, qk = HookSet(), {}, {}
        if config.merge:
            def merge_hook(module, args, kwargs):
                hidden = hidden_states_of(args, kwargs)
                res = stages.local_spatial_merge_batch(hidden, self.grid, config.window, config.merge_threshold)
                box["results"] = res
                if res[0].merged_windows.numel() == 0:
                    return None
                new = torch.stack([r.tokens for r in res])
                return with_hidden_states(args, kwargs, new)
            hooks.pre("vision.layer1.stage1a_merge_batch", self.vision_layers[1], merge_hook)
        if config.key_set:
            self.hook_qk(hooks, qk)
        cfg = self.model.config
        with attached(hooks):      # the tower and projector themselves; transformers' packing is skipped
            out = self.model.model.vision_tower(pixels, output_hidden_states=True, return_dict=True)
            selected = out.hidden_states[cfg.vision_feature_layer][:, 1:]
            per_crop = self.model.model.multi_modal_projector(selected)     # (n_crops, N0c, D)
        n_crops, n0c = per_crop.shape[0], per_crop.shape[1]
        features = per_crop.reshape(n_crops * n0c, -1)
        results = box.get("results")
        groups = []
        for c in range(n_crops):
            g = results[c].groups if results else torch.arange(G2, device=features.device).unsqueeze(1)
            groups.append(torch.where(g >= 0, g + c * G2, g))
        width = max(g.shape[1] for g in groups)
        groups = torch.cat([torch.nn.functional.pad(g, (0, width - g.shape[1]), value=-1) for g in groups])
        key_score, key_tokens = None, torch.zeros(0, dtype=torch.long, device=features.device)
        if config.key_set:
            scores = self.key_scores(qk)                                   # (n_crops, H, N0c)
            key_score = scores.mean(1).flatten()
            crop_of = torch.arange(n_crops, device=features.device).repeat_interleave(n0c)
            key_tokens = stages.key_token_set_per_crop(scores.permute(1, 0, 2).reshape(scores.shape[1], -1),
                                                       crop_of, config.key_keep_rate).to(features.device)
        crops = self._crops(img, n_crops)
        for c, crop in enumerate(crops):
            crop["merged_windows"] = results[c].merged_windows.cpu().tolist() if results else []
        similarity = [r.similarity for r in results] if results else [None] * n_crops
        return VisionResult(features, groups, key_tokens, key_score, torch.zeros(0, dtype=torch.long), crops,
                            similarity)


def _pad_groups(groups, device) -> torch.Tensor:
    width = max(1, max(len(g) for g in groups))
    out = torch.full((len(groups), width), -1, dtype=torch.long, device=device)
    for i, g in enumerate(groups):
        if g:
            out[i, : len(g)] = torch.tensor(g, device=device)
    return out
