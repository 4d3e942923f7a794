"""The per-method decision points of a run, in the shared machinery (one place for every host):

- ``_plan_baseline``: how a same-budget baseline meets its budget on this sample, and what it drops
  before the LLM;
- ``_decide``: the decision at each prune layer (MustDrop's dual-attention filter or a baseline's rank);
- ``_record_baseline``: what a baseline adds to the trace.

The rules themselves are pure tensor functions in :mod:`mustdrop.stages`.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import stages
from ..hosts.base import VisionResult


def _plan_baseline(host, vision: VisionResult, config):
    """Solve how a same-budget baseline meets its budget on this sample (stages.plan_*), drop
    before the LLM what the plan drops there, and return the config with the plan's drop layers
    and counts, so that the prefill hooks, the trace and its replay all use the same plan."""
    m = config.method
    if m == "mustdrop" or m in stages.VISION_SIDE:
        return vision, config
    n0 = int(vision.features.shape[0])
    if m == "pool":
        vision.baseline = {"plan": stages.BudgetPlan(m, float(config.budget), host.grid * host.grid, n0, (), (),
                                                     None, "round(sqrt(budget))^2 pooled cells").to_dict(),
                           "params": {"side": int(round(n0 ** 0.5))}}
        return vision, config
    if config.keep_counts:
        plan = stages.BudgetPlan(m, float(config.budget), n0, int(config.pre_keep or n0), config.prune_layers,
                                 config.keep_counts, None, "counts given in the config")
    elif m == "pdrop":
        plan = stages.plan_pyramid(config.budget, n0, config.prune_layers or stages.pyramid_layers(host.num_layers),
                                   host.num_layers)
    else:
        plan = stages.plan_single_drop(m, config.budget, n0, config.prune_layers[0], host.num_layers)
    pre_llm = None
    if plan.pre_keep < n0:
        if m == "random":
            gen = torch.Generator(device="cpu").manual_seed(int(config.seed))
            sel = torch.sort(torch.randperm(n0, generator=gen)[: plan.pre_keep]).values
            pre_llm = "seeded random"
        else:
            sel = stages.evenly_spaced(n0, plan.pre_keep)
            pre_llm = "evenly spaced in raster order (no LLM score exists before the LLM)"
        vision = _select_tokens(vision, sel.to(vision.features.device))
    vision.baseline = {"plan": plan.to_dict(), "params": {"pre_llm_selection": pre_llm}}
    return vision, config.replace(prune_layers=plan.layers, keep_counts=plan.keep, pre_keep=plan.pre_keep)


def _decide(attn, state, layer, config):
    """Stage 2's decision at one prune layer: MustDrop's filter, or a same-budget baseline's.
    Protected positions (LLaVA-NeXT newline rows) are kept whatever the scores say."""
    prot = state.protected_pos
    if config.method == "mustdrop":
        if prot.numel():
            keys = torch.cat([state.key_pos, prot])
        else:     # a mask, carried from drop to drop with one gather (key_after) instead of a search
            if state.key_pos.dtype != torch.bool:
                state.key_pos = torch.zeros(state.V, dtype=torch.bool, device=attn.device).index_fill_(
                    0, state.key_pos.to(attn.device), True)
            keys = state.key_pos
        res = stages.dual_attention_filter(attn, config.global_thr, config.individual_thr, keys)
        return stages.with_protected(res, prot, recount=False)
    keep = config.keep_counts[config.prune_layers.index(layer)]      # the plan of _plan_baseline
    if config.method == "random":
        res = stages.random_keep(attn, keep, config.seed)
    else:                          # fastv, pdrop: ranked by the last (instruction) token's attention
        res = stages.fastv_keep(attn, keep)
    return stages.with_protected(res, prot)


def _record_baseline(vision: VisionResult, meta: dict, arrays: dict) -> None:
    """A baseline's plan and parameters into meta["baseline"]; its vision-side score (one per
    original patch) into the array baseline.vision_score."""
    if not vision.baseline:
        return
    b = dict(vision.baseline)
    score = b.pop("vision_score", None)
    meta["baseline"] = b
    if score is not None:
        arrays["baseline.vision_score"] = score.float().cpu().numpy().astype(np.float32)


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
                        vision.crops, vision.similarity, vision.baseline,
                        None if vision.weights is None else vision.weights[sel.to(vision.weights.device)])
