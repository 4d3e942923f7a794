"""MustDrop on transformers' own LlavaForConditionalGeneration, attached by hooks only.

Where each stage is attached:
- 1a local spatial merge: a pre-hook on vision encoder layer 1 shortens the output of layer 0.
- 1b key token set: forward hooks on q_proj / k_proj of the last vision layer; the CLS row of the
  attention is computed from them (no eager attention, no output_attentions).
- the <image> placeholders are cut to the merged count; features go in through mm_encoder_outputs.
- 2 dual-attention filter: a forward hook on each prune layer's self_attn scores the T text rows
  against all keys from the cache (T x L per head, never L x L); a forward hook on the decoder
  layer drops the tokens; a pre-hook on every later layer gathers the full-length position
  embeddings / position ids / mask that the decoder loop hands to every layer.
- 3 output-aware KV trim: after prefill, cache layers first..last prune layer are index-selected.
The decode loop is ours (greedy or sampling, seeded), so stages 2-3 run in both modes.

On an accelerator a prefill reads back from the device once per prune layer (the kept count, which
sizes the next layer's input) and once for stage 1a's merged count; scores, statuses and indices stay
on the device until the run is over and the trace takes them in one transfer. Decode reads one value
per step (the token, which decides whether to stop).
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from transformers import DynamicCache

from .. import methods, stages, vision_tokens
from ..config import SEED_MAX, MustDropConfig, ModelDefaults, check_int
from ..hooks import HookSet, attached, hidden_states_of, with_hidden_states
from ..images import load_image, pixel_sha256
from ..question import MAX_QUESTION_CHARS, as_text, check_question  # noqa: F401 - MAX_QUESTION_CHARS: importers
from ..trace import SCHEMA_VERSION, Trace
from .loading import ModelLoadError


@dataclass
class Sampling:
    """How tokens are chosen at decode. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    # Outside these, float32 sampling breaks: logits / 1e-300 overflow, a top p below float32's
    # resolution keeps no token (NaN probabilities). 0.01 is already greedy in all but ties.
    TEMPERATURE_RANGE = (0.01, 100.0)
    TOP_P_RANGE = (0.01, 1.0)

    def __post_init__(self):
        import math
        for name, v, (lo, hi) in (("temperature", self.temperature, self.TEMPERATURE_RANGE),
                                  ("top p", self.top_p, self.TOP_P_RANGE)):
            ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
                and math.isfinite(v) and (lo <= v <= hi or (name == "temperature" and v == 0))
            if not ok:
                zero = "0 (greedy) or " if name == "temperature" else ""
                raise ValueError(f"{name} must be {zero}a number in [{lo:g}, {hi:g}], got {v!r}")
        self.seed = check_int(self.seed, "seed", 0, SEED_MAX)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


MAX_NEW_TOKENS_LIMIT = 1024
# What ``run(progress=...)`` is called with, in this order: a stage id, and what the stage does.
RUN_STAGES = {"inputs": "preparing inputs", "vision": "vision encoder (stage 1a merge, stage 1b key set)",
              "prefill": "prefill (stage 2 dual-attention filter)", "kv_trim": "KV trim (stage 3)",
              "decode": "decoding"}


@dataclass
class RunResult:
    """One run: the trace (plain data) plus internals that only tests and benchmarks need."""

    trace: Trace
    step_logits: list = field(default_factory=list)      # float32 logits of each generated step
    prefill_cache: list | None = None                   # [(keys, values)] per layer after the trim
    inputs_embeds: torch.Tensor | None = None           # what entered the language model


@dataclass
class VisionResult:
    """What stage 1 hands the language model, with provenance for the trace.

    ``groups`` holds, for each vision token in the order the LLM sees it, the patches it covers as
    global ids ``crop * G*G + patch`` (one crop for LLaVA-1.5; base + tiles for LLaVA-NeXT), -1
    padded; a row of -1 is a token that covers no patch (a LLaVA-NeXT newline row marker).
    """

    features: torch.Tensor                 # (N0, D) projected features entering the LLM
    groups: torch.Tensor                   # (N0, k) global patch ids, -1 padded
    key_tokens: torch.Tensor               # positions of the key set in the vision block, ascending
    key_score: torch.Tensor | None         # (N0,) the key-set score of each token (head mean)
    protected: torch.Tensor                # positions never dropped that are not key tokens (newlines)
    crops: list                            # per crop: {"name", "mapping", "merged_windows"}
    similarity: list                       # per crop: (G/w, G/w) window similarity or None
    baseline: dict | None = None           # a same-budget baseline's plan, parameters and scores


