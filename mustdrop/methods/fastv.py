"""FastV (Chen et al. 2024): after LLM layer K, keep the vision tokens the last token attends to
most (head mean), drop the rest for every later layer; the prefill cache of the layers up to K is
trimmed to the survivors too.

Budget: one drop after K, keeping round((budget L - (K+1) n0) / (L-K-1)) (stages.plan_single_drop);
where keeping half (FastV's R = 50 %) cannot meet the budget, tokens evenly spaced in raster order
are kept before the LLM first."""

from __future__ import annotations

from .. import stages
from .base import DROPPED, KEPT_BOTH, KEPT_PROTECTED, PROTECTED_NAME, LayerInputs, Method


class FastV(Method):
    name = "fastv"
    label = "FastV"
    stages = ("llm", "kv_trim")
    takes_layer = True
    budget_rule = ("one drop after layer K, within 0.5 of a token; tokens evenly spaced are kept before the LLM "
                   "where keeping half after K cannot meet the budget")
    statuses = {KEPT_BOTH: "kept: among the last token's most attended", DROPPED: "dropped: too little of the "
                "last token's attention", KEPT_PROTECTED: PROTECTED_NAME}
    scores = {"global_share": "attention of the last token (head mean)",
              "individual_max": "attention of the last token (head mean)"}
    dropped = "the last token gave it too little attention to be among the kept ones; later layers never see it."
    legend = "kept: the tokens the last token attends to most (FastV)"

    def decide(self, x: LayerInputs):
        return stages.fastv_keep(x.attn, x.keep)


METHOD = FastV
