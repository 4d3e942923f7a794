"""LLaVA-OneVision through its host (mustdrop.hosts.llava_onevision), on a tiny copy of the published
llava-hf/llava-onevision-qwen2-0.5b-ov-hf (its config, processor settings, chat template and special-token
ids; widths shrunk): a 500 x 300 image (3 crops, no interpolation) and a 1200 x 1200 one (17 crops, the
108 x 108 tile grid interpolated to 81 x 81, tokens of up to 2 x 2 weighted cells).

- the placeholders the processor writes equal the feature rows the host hands the LLM, and the trace's
  geometry (crops, grids, each token's cells and weights) is the pure packing's;
- every token's features are its cells' tower features through the trace's weights (provenance);
- the trace's mapping hits the pixels the processor placed, for every crop;
- no-drop is bitwise the unhooked model's generate; dropping with original positions equals the
  attention-masking reference over the interpolated tokens; newline tokens are never dropped;
- every built-in method runs and meets its budget, or is refused with a message.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from mustdrop import stages
from mustdrop.config import MustDropConfig
from test_adapter import QUESTION, masking_reference, median_thresholds
from test_baselines_budget import _check
from test_onevision_packing import PATCH, marker_image, packing

PUBLISHED = Path(__file__).parent / "published" / "llava-onevision-qwen2-0.5b-ov-hf"
SIZES = {"wide": (500, 300), "tiled": (1200, 1200)}


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory):
    from mustdrop.testing import build_published_tiny_onevision
    return str(build_published_tiny_onevision(tmp_path_factory.mktemp("tiny-onevision"), PUBLISHED, text_layers=6))


@pytest.fixture(scope="module")
def ov(ov_dir):
    from mustdrop.adapters import load_llava, make_runner
    model, proc = load_llava(ov_dir)
    return make_runner(model, proc, ov_dir)


def textured(w, h, seed=0):
    """Left half noise (windows stay apart), right half flat with a square (windows merge)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    a = np.empty((h, w, 3), np.uint8)
    a[:, : w // 2] = rng.integers(0, 256, (h, w // 2, 3))
    a[:, w // 2:] = (40, 120, 200)
    a[h // 2: h // 2 + h // 4, 3 * w // 5: 3 * w // 5 + h // 4] = (250, 200, 20)
    return Image.fromarray(a)


def processor_inputs(runner, image):
    proc = runner.processor
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                    {"type": "text", "text": QUESTION}]}],
                                      add_generation_prompt=True)
    return proc(images=image, text=prompt, return_tensors="pt")


def test_the_host_is_onevision(ov):
    assert ov.family == "llava_onevision" and ov.layout == "stock" and not ov.has_cls and ov.grid == 27


@pytest.mark.parametrize("name", list(SIZES))
def test_placeholders_equal_feature_rows_and_geometry_is_the_packing(ov, name):
    w, h = SIZES[name]
    img = textured(w, h)
    placeholders = int((processor_inputs(ov, img)["input_ids"][0] == ov.image_token_id).sum())
    t = ov.run(img, QUESTION, ov.config_for("off"), max_new_tokens=1).trace
    p = packing(h, w)
    assert t.meta["sequence"]["N0"] == placeholders == len(p.groups) == {"wide": 1998, "tiled": 7371}[name]
    assert t.meta["model"]["family"] == "llava_onevision"
    assert [c["name"] for c in t.meta["crops"]] == [c["name"] for c in p.crops]
    assert all(c["grid"] == [27, 27] and c["mapping"] == pc["mapping"] for c, pc in zip(t.meta["crops"], p.crops))
    k = t.arrays["tokens.groups"].shape[1]
    assert np.array_equal(t.arrays["tokens.groups"], p.groups[:, :k]) and (p.groups[:, k:] == -1).all()
    np.testing.assert_allclose(t.arrays["tokens.weights"], p.weights[:, :k], rtol=0, atol=1e-7)
    assert np.array_equal(np.flatnonzero(t.arrays["tokens.newline"]), np.flatnonzero(p.newline))
    assert k == (4 if name == "tiled" else 1)