class _Prefill:
    """Mutable state of one prefill: which tokens of the sequence are still alive.

    Device tensors are replaced, never written to, so that the records can hold them as they were.
    """

    def __init__(self, S, N0, T, key_tokens, device, protected=None):
        self.S, self.N0, self.T = S, N0, T
        self.protected_pos = (protected if protected is not None else torch.zeros(0, dtype=torch.long)).to(device)
        self.L0 = S + N0 + T
        self.V = N0                                                 # vision tokens alive (host count)
        self._alive = torch.arange(self.L0, device=device)          # original sequence indices
        self.head = self._alive[:S]                                 # the S tokens before the image
        self.selections = []        # per drop: indices into the sequence it shortened that it kept
        self._applied = 0           # how many of them ``_alive`` has been composed with
        # the key set among the vision tokens alive now: positions in the block, ascending, or (once
        # MustDrop's filter has run without protected positions) a bool mask over them
        self.key_pos = key_tokens.to(device)
        self.text_attn = None
        self.queries = None                                         # the prune layer's q_proj output
        self.rows_rope = None                                       # text-row rotary tables (_RowsRope)
        self.records = []                                           # per prune layer
        self.kept_positions = []                                    # per prune layer (for stage 3)
        self.layer_kwargs = None    # shortened layer kwargs, computed once after each drop

    @property
    def L(self):
        return self.S + self.V + self.T

    @property
    def alive(self):
        """Original sequence indices of the tokens alive now (device), composed from the drops'
        selections only when asked for: original positions and 4-D masks need them, reference
        positions do not, and the trace derives its own on the host from the statuses."""
        while self._applied < len(self.selections):
            self._alive = self._alive[self.selections[self._applied]]
            self._applied += 1
        return self._alive

    def length_at(self, stage: int) -> int:
        """Length of the sequence the layers of ``stage`` processed (stage i: the one entering
        prune layer i; the last stage: the survivors of every drop)."""
        return self.S + (self.records[stage]["V"] if stage < len(self.records) else self.V) + self.T

    @property
    def shortened(self):
        return self.L < self.L0


