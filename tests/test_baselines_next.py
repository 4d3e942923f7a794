"""Baselines on LLaVA-NeXT (stock layout): newline rows survive every drop, including the part of a
budget dropped before the LLM; the vision-side baselines, defined on one grid, are refused."""

import pytest

from mustdrop.config import MustDropConfig
from test_llava_next import next_model, stock, wide_image  # noqa: F401 - fixtures

QUESTION = "what colour is the square?"


def test_fastv_on_next_keeps_newline_rows_when_dropping_before_the_llm(stock, wide_image):  # noqa: F811
    t = stock.run(wide_image, QUESTION, MustDropConfig.baseline("fastv", 64, layer=1), max_new_tokens=1).trace
    plan = t.meta["baseline"]["plan"]
    assert plan["pre_keep"] < plan["n0"], "64 on 6 layers needs a drop before the LLM"
    newline = t.arrays["tokens.newline"].astype(bool)
    assert newline.sum() > 0
    status = t.arrays[f"stage2.L{t.prune_layers[0]}.status"]
    assert (status[newline[t.arrays[f"stage2.L{t.prune_layers[0]}.tokens"]]] == 5).all()


@pytest.mark.parametrize("method", ["fastervlm", "visionzip", "pool"])
def test_vision_side_baselines_are_refused_on_next(stock, wide_image, method):  # noqa: F811
    with pytest.raises(ValueError, match="one 24 x 24 grid"):
        stock.run(wide_image, QUESTION, MustDropConfig.baseline(method, 64), max_new_tokens=1)


@pytest.mark.parametrize("method", ["fastv", "random", "pdrop"])
def test_text_ranked_baselines_meet_their_budget_on_next(stock, wide_image, method, tmp_path):  # noqa: F811
    """The newline rows count toward the budget: the baseline chooses among the other tokens."""
    from test_baselines_budget import _check
    t = _check(stock, wide_image, method, 400, tmp_path)
    assert t.arrays["tokens.newline"].sum() > 0


def test_a_plugin_meets_its_budget_on_next_among_the_non_newline_tokens(stock, wide_image, tmp_path):  # noqa: F811
    """A researcher's method is asked, as the built-ins are, to choose among the non-newline tokens
    (its answer checked against keep - newline rows); the newline rows fill the rest of the budget."""
    from pathlib import Path

    from mustdrop import methods
    from test_baselines_budget import _check

    (m,) = methods.load_file(Path(__file__).parent.parent / "examples/methods/last_token_topk.py")
    try:
        t = _check(stock, wide_image, m.name, 400, tmp_path)
    finally:
        methods.unregister(m.name)
    newline = t.arrays["tokens.newline"].astype(bool)
    layer = t.prune_layers[0]
    alive = newline[t.arrays[f"stage2.L{layer}.tokens"]]
    status = t.arrays[f"stage2.L{layer}.status"]
    assert newline.sum() > 0 and (status[alive] == 5).all()
