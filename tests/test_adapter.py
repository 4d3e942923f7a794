"""The trace is what the model did: equivalence of hooked runs with independent references.

- a run whose config drops nothing is bitwise equal to the un-hooked model (stock generate);
- a dropping run with positions="original" equals a masking reference that keeps every token and
  hides the dropped ones with per-layer attention masks, over several generated tokens;
- after prefill every layer's KV cache holds exactly the entries the trace names;
- the same input and config give the same trace; hooks are gone after a run that raises.
"""

import numpy as np
import pytest
import torch

from mustdrop import stages
from mustdrop.adapters import Sampling
from mustdrop.config import MustDropConfig
from mustdrop.hooks import count_hooks

QUESTION = "what colour is the square?"


def no_drop_config(tiny):
    return tiny.config_for("64").replace(merge_threshold=1.0, global_thr=1.0, individual_thr=0.0)


def median_thresholds(probe) -> dict:
    """Stage 2's thresholds at the medians of a no-drop probe's scores at its first prune layer, so
    that real drops happen: {"global_thr", "individual_thr"}."""
    first = probe.prune_layers[0]
    return {"global_thr": float(np.median(probe.arrays[f"stage2.L{first}.global_share"])),
            "individual_thr": float(np.median(probe.arrays[f"stage2.L{first}.individual_max"]))}


def dropping_config(tiny, image, positions="original"):
    """Thresholds at the medians of the first prune layer's scores, so that real drops happen."""
    probe = tiny.run(image, QUESTION, no_drop_config(tiny).replace(merge_threshold=0.8), max_new_tokens=1).trace
    return tiny.config_for("64").replace(**median_thresholds(probe), positions=positions)


def stock_logits(tiny, image, n):
    model, proc = tiny.model, tiny.processor
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                      add_generation_prompt=True)
    inputs = proc(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, min_new_tokens=n)
    return [l[0].float() for l in out.logits]


def test_no_drop_run_is_bitwise_equal_to_unhooked_model(tiny, image):
    n = 4
    res = tiny.run(image, QUESTION, no_drop_config(tiny), max_new_tokens=n, keep_internals=True)
    assert res.trace.meta["sequence"]["N0"] == 576
    assert all(s["dropped"] == 0 for s in res.trace.meta["stage2"])
    ref = stock_logits(tiny, image, len(res.step_logits))
    for step, (a, b) in enumerate(zip(res.step_logits, ref)):
        assert torch.equal(a, b), f"step {step}: max diff {(a - b).abs().max()}"


def dropped_sets(trace):
    """Original-sequence indices dropped at each prune layer, and the final survivors."""
    S = trace.meta["sequence"]["S"]
    drops = {}
    for s in trace.meta["stage2"]:
        p = f"stage2.L{s['layer']}"
        toks = trace.arrays[f"{p}.tokens"]
        drops[s["layer"]] = S + toks[trace.arrays[f"{p}.status"] == stages.DROPPED]
    return drops


def masking_reference(tiny, embeds, trace, tokens, position_ids=None, next_position=None):
    """Keep all tokens at their original positions; hide the dropped ones from later layers by masks.
    ``position_ids``: the prompt's (None: the model counts 0..L0-1; Qwen-VL's 3-D ones from
    get_rope_index); ``next_position``: the first decode position (None: L0). Returns the logits of
    the prefill and of each decode step, and the prefill cache."""
    model = tiny.model
    L0 = embeds.shape[1]
    drops = dropped_sets(trace)
    prune = trace.prune_layers
    hidden_at = []
    for layer in range(tiny.num_layers):
        hidden = np.zeros(L0, bool)
        for p, idx in drops.items():
            if p < layer:
                hidden[idx] = True
        hidden_at.append(torch.from_numpy(hidden))
    final_hidden = hidden_at[-1] | torch.from_numpy(np.isin(np.arange(L0), drops[prune[-1]]))

    def mask_for(layer, q_len, kv_len):
        if q_len > 1:
            allowed = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
            allowed[:, hidden_at[layer]] = False
            allowed |= torch.eye(q_len, dtype=torch.bool)     # a hidden token's own row stays finite
        else:
            allowed = torch.ones(1, kv_len, dtype=torch.bool)
            if layer >= prune[0]:
                allowed[0, :L0][final_hidden] = False
        return allowed[None, None]

    handles = []
    for layer_idx, layer in enumerate(tiny.decoder_layers):
        def pre(module, args, kwargs, layer_idx=layer_idx):
            h = args[0] if args else kwargs["hidden_states"]
            kv_len = kwargs["past_key_values"].layers[layer_idx].get_seq_length() + h.shape[1]
            kwargs["attention_mask"] = mask_for(layer_idx, h.shape[1], kv_len)
            return args, kwargs
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    from transformers import DynamicCache
    cache = DynamicCache(config=tiny.text_config)
    logits = []
    try:
        with torch.no_grad():
            extra = {} if position_ids is None else {"position_ids": position_ids}
            out = model(inputs_embeds=embeds, past_key_values=cache, use_cache=True, **extra)
            prefill_cache = [(l.keys.clone(), l.values.clone()) for l in cache.layers]
            logits.append(out.logits[0, -1].float())
            first = L0 if next_position is None else next_position
            for step, tok in enumerate(tokens[:-1]):
                out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True,
                            position_ids=torch.tensor([[first + step]]))
                logits.append(out.logits[0, -1].float())
    finally:
        for h in handles:
            h.remove()
    return logits, prefill_cache


