"""Other layouts: SigLIP towers (no CLS, 27 x 27) with Qwen2 and Llama decoders; image mapping.

The same equivalences as tests/test_adapter.py: a no-drop run is bitwise the un-hooked model, a
dropping run (positions="original") equals the attention-masking reference. The image-to-grid
mapping stored in the trace is checked against what the processor really produced.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from test_adapter import QUESTION, dropping_config, masking_reference, no_drop_config, stock_logits


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def siglip(request, tmp_path_factory):
    from mustdrop.adapters import LlavaMustDrop, load_llava
    from mustdrop.testing import build_tiny_siglip_llava
    folder = build_tiny_siglip_llava(tmp_path_factory.mktemp(f"siglip-{request.param}"), text_model=request.param)
    model, proc = load_llava(str(folder))
    return LlavaMustDrop(model, proc, str(folder))


def test_siglip_layout_is_read_right(siglip, image):
    assert (siglip.grid, siglip.has_cls) == (27, False)
    t = siglip.run(image, QUESTION, siglip.config_for("64"), max_new_tokens=2).trace
    assert t.meta["sequence"]["N"] == 729 and t.meta["model"]["vision"]["has_cls"] is False
    assert "no CLS" in t.meta["stage1b"]["score"]
    assert len(t.meta["stage1b"]["key_tokens"]) == int(np.ceil(0.08 * t.meta["sequence"]["N0"]))
    assert t.patch("token").shape == (27, 27)


def test_siglip_no_drop_is_bitwise_unhooked(siglip, image):
    res = siglip.run(image, QUESTION, no_drop_config(siglip), max_new_tokens=3, keep_internals=True)
    ref = stock_logits(siglip, image, len(res.step_logits))
    for a, b in zip(res.step_logits, ref):
        assert torch.equal(a, b)


def test_siglip_dropping_run_equals_masking_reference(siglip, image):
    cfg = dropping_config(siglip, image)
    res = siglip.run(image, QUESTION, cfg, max_new_tokens=4, keep_internals=True)
    assert res.trace.meta["stage2"][0]["dropped"] > 0
    ref, cache = masking_reference(siglip, res.inputs_embeds, res.trace, res.trace.meta["generation"]["token_ids"])
    for a, b in zip(res.step_logits, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for layer, (keys, _) in enumerate(res.prefill_cache):
        idx = torch.from_numpy(res.trace.arrays[f"kv.L{layer}"])
        torch.testing.assert_close(keys, cache[layer][0][:, :, idx], atol=1e-5, rtol=0)


def test_window_that_does_not_divide_27_is_refused(siglip, image):
    with pytest.raises(ValueError, match="does not divide the 27 x 27"):
        siglip.run(image, QUESTION, siglip.config_for("64").replace(window=2))


def marker_image(w, h, x0, y0, size=40):
    a = np.full((h, w, 3), 30, np.uint8)
    a[y0:y0 + size, x0:x0 + size] = (255, 0, 0)
    return Image.fromarray(a)


@pytest.mark.parametrize("w, h, x0, y0", [(672, 336, 400, 150), (336, 900, 100, 500), (500, 500, 20, 430)])
@pytest.mark.parametrize("layout", ["clip", "siglip"])
def test_trace_mapping_points_at_the_right_patch(tiny, siglip, layout, w, h, x0, y0):
    """A red marker in the original image lies, through the trace's mapping, on patches the
    processor really filled with red."""
    assert_marker_on_red_patch(tiny if layout == "clip" else siglip, w, h, x0, y0)


def assert_marker_on_red_patch(runner, w, h, x0, y0):
    """Through the trace's mapping, a 40 px red marker at (x0, y0) lies on a patch the processor filled red."""
    img = marker_image(w, h, x0, y0)
    trace = runner.run(img, QUESTION, runner.config_for("off"), max_new_tokens=1).trace
    m = trace.meta["input"]["mapping"]
    G, patch = trace.grid, trace.meta["model"]["vision"]["patch_size"]
    cx, cy = x0 + 20, y0 + 20                                   # marker centre, original pixels
    u = cx * m["scale_xy"][0] + m["offset"][0]
    v = cy * m["scale_xy"][1] + m["offset"][1]
    assert 0 <= u < G * patch and 0 <= v < G * patch
    row, col = int(v // patch), int(u // patch)
    pv = runner.processor(images=img, text="<image>", return_tensors="pt")["pixel_values"][0]
    cell = pv[:, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch].mean(dim=(1, 2))
    assert cell[0] > 0.5 and cell[1] < 0 and cell[2] < 0, f"patch ({row}, {col}) is not red: {cell}"
