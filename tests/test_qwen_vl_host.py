"""The Qwen2.5-VL / Qwen2-VL host (mustdrop.hosts.qwen_vl) on tiny copies of the published checkpoints
(tests/published: published config, processor settings and chat template, widths shrunk), as issue 27's
"Tested as the published checkpoints are" asks:
- the placeholders the processor writes equal the feature rows, and the trace records the (rows, cols)
  patch grid and each token's 2 x 2 patches with weights;
- the trace's mapping puts each token on the pixels the processor really placed (a non-square image);
- a run that drops nothing is bitwise the un-hooked model's generate;
- a dropping run with original positions equals an attention-masking reference (positions from
  transformers' own get_rope_index), and so does one that also merges windows (merged tokens at their
  window centre);
- every built-in method runs and meets its budget, or is refused with a message; so is
  positions="reference"; no hook is left behind."""

import numpy as np
import pytest
import torch
from PIL import Image

from mustdrop.accounting import summarize
from mustdrop import methods
from mustdrop.config import MustDropConfig
from mustdrop.hooks import count_hooks
from mustdrop.trace import Trace

from test_adapter import masking_reference as adapter_reference, median_thresholds
from test_published_new_families import PUBLISHED, QWEN

QUESTION = "what colour is the square?"


@pytest.fixture(scope="module", params=QWEN)
def qwen(request, tmp_path_factory):
    from mustdrop.adapters import make_runner
    from mustdrop.loading import load_llava
    from mustdrop.testing import build_published_tiny_any
    name = request.param
    folder = build_published_tiny_any(tmp_path_factory.mktemp(name), PUBLISHED / name, text_layers=8)
    model, proc = load_llava(str(folder))
    return make_runner(model, proc, f"Qwen/{name}", defaults_from=str(folder))


def textured(width=500, height=300, seed=0):
    """Left part noise (windows stay apart), right part flat with a square (windows merge)."""
    rng = np.random.default_rng(seed)
    a = np.empty((height, width, 3), np.uint8)
    a[:] = (40, 120, 200)
    a[:, : width // 2] = rng.integers(0, 256, (height, width // 2, 3))
    a[100:200, 320:420] = (250, 200, 20)
    return Image.fromarray(a)


def no_drop(qwen):
    return qwen.config_for("64").replace(merge=False, global_thr=1.0, individual_thr=0.0)


def stock_inputs(qwen, image):
    proc = qwen.processor
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                      add_generation_prompt=True)
    return proc(images=image, text=prompt, return_tensors="pt")


def test_placeholders_equal_feature_rows_and_the_trace_records_the_grid(qwen):
    image = textured()
    inputs = stock_inputs(qwen, image)
    placeholders = int((inputs["input_ids"][0] == qwen.image_token_id).sum())
    t = qwen.run(image, QUESTION, no_drop(qwen), max_new_tokens=1).trace
    assert placeholders == t.meta["sequence"]["N0"] == 198
    assert t.meta["sequence"]["N"] == 22 * 36 and t.crop_grid(0) == (22, 36)
    groups, weights = t.arrays["tokens.groups"], t.arrays["tokens.weights"]
    assert groups.shape == (198, 4) and np.allclose(weights, 0.25)
    assert sorted(groups.flatten().tolist()) == list(range(22 * 36))
    assert groups[1].tolist() == [2, 3, 36 + 2, 36 + 3]            # token (0, 1): patches of rows 0-1, cols 2-3
    assert t.meta["input"]["mapping"]["processed"] == [504, 308]
    assert "substitute" in t.meta["stage1b"]["score"]
    assert t.patch("merged").sum() == 0                      # a 2 x 2 block is one token, not a merged window


