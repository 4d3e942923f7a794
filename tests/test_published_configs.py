"""The checkpoints users run: tiny copies of four published llava-hf checkpoints.

Each copy keeps every field of the published config.json, processor settings and chat template and
shrinks only the widths (and the vision depth; the decoder depth where noted), with a tokenizer of the
published kind that gives the role markers, <image> and "\\n" their published ids at the published
vocabulary size (tests/published/README.md says where each file came from). On each:
- the prompt tokenizes as published, so S (tokens before the image) and T (after it) are the real ones;
- the processor writes as many <image> placeholders as the model has feature rows;
- the trace's image-to-grid mapping points at the pixels the processor really produced;
- a no-drop run is bitwise the un-hooked model; a dropping run equals the masking reference.
llava-1.5-7b-hf keeps its 32-layer decoder, so the default prune layers 2/6/10/14 and the authors'
stage-3 range (layers 2..14 trimmed to the final survivors) run as published; the interleave copy keeps
its 24 layers, so the defaults shipped for that hub id apply to it.
"""

import json
from pathlib import Path

import pytest
import torch

from test_adapter import dropping_config, masking_reference, no_drop_config, stock_logits, QUESTION
from test_layouts import assert_marker_on_red_patch
from test_llava_next import assert_marker_in_base_and_one_tile

PUBLISHED = Path(__file__).parent / "published"
# name -> decoder depth of the tiny copy (None: the published depth)
MODELS = {"llava-1.5-7b-hf": None, "llava-v1.6-mistral-7b-hf": 6, "llava-v1.6-vicuna-7b-hf": 6,
          "llava-interleave-qwen-0.5b-hf": None}
# config.json keys transformers 5 no longer stores (it derives them): allowed to be absent after loading
DROPPED_BY_TRANSFORMERS = {"ignore_index", "vocab_size", "transformers_version", "_name_or_path"}
# chosen when loading (load_llava: float32 on CPU; the version that saved it), not by the checkpoint
LOAD_CHOICES = {"torch_dtype", "transformers_version"}
RENAMED = {"image_token_index": "image_token_id"}


def published(name, file):
    return json.loads((PUBLISHED / name / file).read_text())


@pytest.fixture(scope="module", params=list(MODELS))
def pub(request, tmp_path_factory):
    from mustdrop.adapters import load_llava, make_runner
    from mustdrop.testing import build_published_tiny
    name = request.param
    folder = build_published_tiny(tmp_path_factory.mktemp(name), PUBLISHED / name, text_layers=MODELS[name])
    model, proc = load_llava(str(folder))
    # as the app and the CLI would name it: by hub id (defaults shipped for that id apply), weights from the folder
    return name, make_runner(model, proc, f"llava-hf/{name}")


def leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def test_config_is_the_published_one_except_sizes(pub):
    from mustdrop.testing import SIZE_FIELDS
    name, runner = pub
    checked = 0
    for path, value in leaves(published(name, "config.json")):
        if path[-1] in SIZE_FIELDS | LOAD_CHOICES:
            continue
        node = runner.model.config
        for key in path[:-1]:
            node = getattr(node, key)
        key = RENAMED.get(path[-1], path[-1])
        if key == "rope_theta" and not hasattr(node, key):      # transformers 5 keeps it in rope_parameters
            node, key = node.rope_parameters, key
            got = node[key]
        elif not hasattr(node, key):
            assert path[-1] in DROPPED_BY_TRANSFORMERS, f"{'.'.join(path)} was lost"
            continue
        else:
            got = getattr(node, key)
        if path[-1] == "sliding_window" and not published(name, "config.json")["text_config"].get(
                "use_sliding_window", True):
            value = None                                          # Qwen2Config: no window unless it is used
        if path[-1] == "image_grid_pinpoints":
            got, value = [list(x) for x in got], [list(x) for x in value]
        assert got == value, f"{'.'.join(path)}: {got!r} != published {value!r}"
        checked += 1
    assert checked >= 15
    text = published(name, "config.json")["text_config"]
    if "num_hidden_layers" in text and MODELS[name] is None:
        assert runner.num_layers == text["num_hidden_layers"]