class LlavaMustDrop:
    """A loaded LLaVA model + processor that runs MustDrop and records a trace."""

    family = "llava"
    layout = "single"

    def __init__(self, model, processor, model_id: str = "", defaults: ModelDefaults | None = None):
        self.model = model.eval()
        self.processor = processor
        self.model_id = model_id
        cfg = model.config
        self.text_config = cfg.text_config
        self.vision_config = cfg.vision_config
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
        lm = model.model.language_model
        self.decoder_layers = lm.layers
        self.num_layers = len(self.decoder_layers)
        self.rotary_emb = lm.rotary_emb
        vt = model.model.vision_tower
        self.vision_layers = getattr(vt, "vision_model", vt).encoder.layers
        self.image_token_id = cfg.image_token_id
        self.defaults = defaults or ModelDefaults.load(model_id, self.num_layers)
        self._rope = sys.modules[type(self.decoder_layers[0].self_attn).__module__].apply_rotary_pos_emb
        self._rotate_half_rope = _is_rotate_half_rope(self._rope, self.decoder_layers[0].self_attn.head_dim)

    # ------------------------------------------------------------------ public
    def config_for(self, preset: str) -> MustDropConfig:
        return MustDropConfig.preset_for(preset, self.defaults)

    @torch.no_grad()
    def run(self, image, question: str, config: MustDropConfig, max_new_tokens: int = 16,
            sampling: Sampling | None = None, record: bool = True, keep_internals: bool = False,
            progress=None) -> RunResult:
        """Run one image + question with ``config``; return the trace (and internals if asked)."""
        sampling = sampling or Sampling()
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) \
                or not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max new tokens must be an integer in 1..{MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens!r}")
        config.validate_for(self.grid, self.num_layers)
        if config.merge and len(self.vision_layers) < 2:
            raise ValueError("stage 1a needs a vision tower of at least 2 layers")
        question = _clean_question(question, self.processor)
        if isinstance(image, (list, tuple)):
            raise ValueError(f"MustDrop runs one image at a time (batch size 1); got {len(image)} images")
        img = load_image(image, self.processor)
        say = progress or (lambda stage: None)

        t0 = time.perf_counter()
        say("inputs")
        inputs, prompt = self._inputs(img, question)
        if inputs["input_ids"].shape[0] != 1 or inputs["pixel_values"].shape[0] != 1:
            raise ValueError("MustDrop runs one image and one prompt at a time (batch size 1)")
        say("vision")
        t_vis = time.perf_counter()
        vision = self._encode(inputs, img, config)
        vision, config = self._plan_baseline(vision, config)
        features = vision.features
        _sync(features)
        t_vis = time.perf_counter() - t_vis
        N0 = features.shape[0]
        text_ids, S, T = self._split_prompt(inputs["input_ids"])

        say("prefill")
        t_pre = time.perf_counter()
        state = _Prefill(S, N0, T, vision.key_tokens, features.device, vision.protected)
        embeds = self._embeds(text_ids, S, features)
        cache = DynamicCache(config=self.text_config)
        hooks = HookSet()
        with attached(hooks):
            if config.filter:
                self._attach_prefill(hooks, state, config, record)
            out = self.model(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[0, -1].float()
        say("kv_trim")
        kv_stages = self._trim(cache, state, config)
        _sync(logits)
        t_pre = time.perf_counter() - t_pre
        prefill_cache = [(l.keys.clone(), l.values.clone()) for l in cache.layers] if keep_internals else None

        say("decode")
        t_dec = time.perf_counter()
        gen, step_logits = self._decode(cache, logits, state, config, sampling, max_new_tokens, keep_internals)
        _sync(logits)
        t_dec = time.perf_counter() - t_dec
        timings = {"vision_s": t_vis, "prefill_s": t_pre, "decode_s": t_dec,
                   "total_s": time.perf_counter() - t0}
        trace = None
        if record:
            trace = self._trace(img, question, prompt, config, sampling, max_new_tokens, state, vision,
                                kv_stages, gen, timings)
        return RunResult(trace, step_logits, prefill_cache, embeds if keep_internals else None)

    # ------------------------------------------------------------------ inputs
    def _inputs(self, img, question):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if getattr(self.processor, "chat_template", None):
            prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        else:
            prompt = f"USER: <image>\n{question} ASSISTANT:"
        inputs = self.processor(images=img, text=prompt, return_tensors="pt")
        device = self.model.device
        dtype = self.model.dtype
        ids = as_text(inputs["input_ids"], prompt, question, self.processor.tokenizer, self.image_token_id)
        out = {"input_ids": ids,                                          # stays on the host (_split_prompt)
               "pixel_values": inputs["pixel_values"].to(device=device, dtype=dtype)}
        if "image_sizes" in inputs:
            out["image_sizes"] = inputs["image_sizes"].to(device)
        return out, prompt

    def _split_prompt(self, input_ids):
        """Find the prompt's one block of <image> ids, on the host (the processor's ids never went to
        the device); return the ids without it (1, S + T), S (tokens before the image) and T."""
        ids = input_ids.numpy()[0]
        pos = np.flatnonzero(ids == self.image_token_id)
        if pos.size == 0:
            raise ValueError("the prompt holds no <image> placeholder")
        if pos[-1] - pos[0] + 1 != pos.size:
            raise ValueError(f"expected one contiguous block of <image> tokens, found {pos.size} scattered: "
                             "the question may contain the image token string")
        S = int(pos[0])
        text = np.concatenate([ids[:S], ids[pos[-1] + 1:]])[None]
        return torch.from_numpy(text), S, text.shape[1] - S

    def _embeds(self, text_ids, S, features):
        """What enters the language model: the prompt's token embeddings with the N0 vision tokens
        in place of the <image> block. Built here, not by transformers' placeholder scatter, which
        reads the placeholder count back from the device and scatters through a mask."""
        e = self.model.get_input_embeddings()(text_ids.to(self.model.device))
        return torch.cat([e[:, :S], features.to(e.dtype).unsqueeze(0), e[:, S:]], dim=1)

    # ------------------------------------------------------------------ stage 1
    def _encode(self, inputs, img, config) -> VisionResult:
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
            self._hook_last_qk(hooks, qk)
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
            scores = self._key_scores(qk)[0]                             # (H, N0)
            key_score = scores.mean(0)
            key_tokens = stages.key_token_set(key_score, config.key_keep_rate).to(features.device)
        else:
            key_score, key_tokens = None, torch.zeros(0, dtype=torch.long, device=features.device)
        mapping = image_mapping(self.processor, img.width, img.height, self.vision_config.image_size)
        return VisionResult(features, groups, key_tokens, key_score, torch.zeros(0, dtype=torch.long),
                            [{"name": "image", "mapping": mapping, "merged_windows": merged}], [similarity])

    def _hook_last_qk(self, hooks, qk, layer=None, name="vision.last"):
        attn = (self.vision_layers[-1] if layer is None else layer).self_attn
        hooks.post(f"{name}.q_proj", attn.q_proj, lambda m, a, k, o: qk.__setitem__("q", o))
        hooks.post(f"{name}.k_proj", attn.k_proj, lambda m, a, k, o: qk.__setitem__("k", o))

    def _key_scores(self, qk) -> torch.Tensor:
        """Stage 1b's score per crop, (B, H, N): stages.cls_key_score on the last vision layer."""
        attn = self.vision_layers[-1].self_attn
        return stages.cls_key_score(qk["q"], qk["k"], attn.num_heads, attn.scale, self.has_cls)

    # ------------------------------------------------------------------ same-budget baselines
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
            self._hook_last_qk(hooks, qk, self.vision_layers[layer_index], name=f"vision.layer{layer_index}")
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
            baseline.update(vision_score=sel.score, score=self._key_score_name())
        mapping = image_mapping(self.processor, img.width, img.height, self.vision_config.image_size)
        empty = torch.zeros(0, dtype=torch.long, device=features.device)
        return VisionResult(features, sel.groups, empty, None, empty.cpu(),
                            [{"name": "image", "mapping": mapping, "merged_windows": []}], [None], baseline=baseline)

    def _key_score_name(self) -> str:
        return ("CLS attention of the last vision layer (head mean)" if self.has_cls else
                "mean attention received in the last vision layer, all queries, head mean "
                "(no CLS token: documented substitute)")

    def _plan_baseline(self, vision: VisionResult, config):
        """Solve how a method given a budget meets it on this sample (its ``plan``), drop before the
        LLM what the plan drops there (its ``pre_llm`` choice), and return the config with the plan's
        drop layers and counts, so that the prefill hooks, the trace and its replay all use the same
        plan. MustDrop (no budget) and the methods that selected before the LLM pass through."""
        method = methods.get(config.method)
        if config.method == methods.DEFAULT or method.selects_before_llm:
            return vision, config
        n0 = int(vision.features.shape[0])
        builtin = methods.is_builtin(method.name)
        if config.keep_counts:
            plan = stages.BudgetPlan(method.name, float(config.budget), n0, int(config.pre_keep or n0),
                                     config.prune_layers, config.keep_counts, None, "counts given in the config")
        else:
            plan = methods.checked_plan(method, config.budget, n0, config, self.num_layers, builtin)
        pre_llm = None
        if plan.pre_keep < n0:
            sel, pre_llm = methods.checked_pre_llm(method, n0, plan.pre_keep, config, builtin)
            vision = _select_tokens(vision, sel.to(vision.features.device))
        vision.baseline = {"plan": plan.to_dict(), "params": {"pre_llm_selection": pre_llm}}
        return vision, config.replace(prune_layers=plan.layers, keep_counts=plan.keep, pre_keep=plan.pre_keep)

    def _record_baseline(self, vision: VisionResult, meta: dict, arrays: dict) -> None:
        """How the method's decisions are explained into meta["method_info"] (so that a trace of a
        plug-in replays without it); a baseline's plan and parameters into meta["baseline"]; its
        vision-side score (one per original patch) into the array baseline.vision_score."""
        meta["method_info"] = methods.get(meta["method"]).words.to_dict()
        if not vision.baseline:
            return
        b = dict(vision.baseline)
        score = b.pop("vision_score", None)
        meta["baseline"] = b
        if score is not None:
            arrays["baseline.vision_score"] = score.float().cpu().numpy().astype(np.float32)

    # ------------------------------------------------------------------ stage 2
    def _attach_prefill(self, hooks, state, config, record):
        first = config.prune_layers[0]
        prune = set(config.prune_layers)
        reference = config.positions == "reference"

        def shorten(kwargs):
            n = state.L
            cos, sin = kwargs["position_embeddings"]
            new = {}
            if reference:   # survivors' positions compacted to 0..n-1, as the authors' code does
                new["position_embeddings"] = (cos[:, :n], sin[:, :n])
                if kwargs.get("position_ids") is not None:
                    new["position_ids"] = kwargs["position_ids"][:, :n]
            else:
                idx = state.alive
                new["position_embeddings"] = (cos[:, idx], sin[:, idx])
                if kwargs.get("position_ids") is not None:
                    new["position_ids"] = kwargs["position_ids"][:, idx]
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                idx = state.alive
                new["attention_mask"] = mask[:, :, idx][:, :, :, idx]
            return new

        def gather(module, args, kwargs):
            hidden = hidden_states_of(args, kwargs)
            if hidden.shape[1] <= 1 or not state.shortened:
                return None
            # Every layer receives the same full-length position embeddings and mask from the
            # model's forward; slice them once per drop, not once per layer (each slice is a few
            # kernel launches, which is what a batch-1 prefill on a GPU is bound by).
            if state.layer_kwargs is None:
                state.layer_kwargs = shorten(kwargs)
            kwargs.update(state.layer_kwargs)
            return args, kwargs

        def keep_queries(module, args, kwargs, output):
            state.queries = output

        def score_text_rows(module, args, kwargs, output):
            keys = kwargs["past_key_values"].layers[module.layer_idx].keys
            queries, state.queries = state.queries, None
            if state.rows_rope is None:       # the first prune layer sees the full-length tables
                state.rows_rope = _RowsRope(kwargs["position_embeddings"], module.scaling,
                                            self._rope if not self._rotate_half_rope else None,
                                            grouped=getattr(module, "num_key_value_groups", 1) > 1)
            # text rows sit at the end: positions n-T..n-1 (reference) or L0-T..L0-1 (original)
            start = (state.L if reference else state.L0) - state.T
            probs = _text_rows_probs(queries[:, -state.T:], keys, module.head_dim,
                                     lambda q: state.rows_rope(q, start))
            state.text_attn = probs[:, :, state.S:state.S + state.V]             # (H, T, V)

        def drop(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] <= 1:
                return None
            layer = module.self_attn.layer_idx
            attn, state.text_attn = state.text_attn, None
            V = state.V
            if V == 0:
                res = None
                kept = torch.zeros(0, dtype=torch.long, device=hidden.device)
            else:
                res = self._decide(attn, state, layer, config)
                kept = res.kept
            state.kept_positions.append(kept)
            record = {"layer": layer, "V": V, "result": res, "selection": None}
            state.records.append(record)
            if kept.numel() == V:
                return None
            S = state.S
            sel = torch.cat([state.head, S + kept, torch.arange(S + V, hidden.shape[1], device=kept.device)])
            record["selection"] = sel
            state.selections.append(sel)
            state.V = kept.numel()
            state.layer_kwargs = None
            if state.protected_pos.numel():
                state.key_pos = torch.searchsorted(kept, state.key_pos)
                state.protected_pos = torch.searchsorted(kept, state.protected_pos)
            else:   # the filter already placed the key set among the survivors (baselines keep none)
                state.key_pos = res.key_after if res is not None else state.key_pos[:0]
            new = hidden[:, sel]
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        for i, layer in enumerate(self.decoder_layers):
            if i > first:
                hooks.pre(f"llm.layer{i}.gather_positions", layer, gather)
            if i in prune:
                hooks.post(f"llm.layer{i}.self_attn.q_proj.keep", layer.self_attn.q_proj, keep_queries)
                hooks.post(f"llm.layer{i}.self_attn.text_rows", layer.self_attn, score_text_rows)
                hooks.post(f"llm.layer{i}.stage2_filter", layer, drop)

    def _decide(self, attn, state, layer, config):
        """Stage 2's decision at one drop layer: the method's (MustDrop's filter, a baseline's or a
        plug-in's ranking), with the count its budget plan keeps here. Protected positions (LLaVA-NeXT
        newline rows) are kept whatever the method says."""
        method = methods.get(config.method)
        keep = None if config.method == methods.DEFAULT else config.keep_counts[config.prune_layers.index(layer)]
        x = methods.LayerInputs(attn, layer, len(state.records), keep, config, state)
        res = methods.checked_decide(method, x, methods.is_builtin(method.name))
        return stages.with_protected(res, state.protected_pos, recount=method.recount_protected)

    # ------------------------------------------------------------------ stage 3
    def _trim(self, cache, state, config):
        """Index-select the cache of layers first..last prune layer; return, per layer, which stage's
        sequence its cached entries are (stage i: the sequence entering prune layer i; the last
        stage, ``len(state.records)``: the survivors of every drop), for the trace to index on the host."""
        prune = list(config.prune_layers) if config.filter else []
        final = len(state.records)
        per_layer = None
        if prune and config.kv_trim:      # the drops' own selections, composed: one gather per drop
            per_layer = stages.kv_keep_indices(self.num_layers, prune, state.S, state.T, state.N0,
                                               state.kept_positions, only_trimmed=True,
                                               selections=[rec["selection"] for rec in state.records])
        out = []
        stage = 0   # how many prune layers lie strictly before the current layer
        for layer in range(self.num_layers):
            trim = per_layer is not None and per_layer[layer] is not None
            if trim and per_layer[layer].numel() < state.length_at(stage):
                cl = cache.layers[layer]
                cl.keys = cl.keys.index_select(-2, per_layer[layer])
                cl.values = cl.values.index_select(-2, per_layer[layer])
                out.append(final)       # a trimmed layer keeps exactly the final survivors
            else:
                out.append(stage)
            if stage < len(prune) and layer == prune[stage]:
                stage += 1
        return out

    # ------------------------------------------------------------------ decode
    def _decode(self, cache, logits, state, config, sampling, max_new_tokens, keep_logits):
        eos = _eos_ids(self.model, self.processor)
        gen = torch.Generator(device="cpu").manual_seed(int(sampling.seed))
        tokens, probs, step_logits = [], [], []
        stop = "max_new_tokens"
        hooks = HookSet()
        reference = config.positions == "reference" and config.enabled
        device = self.model.device
        # decode forward k places its token at position L0 + k; in reference positions a layer whose
        # cache was trimmed places it at its own cache length instead, base + k (the authors' decode)
        positions = torch.arange(state.L0, state.L0 + max_new_tokens, device=device).view(1, -1)
        base = [cache.layers[i].get_seq_length() for i in range(self.num_layers)]
        tables = {}                       # (base, step) -> (position_embeddings, position_ids)
        current = {"step": 0}

        def own_position(hidden, b):
            k = current["step"]
            if (b, k) not in tables:
                if ("all", b) not in tables:      # every step's rotary table of this base, computed once
                    pos = torch.arange(b, b + max_new_tokens, device=device).view(1, -1)
                    tables[("all", b)] = (self.rotary_emb(hidden, position_ids=pos), pos)
                (cos, sin), pos = tables[("all", b)]
                tables[(b, k)] = ((cos[:, k:k + 1], sin[:, k:k + 1]), pos[:, k:k + 1])
            return tables[(b, k)]

        def per_layer_position(module, args, kwargs):
            kwargs["attention_mask"] = None      # batch 1, q_len 1: every cached entry is visible
            b = base[module.self_attn.layer_idx]
            if reference and b != state.L0:
                kwargs["position_embeddings"], kwargs["position_ids"] = own_position(hidden_states_of(args, kwargs), b)
            return args, kwargs

        if config.enabled:
            for i, layer in enumerate(self.decoder_layers):
                hooks.pre(f"llm.layer{i}.decode_positions", layer, per_layer_position)
        with attached(hooks):
            for step in range(max_new_tokens):
                if keep_logits:
                    step_logits.append(logits.clone())
                p = torch.softmax(logits, dim=-1)
                tok = _choose(logits, sampling, gen)          # the one read-back of a step
                tokens.append(tok)
                probs.append(p[tok])                           # stays on the device until the trace
                if tok in eos:
                    stop = "eos"
                    break
                if step == max_new_tokens - 1:
                    break
                current["step"] = step
                out = self.model(input_ids=torch.tensor([[tok]], device=device), past_key_values=cache,
                                 position_ids=positions[:, step:step + 1], use_cache=True)
                logits = out.logits[0, -1].float()
        return {"token_ids": tokens, "probs": torch.stack(probs), "stop": stop}, step_logits

    # ------------------------------------------------------------------ trace
    def _trace(self, img, question, prompt, config, sampling, max_new_tokens, state, vision: VisionResult,
               kv_stages, gen, timings) -> Trace:
        G = self.grid
        w = config.window
        N = G * G
        N0, S, T = state.N0, state.S, state.T
        # everything the trace needs from the device, in one transfer
        want = {"groups": vision.groups, "key_tokens": vision.key_tokens, "protected": vision.protected,
                "probs": gen["probs"]}
        for c, sim in enumerate(vision.similarity):
            if sim is not None:
                want[f"sim{c}"] = sim
        if vision.key_score is not None:
            want["key_score"] = vision.key_score
        for c, crop in enumerate(vision.crops):
            if isinstance(crop["merged_windows"], torch.Tensor):
                want[f"merged{c}"] = crop["merged_windows"]
        for i, rec in enumerate(state.records):
            if rec["result"] is not None:
                res = rec["result"]
                want.update({f"gs{i}": res.global_share, f"im{i}": res.individual_max, f"st{i}": res.status})
        host = _to_host(want)
        alive = _alive_per_stage(state, host)
        crops = [{**crop, "merged_windows": host[f"merged{c}"].tolist() if f"merged{c}" in host
                  else crop["merged_windows"]} for c, crop in enumerate(vision.crops)]
        arrays: dict[str, np.ndarray] = {"tokens.groups": host["groups"].astype(np.int64)}
        for c, sim in enumerate(vision.similarity):
            if sim is not None:
                arrays["stage1a.similarity" if c == 0 else f"stage1a.c{c}.similarity"] = \
                    host[f"sim{c}"].astype(np.float32)
        if host["protected"].size:
            newline = np.zeros(N0, np.uint8)
            newline[host["protected"]] = 1
            arrays["tokens.newline"] = newline
        if vision.key_score is not None:
            arrays["stage1b.key_score"] = host["key_score"].astype(np.float32)
        merged_windows = crops[0]["merged_windows"]
        tc = self.text_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        n_kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
        bytes_per_entry = 2 * n_kv * head_dim * torch.finfo(self.model.dtype).bits // 8
        stage2 = []
        for i, rec in enumerate(state.records):
            layer, res, V = rec["layer"], rec["result"], rec["V"]
            p = f"stage2.L{layer}"
            arrays[f"{p}.tokens"] = (alive[i][S:S + V] - S).astype(np.int64)   # merged-token ids
            if res is not None:
                arrays[f"{p}.global_share"] = host[f"gs{i}"].astype(np.float32)
                arrays[f"{p}.individual_max"] = host[f"im{i}"].astype(np.float32)
                arrays[f"{p}.status"] = host[f"st{i}"].astype(np.int8)
                kept_n, dropped_n = int(res.kept.numel()), int((arrays[f"{p}.status"] == stages.DROPPED).sum())
            else:
                arrays[f"{p}.global_share"] = np.zeros(0, np.float32)
                arrays[f"{p}.individual_max"] = np.zeros(0, np.float32)
                arrays[f"{p}.status"] = np.zeros(0, np.int8)
                kept_n, dropped_n = 0, 0
            stage2.append({"layer": layer, "entering": V, "kept": kept_n, "dropped": dropped_n})
        vision_per_layer = vision_tokens.per_layer(N0, [(s["layer"], s["kept"]) for s in stage2], self.num_layers)
        entries, vision_entries = [], []
        for layer, stage in enumerate(kv_stages):
            idx = alive[stage].astype(np.int64)
            arrays[f"kv.L{layer}"] = idx
            entries.append(int(idx.size))
            vision_entries.append(int(((idx >= S) & (idx < S + N0)).sum()))
        tok = self.processor.tokenizer
        ids = gen["token_ids"]   # pieces that concatenate to the decoded text (leading spaces kept)
        texts = [tok.decode(ids[:i]) for i in range(len(ids) + 1)]
        pieces = [texts[i + 1][len(texts[i]):] if texts[i + 1].startswith(texts[i]) else tok.decode([ids[i]])
                  for i in range(len(ids))]
        answer = tok.decode(gen["token_ids"], skip_special_tokens=True).strip()
        tc_dict = {"num_layers": self.num_layers, "hidden_size": tc.hidden_size,
                   "intermediate_size": tc.intermediate_size, "num_heads": tc.num_attention_heads,
                   "num_kv_heads": n_kv, "head_dim": head_dim, "vocab_size": tc.vocab_size}
        vc = self.vision_config
        meta = {
            "schema": SCHEMA_VERSION,
            "model": {"id": self.model_id, "family": self.family, "layout": self.layout, "dtype": str(self.model.dtype).replace("torch.", ""),
                      "device": str(self.model.device),
                      "vision": {"image_size": vc.image_size, "patch_size": vc.patch_size, "grid": G,
                                 "num_layers": len(self.vision_layers), "has_cls": self.has_cls,
                                 "model_type": vc.model_type},
                      "llm": tc_dict},
            "config": config.to_dict(),
            "method": config.method,
            "defaults_source": self.defaults.source,
            "input": {"question": question, "prompt": prompt,
                      "image": {"width": img.width, "height": img.height,
                                "sha256": pixel_sha256(img)},
                      "mapping": vision.crops[0]["mapping"]},
            "crops": crops,
            "sequence": {"S": S, "T": T, "N": N * len(vision.crops), "N0": N0},
            "stage1a": {"enabled": config.merge, "window": w, "threshold": config.merge_threshold,
                        "merged_windows": merged_windows},
            "stage1b": {"enabled": config.key_set, "keep_rate": config.key_keep_rate,
                        "score": self._key_score_name(),
                        "key_tokens": host["key_tokens"].tolist()},
            "stage2": stage2,
            "vision_tokens_per_layer": vision_per_layer,
            "kv": {"entries_per_layer": entries, "vision_entries_per_layer": vision_entries,
                   "bytes_per_entry": int(bytes_per_entry)},
            "generation": {"mode": "greedy" if sampling.greedy else "sampling",
                           "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
                           "max_new_tokens": max_new_tokens, "token_ids": gen["token_ids"], "tokens": pieces,
                           "probs": host["probs"].tolist(), "answer": answer, "stop": gen["stop"]},
            "timings": timings,
        }
        meta["input"]["input_hash"] = input_hash(meta["input"]["image"]["sha256"], question)
        self._record_baseline(vision, meta, arrays)
        return Trace.build(meta, arrays)



_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
                 torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
                 torch.uint8: np.uint8, torch.bool: np.bool_}


