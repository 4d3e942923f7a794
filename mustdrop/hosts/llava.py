"""LLaVA-1.5 layout (transformers' LlavaForConditionalGeneration): one square crop, a CLIP tower with
CLS or a SigLIP tower without, one LLM token per patch, 1-D rotary positions.

Where stage 1 is attached:
- 1a local spatial merge: a pre-hook on vision encoder layer 1 shortens the output of layer 0.
- 1b key token set: forward hooks on q_proj / k_proj of the last vision layer; the CLS row of the
  attention is computed from them (no eager attention, no output_attentions).
- vision-side baselines (FasterVLM, VisionZip) score on the feature layer; pooling averages the grid.
"""

from __future__ import annotations

import torch

from .. import methods, stages
from ..loading import ModelLoadError
from ..hooks import HookSet, attached, hidden_states_of, with_hidden_states
from ..question import as_text
from .base import Host, VisionResult


class LlavaHost(Host):
    family = "llava"
    layout = "single"

    def __init__(self, model, processor):
        super().__init__(model, processor)
        cfg = model.config
        strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        self.has_cls = self.vision_config.model_type != "siglip_vision_model"
        expected = "default" if self.has_cls else "full"
        if strategy != expected:
            raise ModelLoadError(f"a {self.vision_config.model_type} tower needs vision_feature_select_strategy "
                                 f"{expected!r} (CLS {'dropped' if self.has_cls else 'absent'}); this model uses "
                                 f"{strategy!r}")
        if not isinstance(cfg.vision_feature_layer, int):
            raise ModelLoadError("models that concatenate several vision feature layers are not supported")
        self.grid = self.vision_config.image_size // self.vision_config.patch_size
        vt = model.model.vision_tower
        self.vision_layers = getattr(vt, "vision_model", vt).encoder.layers
        self.image_token_id = cfg.image_token_id

    # ------------------------------------------------------------------ checks and inputs
    def check(self, config) -> None:
        config.validate_for(self.grid, self.num_layers)
        self.refuse_method(config)
        if config.merge and len(self.vision_layers) < 2:
            raise ValueError("stage 1a needs a vision tower of at least 2 layers")

    def inputs(self, img, question):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if getattr(self.processor, "chat_template", None):
            prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        else:
            prompt = f"USER: <image>\n{question} ASSISTANT:"
        inputs = self.processor(images=img, text=prompt, return_tensors="pt")
        device = self.model.device
        dtype = self.model.dtype
        ids = as_text(inputs["input_ids"], prompt, question, self.processor.tokenizer, self.image_token_id)
        out = {"input_ids": ids,                                          # stays on the host (split_prompt)
               "pixel_values": inputs["pixel_values"].to(device=device, dtype=dtype)}
        if "image_sizes" in inputs:
            out["image_sizes"] = inputs["image_sizes"].to(device)
        return out, prompt

    def vision_meta(self) -> dict:
        vc = self.vision_config
        return {"image_size": vc.image_size, "patch_size": vc.patch_size, "grid": self.grid,
                "num_layers": len(self.vision_layers), "has_cls": self.has_cls, "model_type": vc.model_type}

    def key_score_name(self) -> str:
        return ("CLS attention of the last vision layer (head mean)" if self.has_cls else
                "mean attention received in the last vision layer, all queries, head mean "
                "(no CLS token: documented substitute)")

    def image_crop(self, img, merged_windows) -> dict:
        """The one crop: its grid and how the processor turned the image into it."""
        mapping = image_mapping(self.processor, img.width, img.height, self.vision_config.image_size)
        return {"name": "image", "grid": [self.grid, self.grid], "mapping": mapping, "merged_windows": merged_windows}

    # ------------------------------------------------------------------ stage 1
    def encode(self, inputs, img, config) -> VisionResult:
        """Run the hooked vision tower: stage 1a merge after layer 0, stage 1b key set at the end."""
        method = methods.get(config.method)
        if method.selects_before_llm:
            return self._encode_vision_side(inputs, img, config, method)
        pixel_values = inputs["pixel_values"]
        hooks = HookSet()
        merge_box, qk = {}, {}
        if config.merge:
            def merge_hook(module, args, kwargs):
                hidden = hidden_states_of(args, kwargs)
                res = stages.local_spatial_merge(hidden[0], self.grid, config.window, config.merge_threshold,
                                                 num_prefix=1 if self.has_cls else 0)
                merge_box["result"] = res
                if res.merged_windows.numel() == 0:
                    return None
                new = res.tokens.unsqueeze(0)
                return with_hidden_states(args, kwargs, new)
            hooks.pre("vision.layer1.stage1a_merge", self.vision_layers[1], merge_hook)
        if config.key_set:
            self.hook_qk(hooks, qk)
        with attached(hooks):
            out = self.model.model.get_image_features(pixel_values=pixel_values)
        features = out.pooler_output[0]
        merge = merge_box.get("result")
        if merge is not None:
            groups, similarity, merged = merge.groups, merge.similarity, merge.merged_windows   # to host in the trace
        else:
            groups = torch.arange(features.shape[0], device=features.device).unsqueeze(1)
            similarity, merged = None, []
        if config.key_set:
            scores = self.key_scores(qk)[0]                              # (H, N0)
            key_score = scores.mean(0)
            key_tokens = stages.key_token_set(key_score, config.key_keep_rate).to(features.device)
        else:
            key_score, key_tokens = None, torch.zeros(0, dtype=torch.long, device=features.device)
        return VisionResult(features, groups, key_tokens, key_score, torch.zeros(0, dtype=torch.long),
                            [self.image_crop(img, merged)], [similarity])

    def packed_features(self, inputs, config):
        """The tower run of an any-res host (NeXT stock, OneVision): transformers' packed features
        (n_packed, D), with vision layer 0's output captured for stage 1a and the last layer's q / k
        for stage 1b when those stages are on. Returns (features, {"h": layer-0 states}, {"q", "k"})."""
        hooks, layer0, qk = HookSet(), {}, {}
        if config.merge:
            def capture(module, args, kwargs):
                layer0["h"] = hidden_states_of(args, kwargs).detach()
            hooks.pre("vision.layer1.capture_layer0", self.vision_layers[1], capture)
        if config.key_set:
            self.hook_qk(hooks, qk)
        with attached(hooks):
            out = self.model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                      image_sizes=inputs["image_sizes"])
        return torch.cat(list(out.pooler_output), dim=0), layer0, qk

    def hook_qk(self, hooks, qk, layer=None, name="vision.last"):
        """Keep the q_proj / k_proj outputs of a vision layer (default the last) in ``qk``."""
        attn = (self.vision_layers[-1] if layer is None else layer).self_attn
        hooks.post(f"{name}.q_proj", attn.q_proj, lambda m, a, k, o: qk.__setitem__("q", o))
        hooks.post(f"{name}.k_proj", attn.k_proj, lambda m, a, k, o: qk.__setitem__("k", o))

    def key_scores(self, qk) -> torch.Tensor:
        """Stage 1b's score per crop, (B, H, N): stages.cls_key_score on the last vision layer."""
        attn = self.vision_layers[-1].self_attn
        return stages.cls_key_score(qk["q"], qk["k"], attn.num_heads, attn.scale, self.has_cls)

    def _encode_vision_side(self, inputs, img, config, method) -> VisionResult:
        """A method that selects before the LLM (FasterVLM, VisionZip, pooling, a plug-in): round(budget)
        tokens chosen from the vision tower's output, scored where the method asks for a score on the
        feature layer (the one whose output the projector reads), as FasterVLM and VisionZip do."""
        fl = self.model.config.vision_feature_layer
        layer_index = fl % len(self.vision_layers) if fl < 0 else fl - 1
        hooks, qk = HookSet(), {}
        if method.needs_vision_score:
            if layer_index < 0:
                raise ValueError("vision-side baselines need a vision feature layer after the embeddings")
            self.hook_qk(hooks, qk, self.vision_layers[layer_index], name=f"vision.layer{layer_index}")
        with attached(hooks):
            out = self.model.model.get_image_features(pixel_values=inputs["pixel_values"])
        features = out.pooler_output[0]
        builtin = methods.is_builtin(method.name)
        plan = methods.checked_plan(method, config.budget, features.shape[0], config, self.num_layers, builtin)
        x = methods.VisionInputs(features, self.grid, plan.pre_keep, config, num_prefix=1 if self.has_cls else 0,
                                 project=lambda t: self.model.model.multi_modal_projector(t))
        if method.needs_vision_score:
            attn = self.vision_layers[layer_index].self_attn
            x.score = stages.cls_key_score(qk["q"], qk["k"], attn.num_heads, attn.scale, self.has_cls)[0].mean(0)
            x.hidden = out.hidden_states[fl][0]
            x.keys = qk["k"][0].float().view(x.hidden.shape[0], attn.num_heads, -1).mean(1)   # head-mean keys
            x.vision_layer = layer_index
        sel = methods.checked_select_vision(method, x, builtin)
        features = sel.features
        params = ({"vision_layer": layer_index} if method.needs_vision_score else {}) | dict(sel.params)
        baseline = {"plan": plan.to_dict(), "params": params}
        if sel.score is not None:
            baseline.update(vision_score=sel.score, score=self.key_score_name())
        empty = torch.zeros(0, dtype=torch.long, device=features.device)
        return VisionResult(features, sel.groups, empty, None, empty.cpu(), [self.image_crop(img, [])], [None],
                            baseline=baseline)