@pytest.fixture(scope="module")
def dropping_run(tiny):
    from conftest import half_textured_image
    image = half_textured_image()
    cfg = dropping_config(tiny, image)
    res = tiny.run(image, QUESTION, cfg, max_new_tokens=5, keep_internals=True)
    return res


def test_dropping_run_really_drops(dropping_run):
    meta = dropping_run.trace.meta
    assert 0 < meta["stage1a"]["merged_windows"].__len__() < 64
    assert meta["stage2"][0]["dropped"] > 0
    assert meta["vision_tokens_per_layer"][-1] < meta["sequence"]["N0"]


def test_dropping_run_equals_masking_reference(tiny, dropping_run):
    trace = dropping_run.trace
    tokens = trace.meta["generation"]["token_ids"]
    ref, _ = masking_reference(tiny, dropping_run.inputs_embeds, trace, tokens)
    assert len(ref) == len(dropping_run.step_logits) >= 3
    for step, (a, b) in enumerate(zip(dropping_run.step_logits, ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"step {step}")


def test_kv_cache_after_prefill_is_what_the_trace_says(tiny, dropping_run):
    trace = dropping_run.trace
    _, ref_cache = masking_reference(tiny, dropping_run.inputs_embeds, trace, [0])
    for layer, (keys, values) in enumerate(dropping_run.prefill_cache):
        idx = torch.from_numpy(trace.arrays[f"kv.L{layer}"])
        assert keys.shape[-2] == idx.numel() == trace.meta["kv"]["entries_per_layer"][layer]
        torch.testing.assert_close(keys, ref_cache[layer][0][:, :, idx], atol=1e-5, rtol=0)
        torch.testing.assert_close(values, ref_cache[layer][1][:, :, idx], atol=1e-5, rtol=0)
    first = trace.prune_layers[0]
    S, N0, T = (trace.meta["sequence"][k] for k in ("S", "N0", "T"))
    assert trace.meta["kv"]["entries_per_layer"][first - 1 if first else 0] == (S + N0 + T if first else
                                                                                   trace.meta["kv"]["entries_per_layer"][0])
    survivors = S + T + trace.meta["vision_tokens_per_layer"][-1]
    assert all(n == survivors for n in trace.meta["kv"]["entries_per_layer"][first:])


def strip_timings(trace):
    meta = dict(trace.meta)
    meta.pop("timings")
    return meta


def test_same_input_same_trace(tiny, image):
    cfg = tiny.config_for("64")
    a = tiny.run(image, QUESTION, cfg, max_new_tokens=3).trace
    b = tiny.run(image, QUESTION, cfg, max_new_tokens=3).trace
    assert strip_timings(a) == strip_timings(b)
    assert a.arrays.keys() == b.arrays.keys()
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=k)


@pytest.mark.parametrize("where", ["local_spatial_merge", "dual_attention_filter", "kv_keep_indices",
                                   "decode"])
def test_fault_inside_a_hook_leaves_the_model_clean(tiny, tiny_dir, image, monkeypatch, where):
    """An exception mid-run reaches the caller, every hook is removed, and the next run on the same
    loaded model equals a run on a freshly loaded model."""
    from mustdrop.adapters import LlavaMustDrop, load_llava
    from mustdrop.run import decode as decode_module
    before = count_hooks(tiny.model)
    assert before == 0

    def boom(*a, **k):
        raise RuntimeError(f"injected fault in {where}")
    if where == "decode":
        monkeypatch.setattr(decode_module, "_choose", boom)
    else:
        monkeypatch.setattr(stages, where, boom)
    with pytest.raises(RuntimeError, match="injected fault"):
        tiny.run(image, QUESTION, tiny.config_for("64"), max_new_tokens=3)
    assert count_hooks(tiny.model) == before
    monkeypatch.undo()
    cfg = tiny.config_for("64")
    again = tiny.run(image, QUESTION, cfg, max_new_tokens=3).trace
    assert count_hooks(tiny.model) == before
    model, proc = load_llava(str(tiny_dir))
    fresh = LlavaMustDrop(model, proc, str(tiny_dir)).run(image, QUESTION, cfg, max_new_tokens=3).trace
    assert strip_timings(again) == strip_timings(fresh)
    for k in fresh.arrays:
        np.testing.assert_array_equal(again.arrays[k], fresh.arrays[k], err_msg=k)


