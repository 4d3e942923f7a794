"""MustDrop (arXiv 2411.10803): local spatial merge and key token set in the vision tower (stage 1,
attached by the host adapter), the dual-attention filter at each prune layer (stage 2,
stages.dual_attention_filter), the output-aware KV trim after prefill (stage 3).

Its budget is not a number it is given: the preset's thresholds decide how much goes, and the
layer-averaged count of what is left is the budget a same-budget comparison gives the others
(mustdrop.matched)."""

from __future__ import annotations

from .. import stages
from .base import (DROPPED, KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY, KEPT_PROTECTED, STATUS_NAMES,
                   LayerInputs, Method)


class MustDrop(Method):
    name = "mustdrop"
    label = "MustDrop"
    stages = ("merge", "key_set", "llm", "kv_trim")
    budget_rule = "none given: the preset's thresholds decide; its layer average is the budget others are matched to"
    statuses = {code: STATUS_NAMES[code] for code in (KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY, DROPPED,
                                                      KEPT_PROTECTED)}
    scores = {"global_share": "global share: the token's part of all the text rows' attention to vision",
              "individual_max": "individual max: the most attention any one text row gives the token"}
    dropped = "both its global share and its individual max were below their thresholds; later layers never see it."
    legend = "a token is dropped only when BOTH scores are below their thresholds"
    thresholds = True
    recount_protected = False      # the protected positions are in its key set: the count is the filter's own

    def config_fields(self, budget, **kw):
        raise ValueError("MustDrop is not run at a given budget: its preset's thresholds decide how many tokens go "
                         "(use MustDropConfig.preset_for)")

    def check_config(self, config) -> None:
        """MustDrop's knobs are checked by MustDropConfig itself (thresholds, window, prune layers)."""

    def plan(self, budget, n0, config, num_layers):
        return None

    def decide(self, x: LayerInputs):
        """Stage 2: drop a token only when its global share AND its individual max are below the
        thresholds; the key set (and LLaVA-NeXT's newline rows) always stay."""
        res = stages.dual_attention_filter(x.attn, x.config.global_thr, x.config.individual_thr, x.key_set())
        return res


METHOD = MustDrop
