"""Decoding, for every host: our own loop (greedy or seeded sampling), so that stages 2-3 hold in
both modes. Each step reads back one value (the token, which decides whether to stop).

Positions: decode step k places its token at position L0 + k (``Host.decode_position_ids``); in
reference positions a layer whose cache was trimmed places it at its own cache length instead,
base + k (the authors' decode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import SEED_MAX, check_int
from ..hooks import HookSet, attached, hidden_states_of

MAX_NEW_TOKENS_LIMIT = 1024


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


def decode(host, cache, logits, state, config, sampling, max_new_tokens: int, keep_logits: bool):
    """Generate up to ``max_new_tokens`` after a prefill whose last logits are ``logits``; return
    {"token_ids", "probs" (device), "stop"} and, if ``keep_logits``, every step's logits."""
    eos = _eos_ids(host.model, host.processor)
    gen = torch.Generator(device="cpu").manual_seed(int(sampling.seed))
    tokens, probs, step_logits = [], [], []
    stop = "max_new_tokens"
    hooks = HookSet()
    reference = config.positions == "reference" and config.enabled
    device = host.model.device
    # decode forward k places its token at position L0 + k; in reference positions a layer whose
    # cache was trimmed places it at its own cache length instead, base + k (the authors' decode)
    positions = host.decode_position_ids(state.L0, max_new_tokens, device)
    base = [cache.layers[i].get_seq_length() for i in range(host.num_layers)]
    tables = {}                       # (base, step) -> (position_embeddings, position_ids)
    current = {"step": 0}

    def own_position(hidden, b):
        k = current["step"]
        if (b, k) not in tables:
            if ("all", b) not in tables:      # every step's rotary table of this base, computed once
                pos = host.decode_position_ids(b, max_new_tokens, device)
                tables[("all", b)] = (host.rotary(hidden, pos), pos)
            pe, pos = tables[("all", b)]
            at = slice(k, k + 1)
            tables[(b, k)] = (host.embeddings_at(pe, at), host.position_ids_at(pos, at))
        return tables[(b, k)]

    def per_layer_position(module, args, kwargs):
        kwargs["attention_mask"] = None      # batch 1, q_len 1: every cached entry is visible
        b = base[module.self_attn.layer_idx]
        if reference and b != state.L0:
            kwargs["position_embeddings"], kwargs["position_ids"] = own_position(hidden_states_of(args, kwargs), b)
        return args, kwargs

    if config.enabled:
        for i, layer in enumerate(host.decoder_layers):
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
            out = host.model(input_ids=torch.tensor([[tok]], device=device), past_key_values=cache,
                             position_ids=host.position_ids_at(positions, slice(step, step + 1)),
                                 use_cache=True)
            logits = out.logits[0, -1].float()
    return {"token_ids": tokens, "probs": torch.stack(probs), "stop": stop}, step_logits


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
