"""Decisions that live in stages.py only: the windows stage 1a merges, the key set per crop, the CLS
key score shared by inference and training, and the bootstrap interval of the comparison table."""

import math

import numpy as np
import torch

from analysis.common import bootstrap_interval
from mustdrop import stages


def test_windows_to_merge_takes_every_window_at_threshold_most_similar_first():
    sim = torch.tensor([[0.9, 0.5], [0.95, 0.9]])
    assert stages.windows_to_merge(sim, 0.9).tolist() == [2, 0, 3]          # ties keep window order
    assert stages.windows_to_merge(sim, 0.9, count=1).tolist() == [2]
    assert stages.windows_to_merge(sim, 0.99).numel() == 0


def test_key_set_per_crop_keeps_each_crops_share_and_never_a_newline():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(3, 40, generator=g)
    crop_of = torch.tensor([0] * 25 + [-1] + [1] * 14)
    keys = stages.key_token_set_per_crop(score, crop_of, 0.08)
    assert (crop_of[keys] >= 0).all()
    assert int((crop_of[keys] == 0).sum()) == math.ceil(0.08 * 25) and int((crop_of[keys] == 1).sum()) == math.ceil(0.08 * 14)
    mean = score.mean(0)
    for c in (0, 1):
        mine = torch.nonzero(crop_of == c).flatten()
        chosen = keys[crop_of[keys] == c]
        assert mean[chosen].min() >= mean[mine[~torch.isin(mine, chosen)]].max()
    assert keys.tolist() == sorted(keys.tolist())


def test_cls_key_score_is_the_cls_row_of_clips_own_attention():
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPAttention

    cfg = CLIPVisionConfig(hidden_size=32, num_attention_heads=4)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = CLIPAttention(cfg).eval()
    x = torch.randn(2, 1 + 9, 32)
    box = {}
    attn.q_proj.register_forward_hook(lambda m, a, o: box.__setitem__("q", o))
    attn.k_proj.register_forward_hook(lambda m, a, o: box.__setitem__("k", o))
    with torch.no_grad():
        _, weights = attn(x, output_attentions=True)
    score = stages.cls_key_score(box["q"], box["k"], 4, attn.scale)
    assert torch.allclose(score, weights[:, :, 0, 1:], atol=1e-6)
    without = stages.cls_key_score(box["q"], box["k"], 4, attn.scale, has_cls=False)
    assert torch.allclose(without, weights.mean(dim=2), atol=1e-6)


def test_bootstrap_interval_is_seeded_and_narrows_with_more_questions():
    rng = np.random.default_rng(1)
    small, big = rng.random(100) < 0.8, rng.random(1000) < 0.8
    lo, hi = bootstrap_interval(small)
    assert (lo, hi) == bootstrap_interval(small)
    assert lo <= small.mean() <= hi
    blo, bhi = bootstrap_interval(big)
    assert bhi - blo < (hi - lo) * 0.6
    assert all(math.isnan(v) for v in bootstrap_interval([float("nan")]))