def test_token_features_are_their_cells_through_the_weights(ov):
    """Provenance: the host hands the LLM transformers' own packing of the tower's features, and that packing
    (in float64: the float32 kernel computes its source indices in float32, off by about 1e-5) is each token's
    cells through the weights the host reports."""
    img = textured(1200, 1200)
    inputs = processor_inputs(ov, img)
    vision = ov.host.encode({k: inputs[k] for k in ("pixel_values", "image_sizes")}, img, ov.config_for("off"))
    mm = ov.model.model
    with torch.no_grad():
        crops = inputs["pixel_values"][0, :len(vision.crops)]
        raw = mm.multi_modal_projector(mm.vision_tower(crops, output_hidden_states=True).hidden_states[-1])
        packed = mm.pack_image_features([raw], inputs["image_sizes"], image_newline=mm.image_newline)[0][0]
        packed64 = mm.pack_image_features([raw.double()], inputs["image_sizes"],
                                          image_newline=mm.image_newline.double())[0][0]
    assert torch.equal(vision.features, packed)
    flat = raw.reshape(-1, raw.shape[-1]).double()
    g, wt = vision.groups, vision.weights.double()
    mixed = (flat[g.clamp(min=0)] * wt[..., None]).sum(1)
    real = ~torch.isin(torch.arange(len(g)), vision.protected)
    assert int(real.sum()) == 729 + 81 * 81 and (g[real] >= 0).sum(1).max() == 4
    scale = float(flat.abs().max())                     # the weights are stored in float32
    torch.testing.assert_close(packed64[real], mixed[real], atol=1e-6 * scale, rtol=0)
    assert torch.equal(vision.features[vision.protected], mm.image_newline.expand(len(vision.protected), -1))


@pytest.mark.parametrize("w, h, x0, y0, size", [(500, 300, 380, 200, 60), (1200, 900, 700, 130, 160)])
def test_trace_mapping_hits_the_pixels_the_processor_placed(ov, w, h, x0, y0, size):
    """Every token whose cells lie (through the trace's crops) inside a red square holds red pixels in the crops
    the processor made: found in the base image and in the tiles."""
    img = marker_image(w, h, x0, y0, size)
    t = ov.run(img, QUESTION, ov.config_for("off"), max_new_tokens=1).trace
    pixels = processor_inputs(ov, img)["pixel_values"][0]
    crops, G = t.meta["crops"], 27
    found = set()
    for groups in t.arrays["tokens.groups"]:
        cells = groups[groups >= 0]
        if cells.size == 0:
            continue
        boxes = []
        for cell in cells.tolist():
            c, patch = divmod(cell, G * G)
            (sx, sy), (ox, oy) = crops[c]["mapping"]["scale_xy"], crops[c]["mapping"]["offset"]
            row, col = divmod(patch, G)
            margin = 2.0 / min(sx, sy) + 1.0
            bx0, bx1 = (col * PATCH - ox) / sx, ((col + 1) * PATCH - ox) / sx
            by0, by1 = (row * PATCH - oy) / sy, ((row + 1) * PATCH - oy) / sy
            boxes.append((c, row, col, bx0 >= x0 + margin and bx1 <= x0 + size - margin
                          and by0 >= y0 + margin and by1 <= y0 + size - margin))
        if all(inside for *_, inside in boxes):
            for c, row, col, _ in boxes:
                mean = pixels[c, :, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH].mean(dim=(1, 2))
                assert mean[0] > 0.9 and mean[1] < -0.6 and mean[2] < -0.6, (crops[c]["name"], row, col, mean)
                found.add(c)
    assert 0 in found and len(found) >= 2


def generate_logits(runner, image, n):
    inputs = processor_inputs(runner, image)
    with torch.no_grad():
        out = runner.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
    return [l[0].float() for l in out.logits]


@pytest.mark.parametrize("name", list(SIZES))
def test_no_drop_is_bitwise_the_unhooked_generate(ov, name):
    img = textured(*SIZES[name])
    cfg = ov.config_for("64").replace(merge_threshold=1.0, global_thr=1.0, individual_thr=0.0)
    res = ov.run(img, QUESTION, cfg, max_new_tokens=3, keep_internals=True)
    assert res.trace.meta["stage1b"]["key_tokens"], "stage 1b ran"
    assert all(s["dropped"] == 0 for s in res.trace.meta["stage2"])
    for a, b in zip(res.step_logits, generate_logits(ov, img, len(res.step_logits)), strict=True):
        assert torch.equal(a, b)


@pytest.fixture(scope="module", params=list(SIZES))
def dropping(ov, request):
    img = textured(*SIZES[request.param])
    probe = ov.run(img, QUESTION, ov.config_for("64").replace(global_thr=1.0, individual_thr=0.0),
                   max_new_tokens=1).trace
    cfg = ov.config_for("64").replace(**median_thresholds(probe), positions="original")
    return ov.run(img, QUESTION, cfg, max_new_tokens=4, keep_internals=True)