@pytest.mark.parametrize("positions", ["reference", "original"])
def test_sampling_runs_every_stage_and_is_seeded(tiny, image, positions):
    cfg = dropping_config(tiny, image, positions)
    s = Sampling(temperature=1.0, top_p=0.9, seed=7)
    a = tiny.run(image, QUESTION, cfg, max_new_tokens=4, sampling=s).trace
    b = tiny.run(image, QUESTION, cfg, max_new_tokens=4, sampling=s).trace
    assert a.meta["generation"]["mode"] == "sampling"
    assert a.meta["stage2"][0]["dropped"] > 0
    assert a.meta["kv"]["entries_per_layer"][-1] < a.meta["kv"]["entries_per_layer"][0] or a.prune_layers[0] == 0
    assert a.meta["generation"]["token_ids"] == b.meta["generation"]["token_ids"]


def test_reference_positions_change_the_computation(tiny, image):
    cfg = dropping_config(tiny, image, "reference")
    ref = tiny.run(image, QUESTION, cfg, max_new_tokens=3, keep_internals=True)
    orig = tiny.run(image, QUESTION, cfg.replace(positions="original"), max_new_tokens=3, keep_internals=True)
    assert ref.trace.meta["stage2"][0] == orig.trace.meta["stage2"][0]
    assert not torch.equal(ref.step_logits[0], orig.step_logits[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs(tiny_dir, image, dtype):
    from mustdrop.adapters import LlavaMustDrop, load_llava
    model, proc = load_llava(str(tiny_dir), dtype={torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype])
    md = LlavaMustDrop(model, proc, str(tiny_dir))
    trace = md.run(image, QUESTION, md.config_for("64"), max_new_tokens=2).trace
    assert trace.meta["model"]["dtype"] == str(dtype).replace("torch.", "")
    assert trace.meta["kv"]["bytes_per_entry"] == 2 * 2 * 16 * 2   # K+V, 2 kv heads, head dim 16, 2 bytes


def test_batch_and_bad_inputs_are_refused(tiny, image):
    with pytest.raises(ValueError, match="one image"):
        tiny.run([image, image], QUESTION, tiny.config_for("64"))
    with pytest.raises(ValueError, match="empty"):
        tiny.run(image, "   ", tiny.config_for("64"))
    with pytest.raises(ValueError, match="image placeholder"):
        tiny.run(image, "what is <image> here", tiny.config_for("64"))
    with pytest.raises(ValueError, match="prune layer 40"):
        tiny.run(image, QUESTION, tiny.config_for("64").replace(prune_layers=(1, 40)))
    with pytest.raises(ValueError, match="max new tokens"):
        tiny.run(image, QUESTION, tiny.config_for("64"), max_new_tokens=0)


@pytest.fixture(scope="module")
def eager(tiny_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from mustdrop.adapters import LlavaMustDrop
    model = LlavaForConditionalGeneration.from_pretrained(str(tiny_dir), attn_implementation="eager").eval()
    return LlavaMustDrop(model, AutoProcessor.from_pretrained(str(tiny_dir)), str(tiny_dir))


def test_text_row_scores_equal_eager_attention_rows(eager, image):
    """Stage 2's T x L scoring equals the rows of the full eager attention map it never builds."""
    from transformers import DynamicCache
    from mustdrop.adapters.llava import text_rows_attention
    layer = eager.decoder_layers[2].self_attn
    got = {}

    def grab(module, args, kwargs, output):
        keys = kwargs["past_key_values"].layers[module.layer_idx].keys
        got["ours"] = text_rows_attention(module, kwargs["hidden_states"], kwargs["position_embeddings"], keys,
                                          10, eager.host._rope)
        got["eager"] = output[1]
    h = layer.register_forward_hook(grab, with_kwargs=True)
    try:
        proc = eager.processor
        prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                          add_generation_prompt=True)
        inputs = proc(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            eager.model(**inputs, past_key_values=DynamicCache(config=eager.text_config), use_cache=True,
                        output_attentions=True)
    finally:
        h.remove()
    full = got["eager"][:, :, -10:].float()
    torch.testing.assert_close(got["ours"], full, atol=1e-6, rtol=0)


def test_eager_attention_gives_the_same_decisions(eager, tiny, image):
    """With eager attention the adapter gathers the 4-D mask; decisions and logits match sdpa's."""
    cfg = dropping_config(tiny, image, "original")
    a = tiny.run(image, QUESTION, cfg, max_new_tokens=3, keep_internals=True)
    b = eager.run(image, QUESTION, cfg, max_new_tokens=3, keep_internals=True)
    assert a.trace.meta["stage2"] == b.trace.meta["stage2"]
    for x, y in zip(a.step_logits, b.step_logits):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
