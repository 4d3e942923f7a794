"""FasterVLM-style (Zhang et al. 2024): before the LLM, keep the round(budget) patches the vision
tower's CLS token attends to most at the feature layer (head mean; SigLIP has no CLS: the mean
attention each patch receives, the documented substitute). Every LLM layer then holds that count."""

from __future__ import annotations

from .. import stages
from .base import Method, VisionInputs, VisionSelection


class FasterVLM(Method):
    name = "fastervlm"
    label = "FasterVLM-style"
    stages = ("vision",)
    needs_vision_score = True
    budget_rule = "round(budget) patches chosen before the LLM, within 0.5 of a token"
    legend = "chosen before the LLM by the vision tower's CLS attention (FasterVLM)"

    def select_vision(self, x: VisionInputs) -> VisionSelection:
        kept = stages.top_score_tokens(x.score, x.keep).to(x.features.device)
        return VisionSelection(x.features[kept], kept.unsqueeze(1), x.score)


METHOD = FasterVLM
