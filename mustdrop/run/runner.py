"""The runner: one image + question through a host with MustDrop (or a baseline) attached, hooks
only, recorded as a trace. It strings the shared pieces together in run order:

    host.inputs -> host.encode (stage 1) -> _plan_baseline -> prefill with stage 2 (prefill.py,
    _decide) -> stage-3 KV trim (kv.py) -> decode (decode.py) -> build_trace (record.py)

On an accelerator a prefill reads back from the device once per prune layer (the kept count, which
sizes the next layer's input) and once for stage 1a's merged count; scores, statuses and indices stay
on the device until the run is over and the trace takes them in one transfer. Decode reads one value
per step (the token, which decides whether to stop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache

from ..config import ModelDefaults, MustDropConfig
from ..hooks import HookSet, attached
from ..images import load_image
from ..trace import Trace
from . import decisions, prompt
from .decode import MAX_NEW_TOKENS_LIMIT, Sampling, decode
from .kv import trim
from .prefill import Prefill, attach_prefill
from .record import build_trace

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


class MustDropRunner:
    """A host (a loaded model + processor of one family) that runs MustDrop and records a trace."""

    def __init__(self, host, model_id: str = "", defaults: ModelDefaults | None = None):
        self.host = host
        self.model = host.model
        self.processor = host.processor
        self.model_id = model_id
        self.num_layers = host.num_layers
        self.defaults = defaults or ModelDefaults.load(model_id, self.num_layers)
        if self.defaults.positions not in host.position_modes:     # e.g. 3-D positions: no compaction
            self.defaults = replace(self.defaults, positions=host.position_modes[0])

    # What callers read of the model, from its host.
    family = property(lambda self: self.host.family)
    layout = property(lambda self: self.host.layout)
    grid = property(lambda self: self.host.grid)
    has_cls = property(lambda self: self.host.has_cls)
    text_config = property(lambda self: self.host.text_config)
    vision_config = property(lambda self: self.host.vision_config)
    decoder_layers = property(lambda self: self.host.decoder_layers)
    vision_layers = property(lambda self: self.host.vision_layers)
    image_token_id = property(lambda self: self.host.image_token_id)

    def config_for(self, preset: str) -> MustDropConfig:
        return MustDropConfig.preset_for(preset, self.defaults)

    @torch.no_grad()
    def run(self, image, question: str, config: MustDropConfig, max_new_tokens: int = 16,
            sampling: Sampling | None = None, record: bool = True, keep_internals: bool = False,
            progress=None) -> RunResult:
        """Run one image + question with ``config``; return the trace (and internals if asked)."""
        host = self.host
        sampling = sampling or Sampling()
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) \
                or not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max new tokens must be an integer in 1..{MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens!r}")
        host.check(config)
        question = prompt.clean_question(question, self.processor)
        if isinstance(image, (list, tuple)):
            raise ValueError(f"MustDrop runs one image at a time (batch size 1); got {len(image)} images")
        img = load_image(image, self.processor)
        say = progress or (lambda stage: None)

        t0 = time.perf_counter()
        say("inputs")
        inputs, prompt_text = host.inputs(img, question)
        if inputs["input_ids"].shape[0] != 1 or host.num_images(inputs) != 1:
            raise ValueError("MustDrop runs one image and one prompt at a time (batch size 1)")
        say("vision")
        t_vis = time.perf_counter()
        vision = host.encode(inputs, img, config)
        vision, config = decisions._plan_baseline(host, vision, config)
        features = vision.features
        _sync(features)
        t_vis = time.perf_counter() - t_vis
        text_ids, S, T = prompt.split_prompt(inputs["input_ids"], host.image_token_id)
        n_vanilla = int(inputs["input_ids"].shape[1]) - S - T    # the processor's placeholders: what vanilla feeds

        say("prefill")
        t_pre = time.perf_counter()
        state = Prefill(S, features.shape[0], T, vision.key_tokens, features.device, vision.protected)
        embeds = prompt.embeds(self.model, text_ids, S, features)
        cache = DynamicCache(config=host.text_config)
        hooks = HookSet()
        with attached(hooks):
            if config.filter:
                attach_prefill(hooks, host, state, config, decisions._decide)
            out = self.model(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1,
                             **host.prefill_kwargs(inputs, S, features.shape[0], T, vision=vision))
        logits = out.logits[0, -1].float()
        say("kv_trim")
        kv_stages = trim(cache, state, config, self.num_layers)
        _sync(logits)
        t_pre = time.perf_counter() - t_pre
        prefill_cache = [(l.keys.clone(), l.values.clone()) for l in cache.layers] if keep_internals else None

        say("decode")
        t_dec = time.perf_counter()
        gen, step_logits = decode(host, cache, logits, state, config, sampling, max_new_tokens, keep_internals)
        _sync(logits)
        t_dec = time.perf_counter() - t_dec
        timings = {"vision_s": t_vis, "prefill_s": t_pre, "decode_s": t_dec,
                   "total_s": time.perf_counter() - t0}
        trace = None
        if record:
            trace = build_trace(self, img, question, prompt_text, config, sampling, max_new_tokens, state, vision,
                                kv_stages, gen, timings, n_vanilla)
        return RunResult(trace, step_logits, prefill_cache, embeds if keep_internals else None)


def _sync(t: torch.Tensor) -> None:
    """Wait for queued GPU work so that stage timings measure the work, not its launch."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