def processed_image(pixel_values, rows, cols, patch=14, merge=2):
    """The processed image back from pixel_values as the published processor flattens it: rows in
    (rows/2, cols/2, 2, 2) order, each row (3, temporal 2, patch, patch)."""
    pv = pixel_values.view(rows // merge, cols // merge, merge, merge, 3, 2, patch, patch)[..., 0, :, :]
    return pv.permute(0, 2, 5, 1, 3, 6, 4).reshape(rows * patch, cols * patch, 3)


def test_the_mapping_hits_the_pixels_the_processor_placed(qwen):
    from mustdrop.vis.geometry import original_box
    base = Image.new("RGB", (500, 300), (0, 0, 0))
    t = qwen.run(base, QUESTION, no_drop(qwen), max_new_tokens=1).trace
    rows, cols = t.crop_grid(0)
    for token in (0, 17, 5 * 18 + 11, 197):                       # corners and a middle token of the 11 x 18 grid
        patches = t.arrays["tokens.groups"][token]
        boxes = [original_box(t, int(p) // cols, int(p) % cols) for p in patches]
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        a = np.zeros((300, 500, 3), np.uint8)
        a[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1] = 255
        pv = stock_inputs(qwen, Image.fromarray(a))["pixel_values"]
        img = processed_image(pv, rows, cols).mean(-1)             # normalised brightness
        r, c = divmod(token, cols // 2)
        inside = img[r * 28 + 4:(r + 1) * 28 - 4, c * 28 + 4:(c + 1) * 28 - 4]
        outside = img.clone()
        outside[max(0, r * 28 - 14):(r + 1) * 28 + 14, max(0, c * 28 - 14):(c + 1) * 28 + 14] = float("-inf")
        assert inside.min() > 1.5 and outside.max() < -1.0, token    # white there, black beyond one patch


def stock_logits(qwen, image, n):
    inputs = stock_inputs(qwen, image)
    with torch.no_grad():
        out = qwen.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    return [l[0].float() for l in out.logits]


def test_no_drop_run_is_bitwise_the_unhooked_generate(qwen):
    image = textured()
    res = qwen.run(image, QUESTION, no_drop(qwen), max_new_tokens=4, keep_internals=True)
    assert res.trace.meta["sequence"]["N0"] == 198 and all(s["dropped"] == 0 for s in res.trace.meta["stage2"])
    ref = stock_logits(qwen, image, len(res.step_logits))
    assert len(ref) == 4
    for step, (a, b) in enumerate(zip(res.step_logits, ref)):
        assert torch.equal(a, b), f"step {step}: max diff {(a - b).abs().max()}"
    assert count_hooks(qwen.model) == 0


def rope_index(qwen, image):
    """Position ids of the unpruned prompt and the first decode position, from transformers' get_rope_index."""
    inputs = stock_inputs(qwen, image)
    ids, delta = qwen.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                 image_grid_thw=inputs["image_grid_thw"])
    return ids, inputs["input_ids"].shape[1] + int(delta)


def masking_reference(qwen, embeds, position_ids, next_position, trace, tokens):
    """Every token kept at its 3-D position; the dropped ones hidden from later layers by masks
    (test_adapter's reference, given the prompt's M-RoPE ids and the first decode position)."""
    return adapter_reference(qwen, embeds, trace, tokens, position_ids=position_ids, next_position=next_position)[0]


def dropping(qwen, image, **changes):
    """Thresholds at the medians of the first prune layer's scores, so that real drops happen."""
    base = no_drop(qwen).replace(**changes)
    probe = qwen.run(image, QUESTION, base, max_new_tokens=1).trace
    return base.replace(**median_thresholds(probe))


def assert_equal_logits(run, ref):
    assert len(ref) == len(run.step_logits) >= 3
    for step, (a, b) in enumerate(zip(run.step_logits, ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"step {step}")


def test_dropping_run_with_original_positions_equals_the_masking_reference(qwen):
    image = textured()
    res = qwen.run(image, QUESTION, dropping(qwen, image), max_new_tokens=4, keep_internals=True)
    t = res.trace
    assert t.meta["stage2"][0]["dropped"] > 0 and t.meta["vision_tokens_per_layer"][-1] < 198
    ids, next_position = rope_index(qwen, image)
    ref = masking_reference(qwen, res.inputs_embeds, ids, next_position, t, t.meta["generation"]["token_ids"])
    assert_equal_logits(res, ref)
    assert count_hooks(qwen.model) == 0


@pytest.mark.parametrize("window", [2, 3])
def test_merging_and_dropping_run_equals_the_masking_reference(qwen, window):
    from mustdrop.hosts import qwen_vl_geometry as geo
    image = textured()
    res = qwen.run(image, QUESTION, dropping(qwen, image, merge=True, merge_threshold=0.9, window=window),
                   max_new_tokens=4, keep_internals=True)
    t = res.trace
    merged = t.meta["stage1a"]["merged_windows"]
    assert 0 < len(merged) and t.meta["sequence"]["N0"] == 198 - (window * window - 1) * len(merged)
    assert t.meta["stage2"][0]["dropped"] > 0
    assert t.patch("merged").sum() == len(merged) * (2 * window) ** 2    # exactly the merged windows' patches
    tr, tc = 11, 18
    # the merged tokens' positions: the centre of their window on the token grid, from the trace's records
    first = t.arrays["tokens.groups"][:, ::4]                  # the first patch of each covered token
    token_groups = torch.from_numpy(np.where(first >= 0, (first // 36 // 2) * tc + (first % 36) // 2, -1))
    ids, next_position = geo.mrope_position_ids(t.meta["sequence"]["S"], t.meta["sequence"]["T"],
                                                geo.token_centres(token_groups, tc), tr, tc)
    if window == 2:
        assert ids.dtype == torch.float32                      # half-integer centres
    ref = masking_reference(qwen, res.inputs_embeds, ids, next_position, t, t.meta["generation"]["token_ids"])
    assert_equal_logits(res, ref)
    sim = t.patch("similarity")                               # windows of 2w x 2w patches; border rows / cols NaN
    inside_r, inside_c = tr // window * window * 2, tc // window * window * 2
    assert not np.isnan(sim[:inside_r, :inside_c]).any()
    assert np.isnan(sim[inside_r:]).all() and np.isnan(sim[:, inside_c:]).all()
    assert (inside_r, inside_c) != (22, 36)


def test_reference_positions_are_refused_with_the_reason(qwen):
    with pytest.raises(ValueError, match="3-D"):
        qwen.run(textured(), QUESTION, qwen.config_for("64").replace(positions="reference"), max_new_tokens=1)
    assert count_hooks(qwen.model) == 0
    assert qwen.config_for("64").positions == "original"


@pytest.mark.parametrize("method", methods.baselines())
def test_every_baseline_meets_its_budget_or_is_refused(qwen, method, tmp_path):
    image = textured()
    cfg = MustDropConfig.baseline(method, 64, layer=1, seed=5, positions="original")
    unmet = [need for need in methods.get(method).requires if need in qwen.host.vision_lacks]
    if unmet:                                    # pooling (a square grid), VisionZip (a one-token projector)
        with pytest.raises(ValueError, match=f"{method} baseline is not defined on Qwen2-VL / Qwen2.5-VL: it ") as e:
            qwen.run(image, QUESTION, cfg, max_new_tokens=1)
        assert methods.get(method).requires[unmet[0]] in str(e.value)
        assert qwen.host.vision_lacks[unmet[0]] in str(e.value)
        assert count_hooks(qwen.model) == 0
        return
    t = qwen.run(image, QUESTION, cfg, max_new_tokens=2).trace
    eq = summarize(t)["equivalent_tokens"]["compute"]
    assert abs(eq - 64) <= 0.5 + 1e-9, (method, eq, t.meta["vision_tokens_per_layer"])
    assert t.meta["baseline"]["plan"]["method"] == method
    if method == "fastervlm":
        assert t.patch("vision_score").shape == (22, 36)
    back = Trace.load(t.save(tmp_path / f"{method}.safetensors"))
    assert back.meta == t.meta


@pytest.mark.parametrize("entry", ["lmms-eval", "analysis"])
def test_every_entry_point_gives_baselines_the_models_positions(qwen, entry):
    """lmms-eval's model args and analysis specs that name no positions run on Qwen-VL: MustDrop and the
    baselines take the model's default (original), not the authors' compaction it refuses."""
    if entry == "lmms-eval":
        pytest.importorskip("lmms_eval", reason="lmms-eval not installed (requirements-lmms.txt)")
        from mustdrop.lmms import build_config

        configs = [build_config(qwen, preset="64"), build_config(qwen, method="fastv", budget=64, layer=1)]
        with pytest.raises(ValueError, match="3-D"):        # named, it is refused when lmms-eval builds the model
            build_config(qwen, method="fastv", budget=64, positions="reference")
    else:
        from analysis.common import build_config, parse_spec

        from mustdrop.accounting import vanilla_vision_tokens
        from mustdrop.matched import run_budget

        md = qwen.run(textured(), QUESTION, build_config(qwen, parse_spec("64")), max_new_tokens=1).trace
        configs = [MustDropConfig.from_dict(md.meta["config"]), build_config(qwen, parse_spec("fastv@64"), budget=run_budget(md), n_tokens=vanilla_vision_tokens(md.meta)),
                   build_config(qwen, parse_spec("pdrop=48")), build_config(qwen, parse_spec("random=20"))]
    assert [c.positions for c in configs] == ["original"] * len(configs)
    for cfg in configs[1:]:
        t = qwen.run(textured(), QUESTION, cfg, max_new_tokens=1).trace
        assert t.meta["config"]["positions"] == "original" and t.meta["vision_tokens_per_layer"][-1] < 198


class EvenColumnsByScore(methods.Method):
    """A researcher's method that selects before the LLM: the best-scored tokens of the even token
    columns, recording its own score (the negated one it was given)."""

    name = "test_even_columns"
    label = "even columns by score"
    stages = ("vision",)
    budget_rule = "round(budget) tokens before the LLM"

    def select_vision(self, x):
        rows, cols = x.grid_shape
        assert x.grid is None and rows * cols == x.features.shape[0] == x.score.shape[0]
        even = torch.arange(rows * cols, device=x.score.device) % cols % 2 == 0
        kept = torch.sort(torch.topk(torch.where(even, x.score, -torch.inf), x.keep).indices).values
        return methods.VisionSelection(x.features[kept], kept.unsqueeze(1), -x.score, {"columns": "even"})


def test_a_plugin_that_selects_before_the_llm_runs_on_the_token_grid(qwen, tmp_path):
    """A plug-in's own vision-side choice is what the LLM gets (it was silently ignored before): its
    tokens on the rows x cols token grid, drawn on their 2 x 2 patches, with its score per patch."""
    from mustdrop.hosts import qwen_vl_geometry as geo

    m = methods.register(EvenColumnsByScore)
    try:
        t = qwen.run(textured(), QUESTION, MustDropConfig.baseline(m.name, 40, positions="original"),
                     max_new_tokens=2).trace
        fv = qwen.run(textured(), QUESTION, MustDropConfig.baseline("fastervlm", 40, positions="original"),
                      max_new_tokens=2).trace
    finally:
        methods.unregister(m.name)
    rows, cols = t.meta["crops"][0]["grid"]
    assert (rows, cols) == (22, 36) and t.meta["vision_tokens_per_layer"] == [40] * 8
    assert t.meta["baseline"]["params"] == {"vision_layer": qwen.host.vision_config.depth - 1, "columns": "even"}
    groups = t.arrays["tokens.groups"]
    tokens = groups[:, 0] // cols // 2 * (cols // 2) + groups[:, 0] % cols // 2
    np.testing.assert_array_equal(groups, geo.token_patches(rows, cols).numpy()[tokens])   # each its 2 x 2 patches
    assert (tokens % (cols // 2) % 2 == 0).all() and (np.diff(tokens) > 0).all()
    mine, received = t.patch("vision_score"), fv.patch("vision_score")    # per patch, (rows, cols)
    token_mean = received.reshape(rows // 2, 2, cols // 2, 2).mean((1, 3))
    np.testing.assert_allclose(mine, -np.repeat(np.repeat(token_mean, 2, 0), 2, 1), rtol=1e-5)
    even_best = np.sort(np.argsort(-np.where(np.arange(token_mean.size) % (cols // 2) % 2 == 0,
                                             token_mean.ravel(), -np.inf), kind="stable")[:40])
    np.testing.assert_array_equal(tokens, even_best)
    fv_tokens = fv.arrays["tokens.groups"][:, 0]
    fv_tokens = fv_tokens // cols // 2 * (cols // 2) + fv_tokens % cols // 2
    np.testing.assert_array_equal(fv_tokens, np.sort(np.argsort(-token_mean.ravel(), kind="stable")[:40]))
    back = Trace.load(t.save(tmp_path / "plugin.safetensors"))
    assert back.meta == t.meta and count_hooks(qwen.model) == 0


def test_mustdrop_presets_run_and_replay(qwen, tmp_path):
    image = textured()
    for preset in ("64", "128", "192", "off"):
        t = qwen.run(image, QUESTION, qwen.config_for(preset), max_new_tokens=2).trace
        per_layer = t.meta["vision_tokens_per_layer"]
        assert len(per_layer) == 8 and per_layer[0] == t.meta["sequence"]["N0"] <= 198
        key = t.meta["stage1b"]["key_tokens"]
        assert preset == "off" or len(key) == int(np.ceil(0.08 * t.meta["sequence"]["N0"]))
        assert set(key) <= set(t.arrays[f"stage2.L{t.prune_layers[-1]}.tokens"].tolist()) if preset != "off" else True
        back = Trace.load(t.save(tmp_path / f"{preset}.safetensors"))
        assert back.meta == t.meta


def test_key_score_is_the_attention_received_in_the_last_block_in_the_models_token_order(qwen):
    """Stage 1b's score against the library's own eager attention weights of the last vision block, read per
    token in raster order through the model's own un-permutation (the merger output is put back in order by
    Qwen2.5-VL's forward): the host's window bookkeeping is checked by the model's."""
    import sys

    from transformers import AttentionInterface
    t = qwen.run(textured(), QUESTION, no_drop(qwen), max_new_tokens=1).trace
    visual = qwen.model.model.visual
    last = visual.blocks[-1].attn
    eager = sys.modules[type(last).__module__].eager_attention_forward
    chunks = []

    def record(module, q, k, v, attention_mask, scaling, dropout=0.0, **kw):
        out, w = eager(module, q, k, v, attention_mask, scaling, dropout, **kw)
        if module is last:
            chunks.append(w[0].float())                      # (H, n, n) of one attention segment
        return out, w

    def per_token(module, args, kwargs, out):                # each merger row := its 4 patches' mean received attention
        rows = torch.cat([w.mean(1).mean(0) for w in chunks])
        return rows.view(-1, 4).mean(1, keepdim=True).expand(-1, out.shape[1]).to(out.dtype)

    AttentionInterface.register("mustdrop_test_record", record)
    old = last.config._attn_implementation
    handle = visual.merger.register_forward_hook(per_token, with_kwargs=True)
    try:
        last.config._attn_implementation = "mustdrop_test_record"
        inputs = stock_inputs(qwen, textured())
        with torch.no_grad():
            out = qwen.model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                      image_grid_thw=inputs["image_grid_thw"])
    finally:
        last.config._attn_implementation = old
        handle.remove()
    want = out.pooler_output[0][:, 0].float().numpy()
    assert len(chunks) > (1 if qwen.host.windowed else 0)
    np.testing.assert_allclose(t.arrays["stage1b.key_score"], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", QWEN)
def test_shipped_defaults_scale_the_prune_layers_to_the_published_depth(name):
    import json

    from mustdrop.config import ModelDefaults, scaled_prune_layers
    depth = json.loads((PUBLISHED / name / "config.json").read_text())
    depth = depth.get("text_config", {}).get("num_hidden_layers") or depth["num_hidden_layers"]
    d = ModelDefaults.load(f"Qwen/{name}", depth)
    assert d.prune_layers == scaled_prune_layers(depth) and max(d.prune_layers) < depth
    assert d.positions == "original" and "not yet calibrated" in d.source
    cfg = MustDropConfig.preset_for("64", d)
    assert cfg.positions == "original" and cfg.prune_layers == d.prune_layers
    assert ModelDefaults.from_file(PUBLISHED.parent.parent / "mustdrop" / "defaults" / f"Qwen--{name}.json").to_json()["positions"] == "original"


def test_same_budget_comparison_of_a_mustdrop_run(qwen):
    """The app's Compare choice: a baseline at the budget of a MustDrop run (mustdrop.matched), with the
    run's positions; the drop layer is chosen from this image's token count (the grid is per image)."""
    from mustdrop.matched import matched_config, run_budget
    image = textured()
    run = qwen.run(image, QUESTION, dropping(qwen, image), max_new_tokens=1).trace
    for method in ("fastv", "random", "pdrop", "fastervlm"):
        cfg = matched_config(qwen, method, run)
        assert cfg.positions == "original"
        t = qwen.run(image, QUESTION, cfg, max_new_tokens=1).trace
        assert abs(run_budget(t) - run_budget(run)) <= 0.5 + 1e-9, method


def test_a_window_larger_than_the_images_token_grid_is_refused_with_a_message(qwen):
    small = textured(60, 60)                                   # smart_resize: 56 x 56 px, a 2 x 2 token grid
    with pytest.raises(ValueError, match="larger than the 2 x 2 token grid"):
        qwen.run(small, QUESTION, qwen.config_for("64"), max_new_tokens=1)
    with pytest.raises(ValueError, match=">= 2"):
        qwen.run(small, QUESTION, qwen.config_for("64").replace(window=1), max_new_tokens=1)
    t = qwen.run(small, QUESTION, qwen.config_for("64").replace(window=2), max_new_tokens=1).trace
    assert t.crop_grid(0) == (4, 4) and t.meta["sequence"]["N0"] in (1, 4)
    assert count_hooks(qwen.model) == 0


def test_an_image_whose_grid_a_trace_cannot_hold_is_refused_before_the_tower_runs(qwen, monkeypatch):
    """At the published max_pixels every image the loader accepts (20:1 at most) fits the trace bounds,
    so the bound is lowered here to reach the guard: a 500 x 300 image is a 22 x 36 patch grid."""
    from mustdrop import trace_checks
    monkeypatch.setattr(trace_checks, "MAX_GRID", 30)
    with pytest.raises(ValueError, match="patches a side"):
        qwen.run(textured(500, 300), QUESTION, qwen.config_for("64"), max_new_tokens=1)
    assert count_hooks(qwen.model) == 0


def test_vanilla_figures_of_a_pruned_run_are_the_vanilla_runs_own(qwen):
    """The accounting's vanilla FLOPs and KV count the tokens the unpruned model feeds its LLM (one per
    2 x 2 patches here), not the patches: they equal the vanilla run's own figures on the same image.
    A trace written before N_vanilla was recorded gets the same count back from its merges."""
    image = textured()
    off = qwen.run(image, QUESTION, qwen.config_for("off"), max_new_tokens=1).trace
    md = qwen.run(image, QUESTION, qwen.config_for("64").replace(merge=True, merge_threshold=0.5),
                  max_new_tokens=1).trace
    assert md.meta["stage1a"]["merged_windows"] and md.meta["sequence"]["N"] == 4 * off.meta["sequence"]["N0"]
    a, v = summarize(md), summarize(off)
    assert md.meta["sequence"]["N_vanilla"] == off.meta["sequence"]["N0"] == v["vision_tokens"]["vanilla"] == 198
    assert a["flops"]["full_sequence_vanilla"] == v["flops"]["full_sequence"]
    assert a["flops"]["image_only_vanilla"] == v["flops"]["image_only"]
    assert a["kv"]["vanilla_total_bytes"] == v["kv"]["total_bytes"]
    from mustdrop.accounting import vanilla_vision_tokens
    older = {**md.meta, "sequence": {k: x for k, x in md.meta["sequence"].items() if k != "N_vanilla"}}
    assert vanilla_vision_tokens(older) == 198