def _to_host(tensors: dict, pack: bool | None = None) -> dict:
    """Host numpy arrays of ``tensors`` (name -> tensor), with ONE device-to-host copy for all that
    live on a device: each copy waits until the device has finished everything queued before it,
    so one per array would stall it once per array. The tensors are packed as bytes into one
    buffer (widest elements first, so every array stays aligned) and split on the host; a tensor
    under several names is copied once. Host tensors are read in place unless ``pack`` is True."""
    distinct = {}
    for t in tensors.values():
        distinct.setdefault(id(t), t)
    packed = [(key, t) for key, t in distinct.items() if pack or (pack is None and t.device.type != "cpu")]
    packed_keys = {key for key, _ in packed}
    host = {key: t.numpy() for key, t in distinct.items() if key not in packed_keys}
    if packed:
        packed = [(key, t.float() if t.dtype == torch.bfloat16 else t) for key, t in packed]
        packed.sort(key=lambda kt: -kt[1].element_size())
        buf = torch.cat([t.contiguous().view(-1).view(torch.uint8) for _, t in packed]).cpu().numpy()
        offset = 0
        for key, t in packed:
            size = t.numel() * t.element_size()
            host[key] = buf[offset:offset + size].view(_NUMPY_DTYPES[t.dtype]).reshape(tuple(t.shape))
            offset += size
    return {name: host[id(t)] for name, t in tensors.items()}


