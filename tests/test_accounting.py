"""Accounting reproduces the published figures from LLaVA-1.5-7B's config alone, in both conventions."""

import pytest

from mustdrop import accounting

# LLaVA-1.5-7B language model (Vicuna-7B): 32 layers, d 4096, m 11008, 32 heads (no GQA), head dim 128.
L, D, M, HEADS, HEAD_DIM = 32, 4096, 11008, 32, 128


def test_pdrop_vanilla_flops_of_llava_15_7b():
    flops = accounting.prefill_flops([576] * L, D, M)
    assert round(flops / 1e12, 2) == 3.82


def test_dart_kv_bytes_per_token_fp16():
    b = accounting.kv_bytes_per_token(L, HEADS, HEAD_DIM, 2)
    assert b == 524_288
    assert round(b / 1e6, 3) == 0.524
    assert round(2880 * b / 2**20) == 1440 and round(2880 * b / 1e6) == 1510


def test_equivalent_tokens_both_conventions_reference_layout():
    counts = [576, 500, 400, 300, 100]
    prune = [2, 6, 10, 14]
    assert accounting.stage_weights(prune, L, "authors") == [2, 4, 4, 4, 18]
    assert accounting.stage_weights(prune, L, "compute") == [3, 4, 4, 4, 17]
    assert accounting.equivalent_tokens(counts, prune, L, "authors") == pytest.approx(
        (2 * 576 + 4 * 500 + 4 * 400 + 4 * 300 + 18 * 100) / 32)
    per_layer = [576] * 3 + [500] * 4 + [400] * 4 + [300] * 4 + [100] * 17
    assert accounting.equivalent_tokens(counts, prune, L, "compute") == pytest.approx(sum(per_layer) / 32)


def test_equivalent_tokens_generalise_to_other_depths():
    assert accounting.stage_weights([1, 3], 8, "authors") == [1, 2, 5]
    assert accounting.stage_weights([1, 3], 8, "compute") == [2, 2, 4]
    with pytest.raises(ValueError, match="prune layer 9"):
        accounting.stage_weights([1, 9], 8, "authors")


def test_summary_of_a_trace_matches_its_counts(tiny, image):
    trace = tiny.run(image, "what colour is the square?", tiny.config_for("64"), max_new_tokens=2).trace
    acc = accounting.summarize(trace)
    per_layer = trace.meta["vision_tokens_per_layer"]
    assert acc["equivalent_tokens"]["compute"] == pytest.approx(sum(per_layer) / len(per_layer))
    assert 0 < acc["flops"]["ratio_image_only"] < 1
    assert acc["kv"]["total_bytes"] == sum(trace.meta["kv"]["entries_per_layer"]) * trace.meta["kv"]["bytes_per_entry"]
    assert acc["kv"]["total_bytes"] < acc["kv"]["vanilla_total_bytes"]
