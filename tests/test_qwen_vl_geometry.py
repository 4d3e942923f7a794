"""Qwen2-VL / Qwen2.5-VL geometry and stage 1 as pure functions (mustdrop.hosts.qwen_vl_geometry), on
non-square grids: which patches each LLM token covers and where it lies on the original image; stage 1a's
merge on the token grid (border tokens, order, centres); stage 1b's received-attention score against a
brute-force softmax; M-RoPE positions against transformers' own get_rope_index, and their shortening."""

import functools
import itertools
from types import SimpleNamespace

import pytest
import torch

from mustdrop.hosts import qwen_vl_geometry as g


def test_token_patches_cover_each_2x2_block_once_on_a_non_square_grid():
    rows, cols = 4, 6
    tp = g.token_patches(rows, cols)
    assert tp.shape == (2 * 3, 4)
    assert tp[0].tolist() == [0, 1, 6, 7]
    assert tp[1 * 3 + 2].tolist() == [2 * 6 + 4, 2 * 6 + 5, 3 * 6 + 4, 3 * 6 + 5]
    assert sorted(tp.flatten().tolist()) == list(range(rows * cols))
    with pytest.raises(ValueError, match="does not fold"):
        g.token_patches(5, 6)


def test_patch_rows_follow_the_processors_flattening():
    """The processor flattens patches as (rows/2, cols/2, 2, 2): token k's patches are rows 4k..4k+3 of
    pixel_values, and row 4k + 2i + j is patch (2r + i, 2c + j)."""
    rows, cols = 4, 6
    grid = torch.arange(rows * cols).view(rows, cols)
    proc_order = grid.view(rows // 2, 2, cols // 2, 2).permute(0, 2, 1, 3).reshape(-1)   # what the processor does
    rows_of = g.patch_rows_of_tokens(rows, cols)
    assert torch.equal(proc_order[rows_of], g.token_patches(rows, cols))


def test_resized_size_and_mapping_of_a_500x300_image():
    w, h = g.resized_size(500, 300, 14, 2, 3136, 12845056)
    assert (w, h) == (504, 308)                     # 36 x 22 patches, as the processor gives
    m = g.image_mapping(500, 300, w, h)
    boxes = g.token_boxes(m, h // 14, w // 14)
    assert boxes.shape == (11 * 18, 4)
    assert boxes[0].tolist() == [0.0, 0.0, pytest.approx(28 * 500 / 504), pytest.approx(28 * 300 / 308)]
    assert boxes[:, 2].max().item() == pytest.approx(500) and boxes[:, 3].max().item() == pytest.approx(300)
    # token (r, c) = (3, 5): columns 5*28..6*28 and rows 3*28..4*28 of the processed image
    b = boxes[3 * 18 + 5]
    assert b.tolist() == pytest.approx([140 / m["scale_xy"][0], 84 / m["scale_xy"][1],
                                        168 / m["scale_xy"][0], 112 / m["scale_xy"][1]])


def brute_similarity(x, rows, cols, w):
    out = torch.zeros(rows // w, cols // w)
    xn = x / x.norm(dim=-1, keepdim=True)
    for a in range(rows // w):
        for b in range(cols // w):
            ids = [(a * w + i) * cols + b * w + j for i in range(w) for j in range(w)]
            pairs = [float(xn[p] @ xn[q]) for p, q in itertools.permutations(ids, 2)]
            out[a, b] = sum(pairs) / len(pairs)
    return out


def test_window_similarity_on_a_grid_the_window_does_not_divide():
    x = torch.randn(5 * 7, 8, generator=torch.Generator().manual_seed(0))
    sim = g.window_similarity(x, 5, 7, 2)
    assert sim.shape == (2, 3)
    torch.testing.assert_close(sim, brute_similarity(x, 5, 7, 2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="larger than"):
        g.window_similarity(x, 5, 7, 6)
    with pytest.raises(ValueError, match=">= 2"):
        g.window_similarity(x, 5, 7, 1)


def test_merge_moves_similar_windows_to_the_front_and_leaves_border_tokens():
    rows, cols, w = 5, 7, 2
    x = torch.randn(rows * cols, 8, generator=torch.Generator().manual_seed(1))
    ids = g.window_token_ids(rows, cols, w)
    x[ids[4]] = x[ids[4][0]] * torch.tensor([1.0, 2.0, 3.0, 4.0]).unsqueeze(1)        # window 4: parallel, sim 1
    x[ids[1]] = x[ids[1][0]] + 0.01 * torch.randn(4, 8, generator=torch.Generator().manual_seed(2))  # nearly 1
    res = g.merge_token_windows(x, rows, cols, w, threshold=0.99)
    assert res.merged_windows.tolist() == [4, 1]
    assert res.tokens.shape[0] == rows * cols - 2 * 3
    torch.testing.assert_close(res.tokens[0], x[ids[4]].mean(0))
    torch.testing.assert_close(res.tokens[1], x[ids[1]].mean(0))
    rest = [t for t in range(rows * cols) if t not in set(ids[4].tolist()) | set(ids[1].tolist())]
    assert res.groups[2:, 0].tolist() == rest and (res.groups[2:, 1:] == -1).all()
    assert 34 in rest and 6 in rest                   # border row 4 and column 6 are never merged
    torch.testing.assert_close(res.tokens[2:], x[rest])
    none = g.merge_token_windows(x, rows, cols, w, threshold=1.5)
    assert none.merged_windows.numel() == 0 and torch.equal(none.tokens, x)


def test_expand_to_patches_and_centres_of_merged_tokens():
    rows, cols = 4, 6                                  # patches; tokens 2 x 3
    groups = torch.tensor([[0, 1, 3, 4], [2, -1, -1, -1], [5, -1, -1, -1]])
    patches, weights = g.expand_to_patches(groups, rows, cols)
    tp = g.token_patches(rows, cols)
    assert patches[0].tolist() == torch.cat([tp[0], tp[1], tp[3], tp[4]]).tolist()
    assert patches[1, :4].tolist() == tp[2].tolist() and (patches[1, 4:] == -1).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    assert weights[0, 0].item() == pytest.approx(1 / 16) and weights[1, 0].item() == pytest.approx(1 / 4)
    centres = g.token_centres(groups, 3)
    assert centres.tolist() == [[0.5, 0.5], [0.0, 2.0], [1.0, 2.0]]


def test_received_attention_equals_a_brute_force_softmax_per_segment():
    gen = torch.Generator().manual_seed(3)
    N, H, hd = 20, 3, 4
    q, k = torch.randn(N, H, hd, generator=gen), torch.randn(N, H, hd, generator=gen)
    cu = torch.tensor([0, 8, 12, 20], dtype=torch.int32)
    want = torch.zeros(N)
    for a, b in [(0, 8), (8, 12), (12, 20)]:
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * 0.5, dim=-1)   # (H, n, n)
        want[a:b] = p.mean(1).mean(0)
    got = g.received_attention(q, k, cu, 0.5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(g.received_attention(q, k, cu, 0.5, budget=7), got, atol=1e-6, rtol=0)
    assert got[:8].sum().item() == pytest.approx(1.0, abs=1e-5)      # each segment's mean received sums to 1


def library_rope_index(S, T, tr, tc):
    """transformers' own get_rope_index for one image between S and T text tokens (no model needed)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    fake = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2, tokens_per_second=2)),
                           get_vision_position_ids=functools.partial(Qwen2_5_VLModel.get_vision_position_ids, None))
    types = torch.tensor([[0] * S + [1] * (tr * tc) + [0] * T])
    ids = torch.zeros_like(types)
    return Qwen2_5_VLModel.get_rope_index(fake, ids, types, image_grid_thw=torch.tensor([[1, 2 * tr, 2 * tc]]))


@pytest.mark.parametrize("tr,tc", [(3, 5), (6, 2)])
def test_mrope_positions_equal_get_rope_index(tr, tc):
    S, T = 4, 3
    centres = g.token_centres(torch.arange(tr * tc).unsqueeze(1), tc)
    ids, nxt = g.mrope_position_ids(S, T, centres, tr, tc)
    want, delta = library_rope_index(S, T, tr, tc)
    assert ids.dtype == torch.long and torch.equal(ids, want)
    L0 = S + tr * tc + T
    assert g.rope_delta(nxt, L0) == int(delta)
    assert g.decode_position_ids(nxt, L0, L0, 3).tolist() == [[L0 + int(delta) + i for i in range(3)]]


def test_merged_positions_sit_at_window_centres_and_shorten_by_gathering():
    tr, tc, S, T = 4, 6, 2, 3
    x = torch.randn(tr * tc, 8, generator=torch.Generator().manual_seed(4))
    ids = g.window_token_ids(tr, tc, 2)
    x[ids[0]] = x[ids[0][0]].clone()
    res = g.merge_token_windows(x, tr, tc, 2, threshold=0.999)
    assert res.merged_windows.tolist() == [0]
    ids3, nxt = g.mrope_position_ids(S, T, g.token_centres(res.groups, tc), tr, tc)
    assert ids3.dtype == torch.float32
    assert ids3[:, 0, S].tolist() == [S, S + 0.5, S + 0.5]
    assert ids3[:, 0, S + 1].tolist() == [S, S + 0, S + 2]          # token 2 (row 0, col 2): the first unmerged
    assert nxt == S + max(tr, tc) + T
    alive = torch.tensor([0, 1, 2, 5, 7, ids3.shape[-1] - 1])
    short = g.shorten_position_ids(ids3, alive)
    assert torch.equal(short, ids3[:, :, alive])


def test_reference_positions_refusal_says_why():
    assert "3-D" in g.REFERENCE_POSITIONS_REFUSED and "positions='original'" in g.REFERENCE_POSITIONS_REFUSED
