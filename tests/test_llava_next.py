"""LLaVA-NeXT any-res: the stock packing (unpadding, newline rows) and the authors' flat layout.

- a no-drop run is bitwise the un-hooked model; a dropping run (positions="original") equals the
  attention-masking reference; newline rows are never dropped and cover no patch;
- the packed-row provenance equals transformers' own packing of the real features;
- every crop's mapping points at the pixels the processor put in that crop.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from mustdrop import stages
from test_adapter import QUESTION, masking_reference, median_thresholds
from test_layouts import marker_image


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    from mustdrop.adapters import load_llava
    from mustdrop.testing import build_tiny_llava_next
    folder = build_tiny_llava_next(tmp_path_factory.mktemp("tiny-next"))
    model, proc = load_llava(str(folder))
    return model, proc, str(folder)


@pytest.fixture(scope="module")
def stock(next_model):
    from mustdrop.adapters import make_runner
    return make_runner(*next_model, layout="stock")


@pytest.fixture(scope="module")
def reference(next_model):
    from mustdrop.adapters import make_runner
    return make_runner(*next_model, layout="reference")


@pytest.fixture
def wide_image():
    from conftest import half_textured_image
    return half_textured_image(0).resize((500, 300))


def stock_generate_logits(runner, image, n):
    proc = runner.processor
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                      add_generation_prompt=True)
    inputs = proc(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = runner.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
    return [l[0].float() for l in out.logits]


def test_stock_no_drop_is_bitwise_unhooked(stock, wide_image):
    cfg = stock.config_for("64").replace(merge_threshold=1.0, global_thr=1.0, individual_thr=0.0)
    res = stock.run(wide_image, QUESTION, cfg, max_new_tokens=3, keep_internals=True)
    assert res.trace.meta["model"]["layout"] == "stock"
    for a, b in zip(res.step_logits, stock_generate_logits(stock, wide_image, len(res.step_logits))):
        assert torch.equal(a, b)


def test_packed_provenance_equals_transformers_packing(stock, wide_image):
    proc = stock.processor
    inputs = proc(images=wide_image, text="<image>", return_tensors="pt")
    crops = stock.host._pixel_crops(inputs)
    ids = stock.host._packed_patch_ids(inputs, crops.shape[0])
    with torch.no_grad():
        packed = stock.model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                      image_sizes=inputs["image_sizes"]).pooler_output[0]
        raw = stock.model.model.multi_modal_projector(
            stock.model.model.vision_tower(crops, output_hidden_states=True).hidden_states[-2][:, 1:])
    flat = raw.reshape(-1, raw.shape[-1])
    real = ids >= 0
    assert torch.equal(packed[real], flat[ids[real]])
    assert torch.equal(packed[~real], stock.model.model.image_newline.expand(int((~real).sum()), -1).to(packed.dtype))


@pytest.fixture(scope="module")
def dropping(stock):
    from conftest import half_textured_image
    image = half_textured_image(0).resize((500, 300))
    probe = stock.run(image, QUESTION, stock.config_for("64").replace(global_thr=1.0, individual_thr=0.0),
                      max_new_tokens=1).trace
    cfg = stock.config_for("64").replace(**median_thresholds(probe), positions="original")
    return stock.run(image, QUESTION, cfg, max_new_tokens=4, keep_internals=True)


def test_stock_dropping_run_equals_masking_reference(stock, dropping):
    t = dropping.trace
    assert t.meta["stage2"][0]["dropped"] > 0
    ref, cache = masking_reference(stock, dropping.inputs_embeds, t, t.meta["generation"]["token_ids"])
    for a, b in zip(dropping.step_logits, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for layer, (keys, _) in enumerate(dropping.prefill_cache):
        idx = torch.from_numpy(t.arrays[f"kv.L{layer}"])
        torch.testing.assert_close(keys, cache[layer][0][:, :, idx], atol=1e-5, rtol=0)


def test_newline_rows_are_never_dropped_nor_drawn(dropping):
    t = dropping.trace
    newline = t.arrays["tokens.newline"].astype(bool)
    assert newline.sum() > 0
    assert (t.arrays["tokens.groups"][newline] == -1).all()
    for s in t.meta["stage2"]:
        toks = t.arrays[f"stage2.L{s['layer']}.tokens"]
        status = t.arrays[f"stage2.L{s['layer']}.status"]
        assert (status[newline[toks]] == stages.KEPT_PROTECTED).all()
        assert newline[toks].sum() == newline.sum()
    n_crops = len(t.meta["crops"])
    covered = sum(int((t.arrays[("patch." if c == 0 else f"patch.c{c}.") + "token"] >= 0).sum())
                  for c in range(n_crops))
    assert covered == int((t.arrays["tokens.groups"] >= 0).sum())


@pytest.mark.parametrize("w,h", [(620, 300), (300, 620)])
def test_a_vanilla_stock_trace_with_more_tokens_than_patches_saves_and_replays(stock, tmp_path, w, h):
    """The stock packing adds one newline token per grid row: a vanilla trace's vision block can be
    longer than the crops' patches (1752 tokens for 1728 patches at 620 x 300), and the trace checks
    must not refuse it."""
    from mustdrop.trace import Trace

    from mustdrop.config import MustDropConfig

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    t = stock.run(img, QUESTION, stock.config_for("off"), max_new_tokens=2).trace
    assert t.meta["sequence"]["N0"] > t.meta["sequence"]["N"]
    back = Trace.load(t.save(tmp_path / "vanilla-next.safetensors"))
    assert back.meta["sequence"] == t.meta["sequence"]
    # a same-budget baseline's plan counts that block too (newline tokens count toward its budget)
    fastv = stock.run(img, QUESTION, MustDropConfig.baseline("fastv", 400, layer=1), max_new_tokens=2).trace
    assert fastv.meta["baseline"]["plan"]["n0"] == t.meta["sequence"]["N0"] > t.meta["sequence"]["N"]
    assert Trace.load(fastv.save(tmp_path / "fastv-next.safetensors")).meta == fastv.meta


def test_reference_layout_is_flat(reference, wide_image):
    t = reference.run(wide_image, QUESTION, reference.config_for("64"), max_new_tokens=2).trace
    crops = t.meta["crops"]
    r = {len(c["merged_windows"]) for c in crops}
    assert len(r) == 1, "one merge count shared by all crops"
    n0c = 576 - 8 * r.pop()
    assert t.meta["sequence"]["N0"] == len(crops) * n0c
    assert "tokens.newline" not in t.arrays
    keys = np.array(t.meta["stage1b"]["key_tokens"])
    per_crop = np.bincount(keys // n0c, minlength=len(crops))
    assert (per_crop == int(np.ceil(0.08 * n0c))).all(), "a key set per crop, offset by crop"


@pytest.mark.parametrize("w, h, x0, y0", [(500, 300, 380, 200), (300, 700, 100, 520)])
def test_each_crop_mapping_points_at_the_right_pixels(stock, w, h, x0, y0):
    assert_marker_in_base_and_one_tile(stock, w, h, x0, y0)


def assert_marker_in_base_and_one_tile(stock, w, h, x0, y0):
    """Every crop whose mapping holds the marker's centre has red pixels there; that is the base image and
    exactly one tile."""
    img = marker_image(w, h, x0, y0)
    t = stock.run(img, QUESTION, stock.config_for("off"), max_new_tokens=1).trace
    inputs = stock.processor(images=img, text="<image>", return_tensors="pt")
    crops = stock.host._pixel_crops(inputs)
    hits = 0
    for c, crop in enumerate(t.meta["crops"]):
        m = crop["mapping"]
        u = (x0 + 20) * m["scale_xy"][0] + m["offset"][0]
        v = (y0 + 20) * m["scale_xy"][1] + m["offset"][1]
        side, patch = crops.shape[-1], t.meta["model"]["vision"]["patch_size"]
        if not (0 <= u < side and 0 <= v < side):
            continue                                   # the marker lies in another tile
        row, col = int(v // patch), int(u // patch)
        cell = crops[c, :, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch].mean(dim=(1, 2))
        assert cell[0] > 0.5 and cell[1] < 0 and cell[2] < 0, f"crop {crop['name']} patch ({row}, {col}): {cell}"
        hits += 1
    assert hits == 2, "the marker is found in the base image and in exactly one tile"


def test_cli_accepts_llava_next(next_model, tmp_path):
    from test_cli import run_cli
    img = tmp_path / "wide.png"
    marker_image(500, 300, 50, 50).save(img)
    for layout in ("stock", "reference"):
        p = run_cli("run", "--model", next_model[2], "--image", str(img), "--question", QUESTION,
                    "--layout", layout, "--max-new-tokens", "2", "--no-vanilla")
        assert p.returncode == 0, p.stderr
        assert "tile 0,0" in p.stdout and "stage 2" in p.stdout


def test_the_app_offers_no_vision_side_method_on_next(stock):
    """Every method that selects before the LLM is defined on one grid: the app's "compare with" list
    leaves them out on LLaVA-NeXT (with the host's reason), and a run of one is refused with it."""
    from lens_app import engine
    from mustdrop import methods
    from mustdrop.config import MustDropConfig

    vision = [m for m in methods.baselines() if methods.get(m).selects_before_llm]
    refused = engine.refused_methods(stock)
    assert vision and sorted(refused) == sorted(vision)
    assert [v for _, v in engine.compare_choices(stock)] == ["none"] + [m for m in methods.baselines() if m not in vision]
    with pytest.raises(ValueError, match="defined on one 24 x 24 grid"):
        stock.run(Image.new("RGB", (64, 64)), QUESTION, MustDropConfig.baseline(vision[0], 64), max_new_tokens=1)


def test_vanilla_figures_count_the_newline_tokens(stock, wide_image):
    """The stock packing feeds the LLM its unpadded rows with a newline after each, not the crops'
    patches: the vanilla FLOPs and KV of a pruned run are the vanilla run's own (they counted the
    patches before: 1728 where the model gets 1560 tokens)."""
    from mustdrop.accounting import summarize

    off = stock.run(wide_image, QUESTION, stock.config_for("off"), max_new_tokens=1).trace
    md = stock.run(wide_image, QUESTION, stock.config_for("64"), max_new_tokens=1).trace
    assert off.meta["sequence"]["N0"] != off.meta["sequence"]["N"] == md.meta["sequence"]["N"]
    a, v = summarize(md), summarize(off)
    assert a["vision_tokens"]["vanilla"] == off.meta["sequence"]["N0"]
    assert a["flops"]["full_sequence_vanilla"] == v["flops"]["full_sequence"]
    assert a["kv"]["vanilla_total_bytes"] == v["kv"]["total_bytes"]
