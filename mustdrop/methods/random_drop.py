"""Random drop: FastV's schedule and budget with a seeded uniform choice of the kept tokens (the
config's seed), the control that says how much any ranking helps. Its recorded score (attention
received, normalised) is shown but not used."""

from __future__ import annotations

import torch

from .. import stages
from .base import DROPPED, KEPT_BOTH, KEPT_PROTECTED, PROTECTED_NAME, LayerInputs, Method


class RandomDrop(Method):
    name = "random"
    label = "random drop"
    stages = ("llm", "kv_trim")
    takes_layer = True
    budget_rule = "FastV's: one drop after layer K (seeded random choice), seeded random tokens before the LLM if needed"
    statuses = {KEPT_BOTH: "kept: drawn at random (seeded)", DROPPED: "dropped: not drawn (seeded random)",
                KEPT_PROTECTED: PROTECTED_NAME}
    scores = {"global_share": "attention received from the text rows (recorded, not used: the choice is random)",
              "individual_max": "attention received from the text rows (recorded, not used: the choice is random)"}
    dropped = "it was not drawn (a seeded random choice, no score); later layers never see it."
    legend = "kept: a seeded random choice (the scores are shown, not used)"

    def pre_llm(self, n0, keep, config):
        gen = torch.Generator(device="cpu").manual_seed(int(config.seed))
        return torch.sort(torch.randperm(n0, generator=gen)[:keep]).values, "seeded random"

    def decide(self, x: LayerInputs):
        return stages.random_keep(x.attn, x.keep, x.config.seed)


METHOD = RandomDrop
