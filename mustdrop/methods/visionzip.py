"""VisionZip-style (Yang et al. 2024): before the LLM, the CLS token and the dominant patches of
highest CLS attention at the feature layer, plus contextual tokens (10/64 of the budget) made by
merging the remaining patches into evenly spaced targets by key similarity
(stages.visionzip_merge). Every LLM layer then holds round(budget) tokens."""

from __future__ import annotations

from .. import stages
from .base import Method, VisionInputs, VisionSelection


class VisionZip(Method):
    name = "visionzip"
    label = "VisionZip-style"
    stages = ("vision",)
    needs_vision_score = True
    requires = {"vision_hidden": "merges its contextual tokens in the feature layer's hidden states by key "
                                 "similarity, then projects each merged state to one LLM token"}
    budget_rule = "round(budget) tokens before the LLM: dominant patches + 10/64 contextual tokens, within 0.5 of a token"
    legend = "chosen before the LLM: dominant patches by CLS attention plus merged contextual tokens (VisionZip)"

    def select_vision(self, x: VisionInputs) -> VisionSelection:
        dominant, contextual = stages.visionzip_split(x.keep, x.num_prefix)
        res = stages.visionzip_merge(x.hidden, x.score, x.keys, dominant, contextual, x.num_prefix)
        features = x.project(res.tokens.unsqueeze(0))[0]
        return VisionSelection(features, res.groups, x.score,
                               {"dominant": dominant, "contextual": contextual, "cls_kept": bool(x.num_prefix),
                                "contextual_targets": res.targets.cpu().tolist()})


METHOD = VisionZip