def test_prompt_tokenizes_as_published(pub):
    name, runner = pub
    facts = published(name, "tokenizer_facts.json")
    proc = runner.processor
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": facts["question"]}]}]
    ids = proc.tokenizer(proc.apply_chat_template(conv, add_generation_prompt=True))["input_ids"]
    if "prompt_ids" in facts:
        assert ids == facts["prompt_ids"]
    else:
        assert ids[:len(facts["prompt_prefix_ids"])] == facts["prompt_prefix_ids"]
        assert ids[-len(facts["prompt_suffix_ids"]):] == facts["prompt_suffix_ids"]
    cfg = runner.model.config
    assert proc.tokenizer.convert_tokens_to_ids(proc.image_token) == cfg.image_token_id == facts["special"]["image"][1]
    assert len(proc.tokenizer) == max(i for _, i in facts["special"].values()) + 1
    assert cfg.text_config.vocab_size == published(name, "config.json")["text_config"]["vocab_size"]
    eos = facts["special"]["eos"][1]
    from mustdrop.adapters.llava import _eos_ids
    assert eos in _eos_ids(runner.model, proc)


def test_sequence_lengths_and_placeholders(pub, image):
    """S and T of a run are those of the published prompt; the processor writes one <image> per feature row
    of the stock model (576 / 729, LLaVA-NeXT's unpadded any-res count), and the trace's N0 is that count."""
    name, runner = pub
    facts = published(name, "tokenizer_facts.json")
    trace = runner.run(image.resize((500, 300)), facts["question"], runner.config_for("off"), max_new_tokens=1).trace
    if "prompt_ids" in facts:
        ids = facts["prompt_ids"]
        S = ids.index(facts["special"]["image"][1])
        assert (trace.meta["sequence"]["S"], trace.meta["sequence"]["T"]) == (S, len(ids) - S - 1)
    else:                                           # published ids around the question; its own bytes between
        S = len(facts["prompt_prefix_ids"]) - 3     # "▁", "\n" follow <image>
        ids = runner.processor.tokenizer(trace.meta["input"]["prompt"])["input_ids"]
        assert ids[S] == facts["special"]["image"][1]
        assert (trace.meta["sequence"]["S"], trace.meta["sequence"]["T"]) == (S, len(ids) - S - 1)
    inputs = runner.processor(images=image.resize((500, 300)), text="<image>", return_tensors="pt")
    placeholders = int((inputs["input_ids"] == runner.image_token_id).sum())
    kw = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
    with torch.no_grad():
        rows = runner.model.model.get_image_features(pixel_values=inputs["pixel_values"], **kw).pooler_output
    rows = sum(r.shape[0] for r in rows) if isinstance(rows, (list, tuple)) else rows.shape[0] * rows.shape[1]
    assert placeholders == rows == trace.meta["sequence"]["N0"]
    if runner.family == "llava":
        assert placeholders == runner.grid ** 2 == (576 if runner.has_cls else 729)


def test_mapping_points_at_the_processor_pixels(pub):
    """A marker in a 2:1 image: inside CLIP's centre crop, through SigLIP's aspect-changing resize, in the
    base image and one tile (any-res). Other positions: tests/test_layouts.py, tests/test_llava_next.py."""
    _, runner = pub
    if runner.family == "llava_next":
        assert_marker_in_base_and_one_tile(runner, 300, 700, 100, 520)
    else:
        assert_marker_on_red_patch(runner, 672, 336, 400, 150)


def test_no_drop_run_is_bitwise_unhooked(pub, image):
    _, runner = pub
    res = runner.run(image, QUESTION, no_drop_config(runner), max_new_tokens=2, keep_internals=True)
    for a, b in zip(res.step_logits, stock_logits(runner, image, len(res.step_logits))):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def dropping(pub):
    from conftest import half_textured_image
    _, runner = pub
    image = half_textured_image(0)
    return runner, runner.run(image, QUESTION, dropping_config(runner, image), max_new_tokens=3, keep_internals=True)