def _alive_per_stage(state: _Prefill, host: dict) -> list:
    """The original-sequence indices of the tokens each stage of layers processed (stage i: the
    sequence entering prune layer i; the last: the survivors of every drop), rebuilt on the host from
    the recorded statuses (a token is kept where its status is not DROPPED), so that the trace needs
    no index array from the device. Checked against the kept counts the device used."""
    S, T = state.S, state.T
    alive = [np.arange(state.L0, dtype=np.int64)]
    for i, rec in enumerate(state.records):
        a, V = alive[-1], rec["V"]
        if rec["result"] is not None:
            kept = np.flatnonzero(host[f"st{i}"] != stages.DROPPED)
            if kept.size != rec["result"].kept.numel():
                raise RuntimeError(f"prune layer {rec['layer']}: {kept.size} statuses say kept, but "
                                   f"{rec['result'].kept.numel()} tokens were kept")
            if kept.size < V:
                a = np.concatenate([a[:S], a[S + kept], a[S + V:S + V + T]])
        alive.append(a)
    return alive


def _select_tokens(vision: VisionResult, sel: torch.Tensor) -> VisionResult:
    """The vision block reduced to positions ``sel`` (ascending) before the LLM; protected positions
    are always kept, and key and protected positions are renumbered."""
    if vision.protected.numel():
        sel = torch.unique(torch.cat([sel, vision.protected.to(sel.device)]))
    def renumber(pos):
        pos = pos.to(sel.device)
        return torch.searchsorted(sel, pos[torch.isin(pos, sel)])
    return VisionResult(vision.features[sel], vision.groups[sel.to(vision.groups.device)], renumber(vision.key_tokens),
                        None if vision.key_score is None else vision.key_score[sel], renumber(vision.protected).cpu(),
                        vision.crops, vision.similarity, vision.baseline)