def test_dropping_with_original_positions_equals_the_masking_reference(ov, dropping):
    t = dropping.trace
    assert t.meta["stage2"][0]["dropped"] > 0
    ref, cache = masking_reference(ov, dropping.inputs_embeds, t, t.meta["generation"]["token_ids"])
    for a, b in zip(dropping.step_logits, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for layer, (keys, _) in enumerate(dropping.prefill_cache):
        idx = torch.from_numpy(t.arrays[f"kv.L{layer}"])
        torch.testing.assert_close(keys, cache[layer][0][:, :, idx], atol=1e-5, rtol=0)


def test_stage_1a_and_1b_per_crop_and_newlines_protected(dropping):
    t = dropping.trace
    crops = t.meta["crops"]
    assert sum(len(c["merged_windows"]) for c in crops) > 0, "the flat half of the image merges"
    groups, weights = t.arrays["tokens.groups"], t.arrays["tokens.weights"]
    newline = t.arrays["tokens.newline"].astype(bool)
    np.testing.assert_allclose(weights[~newline].sum(1), 1.0, atol=1e-5)
    assert (groups[newline] == -1).all() and newline.sum() == (27 if len(crops) == 3 else 81)
    crop_of = groups[np.arange(len(groups)), np.argmax(weights, 1)] // (27 * 27)
    keys = np.array(t.meta["stage1b"]["key_tokens"])
    assert not newline[keys].any()
    for c in range(len(crops)):
        n = int(((crop_of == c) & ~newline).sum())
        assert (crop_of[keys] == c).sum() == int(np.ceil(0.08 * n)), crops[c]["name"]
    assert "no CLS" in t.meta["stage1b"]["score"]
    for s in t.meta["stage2"]:
        toks = t.arrays[f"stage2.L{s['layer']}.tokens"]
        status = t.arrays[f"stage2.L{s['layer']}.status"]
        assert (status[newline[toks]] == stages.KEPT_PROTECTED).all() and newline[toks].sum() == newline.sum()


@pytest.mark.parametrize("method", ["fastv", "random", "pdrop"])
@pytest.mark.parametrize("budget", [400, 1200])
def test_same_budget_baselines_meet_their_budget(ov, method, budget, tmp_path):
    t = _check(ov, textured(500, 300), method, budget, tmp_path)
    newline = t.arrays["tokens.newline"].astype(bool)
    assert newline.sum() == 27
    kv_last = t.arrays[f"kv.L{t.num_layers - 1}"] - t.meta["sequence"]["S"]
    assert np.isin(np.flatnonzero(newline), kv_last).all(), "newline tokens survive every drop"


@pytest.mark.parametrize("preset", ["64", "128", "192"])
def test_mustdrop_presets_run(ov, preset):
    t = ov.run(textured(500, 300), QUESTION, ov.config_for(preset), max_new_tokens=2).trace
    assert t.meta["method"] == "mustdrop" and t.meta["vision_tokens_per_layer"][-1] <= t.meta["sequence"]["N0"]


@pytest.mark.parametrize("method", ["pool", "fastervlm", "visionzip"])
def test_grid_baselines_are_refused_with_a_message(ov, method):
    with pytest.raises(ValueError, match="one square grid of one crop; LLaVA-OneVision"):
        ov.run(textured(500, 300), QUESTION, MustDropConfig.baseline(method, 64), max_new_tokens=1)


def test_reference_layout_is_refused_with_a_message(ov):
    from mustdrop.adapters import make_runner
    with pytest.raises(ValueError, match="LLaVA-OneVision runs transformers' own packing"):
        make_runner(ov.model, ov.processor, layout="reference")


def test_cli_runs_onevision(ov_dir, tmp_path):
    from test_cli import run_cli
    img = tmp_path / "wide.png"
    textured(500, 300).save(img)
    p = run_cli("run", "--model", ov_dir, "--image", str(img), "--question", QUESTION, "--max-new-tokens", "2",
                "--no-vanilla")
    assert p.returncode == 0, p.stderr
    assert "tile 0,0" in p.stdout and "stage 2" in p.stdout


def test_each_cell_is_drawn_as_the_token_with_the_largest_share(dropping):
    """Under interpolation a cell feeds up to 4 tokens; its patch maps show the one that takes most of it."""
    t = dropping.trace
    groups, weights = t.arrays["tokens.groups"], t.arrays["tokens.weights"]
    best = {}
    for tok, (g, w) in enumerate(zip(groups, weights)):
        for cell, share in zip(g.tolist(), w.tolist()):
            if cell >= 0 and (cell not in best or share >= best[cell][0]):
                best[cell] = (share, tok)
    G2 = 27 * 27
    for c in range(len(t.meta["crops"])):
        token = t.patch("token", c).ravel()
        want = np.array([best.get(c * G2 + p, (0, -1))[1] for p in range(G2)])
        assert np.array_equal(token, want), t.meta["crops"][c]["name"]


def test_overlays_and_slides_draw_every_crop(ov, dropping, tmp_path):
    from mustdrop.trace import Trace
    from mustdrop.vis import overlays
    from mustdrop.vis.slides import save_slides
    t = Trace.load(dropping.trace.save(tmp_path / "ov.safetensors"))
    w, h = t.meta["input"]["image"]["width"], t.meta["input"]["image"]["height"]
    img = textured(w, h)
    layer = t.prune_layers[0]
    for c in range(len(t.meta["crops"])):
        out = overlays.filter_overlay(t, layer, img, crop=c)
        assert out.ndim == 3 and out.shape[2] == 3 and out.std() > 0
    png, pdf = save_slides(t, tmp_path / "slides", image=img, layer=layer, crop=len(t.meta["crops"]) - 1)
    from PIL import Image
    assert Image.open(png).size[0] > 100 and pdf.stat().st_size > 0


def test_the_app_engine_runs_and_draws_onevision_with_a_same_budget_comparison(ov_dir):
    """What one click of the app does: vanilla, MustDrop and a same-budget FastV on the loaded folder; the
    session draws the image as the model saw it for every crop."""
    from lens_app import engine
    from lens_app.session import Session
    lens = engine.Lens(ov_dir)
    res = lens.analyze(textured(500, 300), QUESTION, lens.config("64"), max_new_tokens=2, compare="fastv")
    assert res.trace.meta["model"]["family"] == "llava_onevision" and res.compare.meta["method"] == "fastv"
    session = Session.of_run(res.trace, res.vanilla, res.image, compare=res.compare)
    assert [name for name, _ in session.crop_choices()] == ["base", "tile 0,0", "tile 0,1"]
    for c in range(session.trace.n_crops):
        session.show_crop(c)
        canvas = session.canvas()
        assert canvas.ndim == 3 and canvas.std() > 0, "the crop's pixels are decoded, not grey"


def test_shipped_defaults_for_the_published_checkpoint():
    """Its decoder is the 24-layer Qwen2-0.5B of llava-interleave: prune layers scaled to the depth, the
    reference thresholds marked as not calibrated on it."""
    from mustdrop.config import ModelDefaults
    d = ModelDefaults.load("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", 24)
    assert d.prune_layers == (2, 5, 8, 11) and d.presets["64"] == (0.011, 0.01)
    assert "llava-onevision-qwen2-0.5b-ov-hf" in d.source and "not yet calibrated" in d.source


def test_only_tokens_stage_1a_built_are_drawn_as_merged(ov, dropping, tmp_path):
    """An interpolated token covers up to 4 cells without being merged: the trace says which tokens stage 1a
    built (tokens.merged), and the merge overlay's patch map follows it, not the number of cells."""
    from mustdrop.trace import Trace, TraceError
    t = dropping.trace
    built = t.arrays["tokens.merged"].astype(bool)
    assert built.sum() == sum(len(c["merged_windows"]) for c in t.meta["crops"]) > 0
    for c in range(len(t.meta["crops"])):
        token = t.patch("token", c).ravel()
        assert np.array_equal(t.patch("merged", c).ravel().astype(bool), (token >= 0) & built[np.maximum(token, 0)])
    off = ov.run(textured(1200, 1200), QUESTION, ov.config_for("off"), max_new_tokens=1).trace
    assert (off.arrays["tokens.groups"] >= 0).sum(1).max() == 4
    assert not any(off.patch("merged", c).any() for c in range(len(off.meta["crops"])))
    bad = Trace.load(t.save(tmp_path / "t.safetensors"))
    bad.arrays["tokens.merged"] = bad.arrays["tokens.merged"].copy()
    bad.arrays["tokens.merged"][0] = 2
    with pytest.raises(TraceError, match="tokens.merged must hold 0 or 1"):
        Trace.load(bad.save(tmp_path / "bad.safetensors"))


def test_vanilla_figures_are_the_vanilla_runs_own(ov):
    """OneVision feeds its LLM the base crop, the interpolated tiles' rows and a newline per row, not the
    crops' patches: a pruned run's vanilla FLOPs and KV are the vanilla run's own figures."""
    from mustdrop.accounting import summarize

    image = textured(500, 300)
    off = ov.run(image, QUESTION, ov.config_for("off"), max_new_tokens=1).trace
    md = ov.run(image, QUESTION, ov.config_for("64"), max_new_tokens=1).trace
    assert off.meta["sequence"]["N0"] != off.meta["sequence"]["N"]
    a, v = summarize(md), summarize(off)
    assert md.meta["sequence"]["N_vanilla"] == a["vision_tokens"]["vanilla"] == off.meta["sequence"]["N0"]
    assert a["flops"]["full_sequence_vanilla"] == v["flops"]["full_sequence"]
    assert a["kv"]["vanilla_total_bytes"] == v["kv"]["total_bytes"]
