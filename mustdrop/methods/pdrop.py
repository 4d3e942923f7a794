"""PyramidDrop-style (Xing et al. 2024): the depth cut in four; at the end of each of the first three
segments the same share lambda of the entering vision tokens is kept, ranked by the last instruction
token's attention (head mean). No KV trim (the cache of earlier layers keeps what they processed).

Budget: lambda solved by bisection so that the layer average meets the budget, the last count
rounded to hit it (stages.plan_pyramid); where lambda = 0.5 still exceeds it, tokens evenly spaced
are kept before the LLM first."""

from __future__ import annotations

from .. import stages
from .base import DROPPED, KEPT_BOTH, KEPT_PROTECTED, PROTECTED_NAME, LayerInputs, Method


class PyramidDrop(Method):
    name = "pdrop"
    label = "PyramidDrop-style"
    stages = ("llm",)
    budget_rule = "one share lambda kept at each drop (default: ends of the first three quarters), solved for the budget"
    statuses = {KEPT_BOTH: "kept: among the last instruction token's most attended",
                DROPPED: "dropped: too little of the last instruction token's attention", KEPT_PROTECTED: PROTECTED_NAME}
    scores = {"global_share": "attention of the last instruction token (head mean)",
              "individual_max": "attention of the last instruction token (head mean)"}
    dropped = ("it was outside the share this stage keeps, ranked by the last instruction token's attention; "
               "later layers never see it.")
    legend = "kept: the same share at every drop, ranked by the last instruction token (PyramidDrop)"

    def default_layers(self, num_layers):
        return stages.pyramid_layers(num_layers)

    def plan(self, budget, n0, config, num_layers):
        return stages.plan_pyramid(budget, n0, config.prune_layers or stages.pyramid_layers(num_layers), num_layers)

    def decide(self, x: LayerInputs):
        return stages.fastv_keep(x.attn, x.keep)


METHOD = PyramidDrop