def _sync(t: torch.Tensor) -> None:
    """Wait for queued GPU work so that stage timings measure the work, not its launch."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


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
    return _text_rows_probs(queries, keys, attn_module.head_dim, rotate).unsqueeze(0)


@lru_cache(maxsize=32)
def _later_rows(T: int, groups: int, device: torch.device) -> torch.Tensor:
    """(groups * T, T) bool, True where text row t (of each of ``groups`` query heads sharing a key
    head) would see a later text row: the causal mask of the text rows' own columns. Built once per
    shape and device (read-only: masked_fill_ reads it)."""
    return torch.ones(T, T, dtype=torch.bool).triu(1).repeat(groups, 1).to(device)


def _text_rows_probs(queries, keys, head_dim: int, rotate) -> torch.Tensor:
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


class _RowsRope:
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


def _is_rotate_half_rope(rope, head_dim: int) -> bool:
    """Whether the model's apply_rotary_pos_emb is the standard rotate-half form (checked on numbers)."""
    if head_dim % 2:
        return False
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, head_dim, generator=g)
    cos, sin = torch.randn(1, 3, head_dim, generator=g), torch.randn(1, 3, head_dim, generator=g)
    try:
        want = rope(q, q, cos, sin)[0]
    except Exception:  # noqa: BLE001 - a RoPE of another signature: use it through ``rope``
        return False
    half = head_dim // 2
    signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return torch.equal(want, q * cos.unsqueeze(1) + q.roll(half, -1) * signed.unsqueeze(1))


def input_hash(image_sha256: str, question: str) -> str:
    """Identifies an (image, question) pair: the same request gives the same hash."""
    return hashlib.sha256(f"{image_sha256}\n{question}".encode()).hexdigest()[:16]


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


def _choose(logits, sampling: Sampling, gen) -> int:
    if sampling.greedy:
        return int(torch.argmax(logits))
    p = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sp, order = torch.sort(p, descending=True)
        keep = torch.cumsum(sp, 0) - sp < sampling.top_p
        p = torch.zeros_like(p).scatter(0, order[keep], sp[keep])
        p = p / p.sum()
    return int(torch.multinomial(p.cpu(), 1, generator=gen))


def _eos_ids(model, processor) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config.text_config, processor.tokenizer):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids


def _clean_question(question, processor) -> str:
    q = check_question(question)
    image_token = getattr(processor, "image_token", None) or "<image>"
    if image_token in q:
        raise ValueError(f"the question contains the image placeholder {image_token!r}; remove it")
    return q