def image_mapping(processor, width: int, height: int, size: int) -> dict:
    """How the processor turned the W x H image into the size x size input (for drawing overlays).

    processed (u, v) = (x * scale_xy[0] + offset[0], y * scale_xy[1] + offset[1]); ``scale`` is
    scale_xy[0], kept for the aspect-preserving kinds where both are equal.
    """
    ip = getattr(processor, "image_processor", processor)
    sz = getattr(ip, "size", None) or {}
    sz = sz if isinstance(sz, dict) else dict(sz)
    if getattr(ip, "do_pad", False):
        side = max(width, height)
        scale = size / side
        return {"kind": "pad_resize", "scale": scale, "scale_xy": [scale, scale], "resized": [size, size],
                "offset": [(side - width) / 2 * scale, (side - height) / 2 * scale], "processed": size}
    if "shortest_edge" not in sz and sz.get("height") and sz.get("width"):
        sx, sy = size / width, size / height          # resized to a square, aspect not kept (SigLIP)
        return {"kind": "resize", "scale": sx, "scale_xy": [sx, sy], "resized": [size, size],
                "offset": [0, 0], "processed": size}
    short = min(width, height)
    scale = size / short
    rw, rh = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    crop = getattr(ip, "do_center_crop", True)
    off = [-((rw - size) // 2), -((rh - size) // 2)] if crop else [0, 0]
    return {"kind": "resize_center_crop", "scale": scale, "scale_xy": [scale, scale], "resized": [rw, rh],
            "offset": off, "processed": size}
