"""Accounting reproduces the published figures from LLaVA-1.5-7B's config alone, in both conventions."""

import re

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
    # by hand: authors (2*576 + 4*500 + 4*400 + 4*300 + 18*100) = 7752; compute 3*576 + ... + 17*100 = 8228
    assert accounting.equivalent_tokens(counts, prune, L, "authors") == 242.25          # 7752 / 32
    assert accounting.equivalent_tokens(counts, prune, L, "compute") == 257.125         # 8228 / 32


def test_equivalent_tokens_generalise_to_other_depths():
    assert accounting.stage_weights([1, 3], 8, "authors") == [1, 2, 5]
    assert accounting.stage_weights([1, 3], 8, "compute") == [2, 2, 4]
    with pytest.raises(ValueError, match="prune layer 9"):
        accounting.stage_weights([1, 9], 8, "authors")


def test_kv_bytes_are_the_cache_tensors_bytes(tiny, image):
    """The KV figure is what the trimmed prefill cache occupies: the nbytes of its K and V tensors."""
    res = tiny.run(image, "what colour is the square?", tiny.config_for("64"), max_new_tokens=2,
                   keep_internals=True)
    acc = accounting.summarize(res.trace)
    assert acc["kv"]["total_bytes"] == sum(k.nbytes + v.nbytes for k, v in res.prefill_cache)
    assert acc["kv"]["bytes_per_layer"] == [k.nbytes + v.nbytes for k, v in res.prefill_cache]
    assert 0 < acc["flops"]["ratio_image_only"] < 1


def test_flops_formula_counts_a_real_decoder_forward():
    """4nd^2 + 2n^2d + 3ndm multiply-adds per layer are what torch counts on a real (MHA, eager
    attention) Llama decoder forward of n tokens; FlopCounterMode reports 2 FLOPs per multiply-add."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaModel

    layers, d, m, n = 2, 64, 176, 10
    cfg = LlamaConfig(hidden_size=d, intermediate_size=m, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=32, attn_implementation="eager")
    model = LlamaModel(cfg).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(inputs_embeds=torch.zeros(1, n, d))
    per_module = counter.get_flop_counts()
    counted = sum(sum(ops.values()) for name, ops in per_module.items()
                  if re.fullmatch(r"LlamaModel\.layers\.\d+", name))
    assert counted == 2 * accounting.prefill_flops([n] * layers, d, m)
    # by hand, per layer: 4*10*64*64 + 2*10*10*64 + 3*10*64*176 = 163840 + 12800 + 337920 = 514560
    assert counted == 2 * layers * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m) == 2 * 2 * 514_560
