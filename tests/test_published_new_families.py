"""Tiny copies of the published Qwen2.5-VL-3B, Qwen2-VL-2B and LLaVA-OneVision-0.5B checkpoints, unhooked.

Each copy keeps every field of the published config.json, image processor settings, processor settings and chat
template and shrinks only the widths (and the vision depth), with a tokenizer that gives the published special
tokens and prompt pieces their ids at the published vocabulary size (tests/published/README.md says where each
file came from and which were reconstructed). transformers' own classes load them without torchvision through
mustdrop.adapters.processors. On each: the processor builds; the prompt tokenizes as published; the processor
writes as many image placeholders as the model produces feature rows, for a non-square image (and, for
OneVision, one that needs many tiles and the anyres_max_9 interpolation); ``generate`` runs offline.
No MustDrop hooks here: the host modules come later (issue 27).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_published_configs import leaves

PUBLISHED = Path(__file__).parent / "published"
# name -> decoder depth of the tiny copy (the published 36 / 28 / 24 layers cost seconds per generate on a busy
# 2-core machine and no test here depends on the depth)
MODELS = {"Qwen2.5-VL-3B-Instruct": 6, "Qwen2-VL-2B-Instruct": 6, "llava-onevision-qwen2-0.5b-ov-hf": 6}
QWEN = ("Qwen2.5-VL-3B-Instruct", "Qwen2-VL-2B-Instruct")
LOAD_CHOICES = {"torch_dtype", "transformers_version", "_name_or_path"}
RENAMED = {"image_token_index": "image_token_id", "video_token_index": "video_token_id"}


def published(name, file):
    return json.loads((PUBLISHED / name / file).read_text())


def noise_image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=list(MODELS))
def pub(request, tmp_path_factory):
    import transformers
    from transformers import AutoConfig

    from mustdrop.adapters.processors import load_processor
    from mustdrop.testing import build_published_tiny_any
    name = request.param
    folder = build_published_tiny_any(tmp_path_factory.mktemp(name), PUBLISHED / name, text_layers=MODELS[name])
    config = AutoConfig.from_pretrained(folder)
    processor = load_processor(str(folder), config.model_type, local_files_only=True)
    model = getattr(transformers, config.architectures[0]).from_pretrained(folder, local_files_only=True).eval()
    return name, model, processor


def prompt(processor, question="What's that?"):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


def image_token_id(model):
    return model.config.image_token_id


def feature_rows(model, inputs):
    """Rows of image features the model itself scatters into the placeholders."""
    keys = ("pixel_values", "image_grid_thw", "image_sizes", "batch_num_images")
    with torch.no_grad():
        out = model.model.get_image_features(**{k: v for k, v in inputs.items() if k in keys})
    return sum(int(f.shape[0]) for f in out.pooler_output)


def loaded_value(config, path):
    """The loaded config's value for a published config.json path. transformers 5 moves a Qwen-VL flat config's
    decoder fields into text_config and rope_theta / rope_scaling into rope_parameters."""
    key = RENAMED.get(path[-1], path[-1])
    if path[0] == "rope_scaling" or (path[0] == "text_config" and path[1:2] == ("rope_scaling",)):
        return config.get_text_config().rope_parameters[key]
    if key == "rope_theta":
        return config.get_text_config().rope_parameters["rope_theta"]
    node = config
    for part in path[:-1]:
        node = getattr(node, part)
    for candidate in (node, config.get_text_config()):
        if hasattr(candidate, key):
            return getattr(candidate, key)
    raise AssertionError(f"{'.'.join(path)} was lost")


def test_config_is_the_published_one_except_sizes(pub):
    from mustdrop.testing import NEW_FAMILY_SIZE_FIELDS
    name, model, _ = pub
    cfg = published(name, "config.json")
    checked = 0
    for path, value in leaves(cfg):
        if path[-1] in NEW_FAMILY_SIZE_FIELDS | LOAD_CHOICES:
            continue
        got = loaded_value(model.config, path)
        if path[-1] == "sliding_window" and not cfg.get("use_sliding_window", True):
            assert got in (value, None)       # transformers 5 drops the window when it is switched off
        else:
            assert got == value, f"{'.'.join(path)}: published {value!r}, loaded {got!r}"
        checked += 1
    assert checked >= 20
    text = model.config.get_text_config()
    assert model.get_input_embeddings().weight.shape[0] == text.vocab_size == loaded_value(
        model.config, ("text_config", "vocab_size") if "text_config" in cfg else ("vocab_size",))


def test_processor_is_image_only_and_keeps_the_published_settings(pub):
    name, model, processor = pub
    assert not hasattr(processor, "video_processor")
    assert type(processor.image_processor).__name__.endswith("Pil")
    pre = published(name, "preprocessor_config.json")
    ip = processor.image_processor
    assert list(ip.image_mean) == pre["image_mean"] and list(ip.image_std) == pre["image_std"]
    if name in QWEN:
        assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (pre["min_pixels"], pre["max_pixels"])
        assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (
            pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"])
    else:
        pconf = published(name, "processor_config.json")
        assert processor.num_image_tokens == pconf["num_image_tokens"] == 27 * 27
        assert processor.vision_feature_select_strategy == pconf["vision_feature_select_strategy"]
        assert [list(p) for p in ip.image_grid_pinpoints] == pre["image_grid_pinpoints"]
        assert dict(ip.size) == pre["size"]
        assert processor.vision_aspect_ratio == model.config.vision_aspect_ratio == "anyres_max_9"


def test_prompt_tokenizes_as_published(pub):
    name, model, processor = pub
    facts = published(name, "tokenizer_facts.json")
    tok = processor.tokenizer
    for token, tid in facts["special"].values():
        assert tok.convert_tokens_to_ids(token) == tid, token
    assert tok(prompt(processor, facts["question"]), add_special_tokens=False)["input_ids"] == facts["prompt_ids"]
    assert image_token_id(model) == facts["special"]["image"][1] == processor.image_token_id
    assert model.config.get_text_config().eos_token_id == facts["special"]["eos"][1]


def test_placeholders_equal_feature_rows_for_a_non_square_image(pub):
    name, model, processor = pub
    inputs = processor(images=noise_image(500, 300), text=prompt(processor), return_tensors="pt")
    placeholders = int((inputs["input_ids"][0] == image_token_id(model)).sum())
    rows = feature_rows(model, inputs)
    assert placeholders == rows
    if name in QWEN:
        # smart_resize at the published min/max pixels: 500 x 300 -> 504 x 308 px = 36 x 22 patches of 14
        assert inputs["image_grid_thw"].tolist() == [[1, 22, 36]]
        assert inputs["pixel_values"].shape[0] == 22 * 36
        assert rows == 22 * 36 // 4 == 198
    else:
        # base 384 x 384 + the 384 x 768 pinpoint (1 x 2 tiles); 27 x 54 grid unpadded to 27 x 46, one newline a row
        assert inputs["pixel_values"].shape[:2] == (1, 3)
        assert rows == 729 + 27 * 46 + 27 == 1998


def test_onevision_many_tiles_interpolated_to_anyres_max_9(pub):
    name, model, processor = pub
    if name in QWEN:
        pytest.skip("OneVision's tiling only")
    inputs = processor(images=noise_image(1200, 1200, seed=1), text=prompt(processor), return_tensors="pt")
    # 1536 x 1536 pinpoint: base + 4 x 4 tiles; the 108 x 108 grid exceeds 9 tiles' worth (ratio 1.33 > 1.1)
    # and is interpolated to 81 x 81, plus one newline per row
    assert inputs["pixel_values"].shape[:2] == (1, 17)
    placeholders = int((inputs["input_ids"][0] == image_token_id(model)).sum())
    assert placeholders == feature_rows(model, inputs) == 729 + 81 * 81 + 81


def test_generate_runs_offline_and_is_deterministic(pub, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    name, model, processor = pub
    inputs = processor(images=noise_image(500, 300), text=prompt(processor), return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        again = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert first.shape == (1, n + 3)
    assert torch.equal(first[:, :n], inputs["input_ids"])
    assert torch.equal(first, again)


def test_load_processor_falls_back_to_autoprocessor_for_other_families(tiny_dir):
    from transformers import LlavaProcessor

    from mustdrop.adapters.processors import load_processor
    processor = load_processor(str(tiny_dir), "llava", local_files_only=True)
    assert type(processor) is LlavaProcessor
