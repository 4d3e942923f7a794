"""The per-method decision points of a run, in the shared machinery (one place for every host):

- ``_plan_baseline``: how a same-budget baseline meets its budget on this sample, and what it drops
  before the LLM;
- ``_decide``: the decision at each prune layer (MustDrop's dual-attention filter or a baseline's rank);
- ``_record_baseline``: what a baseline adds to the trace.

Each asks the method's plug-in (:mod:`mustdrop.methods`: built-in or a researcher's file); the rules
themselves are pure tensor functions in :mod:`mustdrop.stages`.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import methods, stages
from ..hosts.base import VisionResult


def _plan_baseline(host, vision: VisionResult, config):
    """Solve how a method given a budget meets it on this sample (its ``plan``), drop before the
    LLM what the plan drops there (its ``pre_llm`` choice), and return the config with the plan's
    drop layers and counts, so that the prefill hooks, the trace and its replay all use the same
    plan. MustDrop (no budget) and the methods that selected before the LLM pass through."""
    method = methods.get(config.method)
    if config.method == methods.DEFAULT or method.selects_before_llm:
        return vision, config
    n0 = int(vision.features.shape[0])
    builtin = methods.is_builtin(method.name)
    if config.keep_counts:
        plan = stages.BudgetPlan(method.name, float(config.budget), n0, int(config.pre_keep or n0),
                                 config.prune_layers, config.keep_counts, None, "counts given in the config")
    else:
        plan = methods.checked_plan(method, config.budget, n0, config, host.num_layers, builtin)
    pre_llm = None
    if plan.pre_keep < n0:
        sel, pre_llm = methods.checked_pre_llm(method, n0, plan.pre_keep, config, builtin)
        vision = _select_tokens(vision, sel.to(vision.features.device))
    vision.baseline = {"plan": plan.to_dict(), "params": {"pre_llm_selection": pre_llm}}
    return vision, config.replace(prune_layers=plan.layers, keep_counts=plan.keep, pre_keep=plan.pre_keep)


def _decide(attn, state, layer, config):
    """Stage 2's decision at one drop layer: the method's (MustDrop's filter, a baseline's or a
    plug-in's ranking), with the count its budget plan keeps here. Protected positions (LLaVA-NeXT
    newline rows) are kept whatever the method says."""
    method = methods.get(config.method)
    keep = None if config.method == methods.DEFAULT else config.keep_counts[config.prune_layers.index(layer)]
    x = methods.LayerInputs(attn, layer, len(state.records), keep, config, state)
    res = methods.checked_decide(method, x, methods.is_builtin(method.name))
    return stages.with_protected(res, state.protected_pos, recount=method.recount_protected)


def _record_baseline(vision: VisionResult, meta: dict, arrays: dict) -> None:
    """How the method's decisions are explained into meta["method_info"] (so that a trace of a
    plug-in replays without it); a baseline's plan and parameters into meta["baseline"]; its
    vision-side score (one per original patch) into the array baseline.vision_score."""
    meta["method_info"] = methods.get(meta["method"]).words.to_dict()
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