def test_dropping_run_equals_masking_reference(dropping):
    runner, res = dropping
    t = res.trace
    assert t.meta["stage2"][0]["dropped"] > 0
    ref, cache = masking_reference(runner, res.inputs_embeds, t, t.meta["generation"]["token_ids"])
    for a, b in zip(res.step_logits, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for layer, (keys, _) in enumerate(res.prefill_cache):
        idx = torch.from_numpy(t.arrays[f"kv.L{layer}"])
        torch.testing.assert_close(keys, cache[layer][0][:, :, idx], atol=1e-5, rtol=0)


def test_published_depth_runs_the_published_layers(dropping):
    """32 layers: stage 2 at 2/6/10/14; stage 3 leaves layers 0..1 whole and trims layers 2..14 to the
    survivors of layer 14, which layers 15..31 already hold. 24 layers (interleave): the shipped defaults."""
    runner, res = dropping
    t = res.trace
    layers = [s["layer"] for s in t.meta["stage2"]]
    if runner.num_layers == 32:
        assert layers == [2, 6, 10, 14]
        assert t.meta["defaults_source"].startswith("reference")
    elif runner.num_layers == 24:
        assert layers == [2, 5, 8, 11]
        assert "shipped defaults for llava-hf/llava-interleave-qwen-0.5b-hf" in t.meta["defaults_source"]
    else:
        pytest.skip("decoder depth reduced for this copy")
    seq = t.meta["sequence"]
    final = t.meta["stage2"][-1]["kept"]
    entries = t.meta["kv"]["entries_per_layer"]
    first = layers[0]
    assert entries[:first] == [seq["S"] + seq["N0"] + seq["T"]] * first
    assert entries[first:] == [seq["S"] + final + seq["T"]] * (runner.num_layers - first)
    assert final < seq["N0"]


@pytest.mark.parametrize("offline_env", [False, True])
def test_hub_id_offline_fails_at_once_with_the_message(offline_env, image, tmp_path):
    """Without a network, --model with a hub id is refused after one connection attempt (none with
    HF_HUB_OFFLINE=1), not after huggingface_hub's retries, with the message it always had."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    img = tmp_path / "img.png"
    image.save(img)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(PYTHONPATH=str(root), HF_HOME=str(tmp_path / "hf"), TRANSFORMERS_VERBOSITY="error")
    if offline_env:
        env["HF_HUB_OFFLINE"] = "1"
    p = subprocess.run([sys.executable, str(root / "tests" / "offline_probe.py"), "llava-hf/llava-interleave-qwen-0.5b-hf",
                        str(img)], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["attempts"] == ([] if offline_env else [["huggingface.co", 443]])
    assert out["rc"] == 2
    assert out["error"] == ("error: cannot load model 'llava-hf/llava-interleave-qwen-0.5b-hf': We couldn't connect to "
                            "'https://huggingface.co' to load the files, and couldn't find them in the cached files.. "
                            "The model hub cannot be reached from here (offline): pass a local folder such as "
                            "assets/toy-llava, or run on a machine with internet access.")


def test_parameter_count_from_config_matches_the_built_models(pub):
    """analysis.flops counts weights from config.json alone; on each tiny copy that count is the model's own."""
    from analysis import flops as FL
    name, runner = pub
    raw = runner.model.config.to_dict()
    counted = FL.parameter_count(raw, raw["text_config"], raw["vision_config"])["total"]
    assert counted == sum(p.numel() for p in runner.model.parameters())


def test_parameter_count_of_llava_15_7b():
    """transformers reports 7,067,621,376 parameters for llava-hf/llava-1.5-7b-hf with a 4,194,304-parameter
    LoRA attached (the LLaMA-Factory log of tests/published/README.md)."""
    from analysis import flops as FL
    assert FL.read_config("analysis/configs/llava-1.5-7b.json")["params"]["total"] == 7_063_427_072


def test_other_model_types_are_refused_with_the_families_we_run(tmp_path):
    """No published family of issue 27 is refused any more (OneVision: tests/test_llava_onevision.py,
    Qwen-VL: tests/test_qwen_vl_host.py); a model type of no host is, naming every one that runs."""
    from mustdrop.adapters import ModelLoadError, load_llava
    from transformers import GPT2Config
    GPT2Config().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="'gpt2' model; ") as e:
        load_llava(str(tmp_path))
    for model_type in ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"):
        assert repr(model_type) in str(e.value)


def test_shipped_defaults_by_hub_id_and_precedence(tmp_path):
    """The app and the CLI pass the hub id (or the cache snapshot it loaded from); a folder's own
    mustdrop.json wins over what the package ships; other ids get the reference scaled to their depth."""
    from mustdrop.config import ModelDefaults
    hub = "llava-hf/llava-interleave-qwen-0.5b-hf"
    shipped = ModelDefaults.load(hub, 24)
    assert shipped.prune_layers == (2, 5, 8, 11) and "not yet calibrated" in shipped.source
    assert shipped.presets["64"] == (0.011, 0.01)
    snapshot = tmp_path / "hub" / "models--llava-hf--llava-interleave-qwen-0.5b-hf" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert ModelDefaults.load(str(snapshot), 24) == shipped
    (snapshot / "mustdrop.json").write_text(json.dumps(dict(shipped.to_json(), prune_layers=[3, 6, 9, 12])))
    assert ModelDefaults.load(str(snapshot), 24).prune_layers == (3, 6, 9, 12)
    assert ModelDefaults.load("llava-hf/llava-1.5-13b-hf", 40).source == "reference scaled to 40 layers"
