"""Every same-budget baseline meets its budget as documented, on 6- and 32-layer decoders, through
the same adapter and trace: the layer-averaged vision tokens (compute convention) are the budget
within half a token (pooling: round(sqrt(budget))^2), and the trace records the plan it ran."""

import numpy as np
import pytest
import torch

from mustdrop import stages
from mustdrop.accounting import summarize
from mustdrop.config import MustDropConfig
from mustdrop.trace import Trace

QUESTION = "what colour is the square?"
EXACT = ("fastv", "random", "pdrop", "fastervlm", "visionzip")


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 32-layer decoder (LLaVA-1.5-7B's depth), tiny widths."""
    from mustdrop.adapters import LlavaMustDrop, load_llava
    from mustdrop.testing import build_tiny_llava

    d = build_tiny_llava(tmp_path_factory.mktemp("tiny-32"), text_layers=32, text_hidden=32, intermediate=64)
    m, p = load_llava(str(d))
    return LlavaMustDrop(m, p, str(d))


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    from mustdrop.adapters import LlavaMustDrop, load_llava
    from mustdrop.testing import build_tiny_siglip_llava

    d = build_tiny_siglip_llava(tmp_path_factory.mktemp("tiny-siglip"))
    m, p = load_llava(str(d))
    return LlavaMustDrop(m, p, str(d))


def _check(runner, image, method, budget, tmp_path, layer=2):
    cfg = MustDropConfig.baseline(method, budget, layer=layer, seed=5)
    t = runner.run(image, QUESTION, cfg, max_new_tokens=2).trace
    eq = summarize(t)["equivalent_tokens"]["compute"]
    assert abs(eq - budget) <= 0.5 + 1e-9, (method, budget, eq, t.meta["vision_tokens_per_layer"])
    plan = t.meta["baseline"]["plan"]
    assert plan["method"] == method == t.meta["method"] and plan["budget"] == budget
    assert t.meta["sequence"]["N0"] == plan["pre_keep"]
    expect = stages.BudgetPlan(method, budget, plan["n0"], plan["pre_keep"], tuple(plan["layers"]),
                               tuple(plan["keep"])).tokens_per_layer(t.num_layers)
    assert t.meta["vision_tokens_per_layer"] == expect, "the trace holds the plan the run used"
    assert t.prune_layers == plan["layers"] and list(t.meta["config"]["keep_counts"]) == plan["keep"]
    back = Trace.load(t.save(tmp_path / f"{method}-{budget}.safetensors"))
    assert back.meta == t.meta and set(back.arrays) == set(t.arrays)
    for k in t.arrays:
        assert np.array_equal(back.arrays[k], t.arrays[k], equal_nan=True), k
    return t


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("budget", [64, 128, 192, 400])
def test_budget_met_on_6_layers(tiny, image, method, budget, tmp_path):
    _check(tiny, image, method, budget, tmp_path, layer=1)


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("budget", [64, 192])
def test_budget_met_on_32_layers(deep, image, method, budget, tmp_path):
    t = _check(deep, image, method, budget, tmp_path, layer=2)
    if method == "pdrop":
        assert t.prune_layers == [7, 15, 23], "PyramidDrop's layers 8 / 16 / 24 of 32"


@pytest.mark.parametrize("method", ["fastervlm", "visionzip"])
def test_vision_side_without_cls_uses_the_substitute_score(siglip, image, method, tmp_path):
    t = _check(siglip, image, method, 64, tmp_path)
    assert "substitute" in t.meta["baseline"]["score"]
    assert t.patch("vision_score").shape == (27, 27)


def test_fastervlm_keeps_the_highest_cls_attention(tiny, image):
    t = tiny.run(image, QUESTION, MustDropConfig.baseline("fastervlm", 100), max_new_tokens=1).trace
    score, kept = t.patch("vision_score"), t.patch("token") >= 0
    assert kept.sum() == 100 and score[kept].min() >= score[~kept].max()


def test_visionzip_tokens_cover_every_patch_once(tiny, image):
    t = tiny.run(image, QUESTION, MustDropConfig.baseline("visionzip", 64), max_new_tokens=1).trace
    p = t.meta["baseline"]["params"]
    assert (p["dominant"], p["contextual"], p["cls_kept"]) == (53, 10, True)        # VisionZip's 54 + 10
    groups = t.arrays["tokens.groups"]
    assert (groups[0] == -1).all(), "the CLS token comes first and covers no patch"
    ids = groups[groups >= 0]
    assert sorted(ids.tolist()) == list(range(576)), "dominant + contextual tokens tile the grid"
    score = t.patch("vision_score").reshape(-1)
    dominant = groups[1:1 + 53, 0]
    others = np.setdiff1d(np.arange(576), dominant)
    assert score[dominant].min() >= score[others].max()
    assert sorted(groups[1 + 53:, 0].tolist()) == sorted(p["contextual_targets"])


def test_pdrop_ranks_by_the_last_instruction_token_at_every_layer(tiny, image):
    t = tiny.run(image, QUESTION, MustDropConfig.baseline("pdrop", 300), max_new_tokens=1).trace
    plan = t.meta["baseline"]["plan"]
    assert 0.5 <= plan["ratio"] < 1 and len(t.prune_layers) == 3
    for layer in t.prune_layers:
        score = t.arrays[f"stage2.L{layer}.global_share"]
        kept = t.arrays[f"stage2.L{layer}.status"] == stages.KEPT_BOTH
        assert score[kept].min() >= score[~kept].max()


def test_random_pre_llm_drop_depends_on_seed(tiny, image):
    a, b = (tiny.run(image, QUESTION, MustDropConfig.baseline("random", 64, layer=1, seed=s), max_new_tokens=1).trace
            for s in (1, 2))
    assert not np.array_equal(a.patch("token") >= 0, b.patch("token") >= 0)


@pytest.mark.parametrize("L", [6, 8, 32])
def test_plans_meet_every_budget_within_half_a_token(L):
    for budget in np.linspace(1, 576, 97):
        for plan in (stages.plan_single_drop("fastv", budget, 576, min(2, L - 2), L),
                     stages.plan_pyramid(budget, 576, stages.pyramid_layers(L), L),
                     stages.plan_vision_side("fastervlm", budget, 576)):
            assert abs(plan.layer_average(L) - budget) <= 0.5 + 1e-9, (plan, budget)
            counts = plan.tokens_per_layer(L)
            assert all(a >= b for a, b in zip(counts, counts[1:])) and counts[0] <= 576


def test_with_protected_keeps_newline_rows():
    res = stages.fastv_keep(torch.rand(2, 3, 10), 3)
    out = stages.with_protected(res, torch.tensor([0, 9]))
    assert {0, 9} <= set(out.kept.tolist()) and out.status[0] == out.status[9] == stages.KEPT_PROTECTED
    assert out.dropped_by_filter_only == int((out.status == stages.DROPPED).sum())


@pytest.mark.parametrize("method", ["fastv", "pdrop", "random"])
def test_a_traces_config_replays_the_same_plan(tiny, image, method):
    a = tiny.run(image, QUESTION, MustDropConfig.baseline(method, 64, layer=1, seed=4), max_new_tokens=1).trace
    b = tiny.run(image, QUESTION, MustDropConfig.from_dict(a.meta["config"]), max_new_tokens=1).trace
    assert b.meta["vision_tokens_per_layer"] == a.meta["vision_tokens_per_layer"]
    assert np.array_equal(a.patch("token") >= 0, b.patch("token") >= 0)
    for layer in a.prune_layers:
        assert np.array_equal(a.arrays[f"stage2.L{layer}.status"], b.arrays[f"stage2.L{layer}.status"])


def test_pdrop_takes_given_layers(tiny, image):
    t = tiny.run(image, QUESTION, MustDropConfig.baseline("pdrop", 300, layers=(0, 3)), max_new_tokens=1).trace
    assert t.prune_layers == [0, 3] and abs(summarize(t)["equivalent_tokens"]["compute"] - 300) <= 0.5
