"""Spatial pooling: the projected patch grid average-pooled (torch's adaptive_avg_pool2d) to
side x side cells, side = round(sqrt(budget)) (a square grid only, so the budget is met to
round(sqrt(budget))^2). The content-blind control of the vision-side methods."""

from __future__ import annotations

import math

import torch

from .. import stages
from .base import Method, VisionInputs, VisionSelection


def pooled_side(budget: float, grid: int) -> int:
    return max(1, min(grid, round(float(budget) ** 0.5)))


class Pool(Method):
    name = "pool"
    label = "spatial pooling"
    stages = ("vision",)
    needs_vision_score = False
    requires = {"square_grid": "average-pools a square grid of one token per patch to round(sqrt(budget))^2 cells"}
    budget_rule = "the grid average-pooled to round(sqrt(budget))^2 cells"
    legend = "each token is the average of a cell of the patch grid (pooling)"

    def plan(self, budget, n0, config, num_layers):
        side = pooled_side(budget, math.isqrt(int(n0)))
        return stages.BudgetPlan(self.name, float(budget), int(n0), side * side, (), (), None,
                                 "round(sqrt(budget))^2 pooled cells")

    def select_vision(self, x: VisionInputs) -> VisionSelection:
        side = pooled_side(x.config.budget, x.grid)
        f = x.features
        grid_features = f.view(x.grid, x.grid, -1).permute(2, 0, 1).unsqueeze(0)
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid_features.float(), side)
        features = pooled[0].permute(1, 2, 0).reshape(side * side, -1).to(f.dtype)
        return VisionSelection(features, stages.pool_groups(x.grid, side).to(features.device), None, {"side": side})


METHOD = Pool
