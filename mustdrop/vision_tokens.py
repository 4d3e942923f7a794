"""Vision tokens per LLM layer: how many vision tokens each layer processes in prefill, from the
count entering the LLM and the drops after prune layers, and their layer average.

The one definition: the adapter records it in every trace (``vision_tokens_per_layer``), a
baseline's plan meets its budget by it (``stages.BudgetPlan``), the accounting's compute convention
and the same-budget rule (``matched.run_budget``) average it. A leaf module (imports nothing of the
package), so the pure stage functions can use it without an import circle.
"""

from __future__ import annotations


def per_layer(n0: int, drops, num_layers: int) -> list[int]:
    """Vision tokens layer 0 .. num_layers-1 process: ``n0`` up to and including the first prune layer,
    then after a drop at layer k the count kept there, from layer k + 1 on. ``drops``: {layer: kept}
    (or (layer, kept) pairs)."""
    drops = dict(drops)
    out, n = [], int(n0)
    for layer in range(num_layers):
        out.append(n)
        n = int(drops.get(layer, n))
    return out


def layer_average(counts) -> float:
    """The mean over layers of the vision tokens each processed (the compute convention; a
    baseline's budget)."""
    counts = list(counts)
    return float(sum(counts) / len(counts))
