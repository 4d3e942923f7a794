"""Same-budget baselines matched to a run: the budget a MustDrop run sets, and the baseline config
that meets it on the same model.

Why one module: ``analysis.sweep compare`` (per sample, over a dataset) and the app's "compare
with" choice (one image) must give a baseline the same budget by the same rule, or the app shows a
comparison the table never made.

The rule: the budget is the MustDrop run's layer-averaged vision tokens in the compute convention
(the mean over LLM layers of the vision tokens each layer processed); the baseline is
``MustDropConfig.baseline(method, budget, layer=K)`` with FastV's / random drop's K chosen by
:func:`auto_baseline_layer`. How each method then meets the budget (within half a token; pooling
only to round(sqrt(budget))^2) is documented in ``MustDropConfig.baseline``.
"""

from __future__ import annotations

import math

from . import methods, vision_tokens
from .accounting import vanilla_vision_tokens
from .config import MustDropConfig


def run_budget(trace) -> float:
    """The budget a run sets for a matched baseline: its layer-averaged vision tokens (compute
    convention, ``accounting.summarize(trace)["equivalent_tokens"]["compute"]``)."""
    return vision_tokens.layer_average(trace.meta["vision_tokens_per_layer"])


def auto_baseline_layer(runner, budget: float, n_tokens: int | None = None) -> int:
    """FastV / random drop layer K when none is given: the model's first prune layer (FastV's K = 2
    on LLaVA-1.5-7B), moved earlier when the layers up to K alone already average more vision tokens
    than the budget (a shallow model at a small budget); 0 when even that is too many (the adapter
    then drops the remainder before the LLM: stages.plan_single_drop).

    ``runner`` needs ``defaults.prune_layers``, ``grid`` and ``num_layers`` (an adapter); a model whose
    grid is per image (``grid`` None: Qwen-VL's dynamic resolution) gives its vision tokens as ``n_tokens``."""
    first = runner.defaults.prune_layers[0] if runner.defaults.prune_layers else 2
    L = runner.num_layers
    n = runner.grid * runner.grid if runner.grid else n_tokens
    if not n:          # a per-image grid and no run to count it from: K stays; the plan drops what K cannot
        return int(max(0, min(first, L - 2)))
    deepest = math.floor(budget * L / int(n) + 1e-9) - 1     # (K + 1) n / L <= budget
    return int(max(0, min(first, deepest, L - 2)))


def check_method(method: str) -> str:
    """The baseline method name (any registered method but MustDrop), or a ValueError that lists them."""
    if method not in methods.baselines():
        raise ValueError(f"unknown comparison method {method!r}; choose one of {', '.join(methods.baselines())}")
    return method


def matched_config(runner, method: str, trace, *, seed: int = 0, layer: int | None = None,
                   positions: str | None = None) -> MustDropConfig:
    """The config of ``method`` at the budget of ``trace`` (a pruning run of the same input on this
    runner's model), named "METHOD@PRESET" as analysis specs name it; positions as the run's."""
    check_method(method)
    cfg = trace.meta.get("config") or {}
    budget = run_budget(trace)
    if budget >= vanilla_vision_tokens(trace.meta) - 1e-9:
        raise ValueError(f"the run of preset {cfg.get('preset')!r} keeps every vision token (budget {budget:g}): "
                         "a same-budget comparison needs a run that prunes; choose a preset other than off")
    n_tokens = None if runner.grid else vanilla_vision_tokens(trace.meta)
    k = layer if layer is not None else auto_baseline_layer(runner, budget, n_tokens)
    out = MustDropConfig.baseline(method, budget, layer=k, seed=seed,
                                  positions=positions or cfg.get("positions", "reference"))
    return out.replace(preset=f"{method}@{cfg.get('preset', 'custom')}")
