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
    n_prot = int(vision.protected.numel())
    if n_prot and min((plan.pre_keep,) + tuple(plan.keep)) < n_prot:
        raise ValueError(f"a {method.name} budget of {config.budget:g} tokens is below the {n_prot} newline tokens "
                         "this image keeps at every layer: ask for a larger budget")
    pre_llm = None
    if plan.pre_keep < n0:
        # newline tokens count toward the plan's keep and are always kept: the method chooses
        # pre_keep - protected among the others (all n0 tokens where there are none)
        sel, pre_llm = methods.checked_pre_llm(method, n0 - n_prot, plan.pre_keep - n_prot, config, builtin)
        if n_prot:
            sel = _free_positions(n0, vision.protected.cpu())[sel.cpu()]
        vision = _select_tokens(vision, sel.to(vision.features.device))
    vision.baseline = {"plan": plan.to_dict(), "params": {"pre_llm_selection": pre_llm}}
    return vision, config.replace(prune_layers=plan.layers, keep_counts=plan.keep, pre_keep=plan.pre_keep)


def _decide(attn, state, layer, config):
    """Stage 2's decision at one drop layer: the method's (MustDrop's filter, a baseline's or a
    plug-in's ranking), with the count its budget plan keeps here. Protected positions (LLaVA-NeXT
    and OneVision newline rows) are kept whatever the method says; a method with a plan counts them
    toward its ``keep`` and chooses ``keep - protected`` among the other tokens."""
    method = methods.get(config.method)
    keep = None if config.method == methods.DEFAULT else config.keep_counts[config.prune_layers.index(layer)]
    builtin = methods.is_builtin(method.name)
    x = methods.LayerInputs(attn, layer, len(state.records), keep, config, state)
    res = methods.checked_decide(method, x, builtin)
    prot = state.protected_pos
    if keep is not None and prot.numel():
        res = _decide_among_free(method, res, x, state, builtin)
    return stages.with_protected(res, prot, recount=method.recount_protected)


class _FreeState:
    """What a method choosing among the non-protected tokens sees of the prefill state: those tokens
    renumbered 0..len(free)-1, none protected."""

    def __init__(self, state, free):
        self.records, self.V = state.records, int(free.numel())
        self.protected_pos = state.protected_pos[:0]
        key = state.key_pos
        if key.dtype == torch.bool:
            key = torch.nonzero(key).flatten()
        key = key.to(free.device)
        self.key_pos = torch.searchsorted(free, key[torch.isin(key, free)])


def _decide_among_free(method, res, x, state, builtin: bool):
    """A planned method's decision with protected tokens alive: ``res`` (its decision over every
    token) gives the scores the trace records; the kept tokens and their statuses are its choice of
    keep - protected among the non-protected tokens, so that the protected ones fill the rest of the
    plan's count instead of pushing the layer over its budget."""
    prot = state.protected_pos
    free = _free_positions(x.num_tokens, prot.to(x.attn.device))
    sub = methods.LayerInputs(x.attn[..., free], x.layer, x.drop, x.keep - int(prot.numel()), x.config,
                              _FreeState(state, free))
    chosen = methods.checked_decide(method, sub, builtin)
    status = torch.full_like(res.status, stages.DROPPED)
    status[free] = chosen.status.to(status.device)
    kept = free[chosen.kept.to(free.device)]
    return stages.FilterResult(kept, kept[:0], res.global_share, res.individual_max, status,
                               x.num_tokens - kept.numel())


def _free_positions(n: int, protected: torch.Tensor) -> torch.Tensor:
    """The positions 0..n-1 that are not protected, ascending (all of them when none is)."""
    free = torch.ones(n, dtype=torch.bool, device=protected.device)
    free[protected] = False
    return torch.nonzero(free).flatten()


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
                        None if vision.weights is None else vision.weights[sel.to(vision.weights.device)],
                        None if vision.merged is None else vision.merged[sel.to(vision.merged.device)])
