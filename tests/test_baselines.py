"""Same-budget baselines run through the same adapter and trace format, and keep their budget."""

import numpy as np
import pytest

from mustdrop import stages
from mustdrop.accounting import summarize
from mustdrop.config import MustDropConfig
from mustdrop.trace import Trace

QUESTION = "what colour is the square?"


@pytest.mark.parametrize("method", ["fastv", "random"])
@pytest.mark.parametrize("budget", [250, 400])
def test_single_drop_baselines_keep_their_budget(tiny, image, method, budget):
    cfg = MustDropConfig.baseline(method, budget, layer=1, seed=3)
    trace = tiny.run(image, QUESTION, cfg, max_new_tokens=2).trace
    L = trace.num_layers
    eq = summarize(trace)["equivalent_tokens"]["compute"]
    assert abs(eq - budget) <= 0.5 * (L - 2) / L + 1e-9
    assert trace.meta["method"] == method
    assert trace.meta["stage1a"]["merged_windows"] == [] and trace.meta["stage1b"]["key_tokens"] == []


def test_fastv_keeps_the_last_tokens_top_attention(tiny, image):
    cfg = MustDropConfig.baseline("fastv", 300, layer=1)
    t = tiny.run(image, QUESTION, cfg, max_new_tokens=1).trace
    score = t.arrays["stage2.L1.global_share"]
    kept = t.arrays["stage2.L1.status"] == stages.KEPT_BOTH
    assert score[kept].min() >= score[~kept].max()


def test_random_baseline_depends_on_seed_only(tiny, image):
    a = tiny.run(image, QUESTION, MustDropConfig.baseline("random", 300, layer=1, seed=1), max_new_tokens=1).trace
    b = tiny.run(image, QUESTION, MustDropConfig.baseline("random", 300, layer=1, seed=1), max_new_tokens=1).trace
    c = tiny.run(image, QUESTION, MustDropConfig.baseline("random", 300, layer=1, seed=2), max_new_tokens=1).trace
    assert np.array_equal(a.arrays["stage2.L1.status"], b.arrays["stage2.L1.status"])
    assert not np.array_equal(a.arrays["stage2.L1.status"], c.arrays["stage2.L1.status"])


@pytest.mark.parametrize("budget, side", [(64, 8), (144, 12), (192, 14)])
def test_pool_baseline(tiny, image, budget, side, tmp_path):
    t = tiny.run(image, QUESTION, MustDropConfig.baseline("pool", budget), max_new_tokens=1).trace
    assert t.meta["sequence"]["N0"] == side * side
    assert set(t.meta["vision_tokens_per_layer"]) == {side * side}
    token = t.patch("token")
    assert (token >= 0).all() and len(np.unique(token)) == side * side, "every patch lies in one pooled cell"
    Trace.load(t.save(tmp_path / "pool.safetensors"))


def test_pool_groups_tile_the_grid():
    g = stages.pool_groups(24, 14)
    ids = g[g >= 0]
    assert sorted(set(ids.tolist())) == list(range(576))


def test_a_budget_one_drop_cannot_reach_drops_the_rest_before_the_llm(tiny, image):
    """64 tokens on 6 layers after layer 1: the two layers up to the drop alone average 192, so the
    remainder is dropped before the LLM, and the sample is never refused."""
    t = tiny.run(image, QUESTION, MustDropConfig.baseline("fastv", 64, layer=1), max_new_tokens=1).trace
    plan = t.meta["baseline"]["plan"]
    assert plan["pre_keep"] < 576 and t.meta["sequence"]["N0"] == plan["pre_keep"]
    assert t.meta["vision_tokens_per_layer"] == [plan["pre_keep"]] * 2 + [plan["keep"][0]] * 4
    assert abs(summarize(t)["equivalent_tokens"]["compute"] - 64) <= 0.5
    assert (t.patch("token") == -1).sum() == 576 - plan["pre_keep"], "patches dropped before the LLM reach no token"


def test_bad_baselines_are_refused():
    with pytest.raises(ValueError, match="budget"):
        MustDropConfig(method="fastv", prune_layers=(2,))
    with pytest.raises(ValueError, match="method"):
        MustDropConfig.baseline("mustdrop", 64)
    with pytest.raises(ValueError, match="one layer"):
        MustDropConfig(method="random", budget=64, prune_layers=(1, 2))
    with pytest.raises(ValueError, match="one count per prune layer"):
        MustDropConfig(method="pdrop", budget=64, prune_layers=(1, 2), keep_counts=(10,))
