"""Every entry of the bad-input corpus gets a message that names the problem, through the library
and the CLI; no hook stays attached; the next good run is correct; nothing is written elsewhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import corpus
from mustdrop.adapters import ModelLoadError, load_llava
from mustdrop.hooks import count_hooks
from mustdrop.images import ImageInputError, load_image
from mustdrop.trace import Trace, TraceError

ROOT = Path(__file__).resolve().parents[1]
Q = "what colour is the square?"


def assert_words(msg, words):
    low = msg.lower()
    assert any(w.lower() in low for w in words), f"message {msg!r} names none of {words}"


@pytest.mark.parametrize("name", sorted(corpus.BAD_IMAGES))
def test_bad_image_files_are_refused_by_name(name, tmp_path):
    build, words = corpus.BAD_IMAGES[name]
    with pytest.raises(ImageInputError) as e:
        load_image(build(tmp_path))
    assert_words(str(e.value), words)


@pytest.mark.parametrize("name", sorted(corpus.GOOD_ODD_IMAGES))
def test_odd_but_valid_images_become_rgb(name, tmp_path):
    img = load_image(corpus.GOOD_ODD_IMAGES[name](tmp_path))
    assert img.mode == "RGB" and min(img.size) >= 2


def test_exif_rotation_is_applied(tmp_path):
    img = load_image(corpus.exif_rotated(tmp_path / "r.jpg"))
    assert img.size == (100, 200)
    a = np.asarray(img)
    assert a[:20, :, 0].mean() > 200 and a[:20, :, 1].mean() < 60, "red band on top once upright"
    assert a[-20:, :, 1].mean() > 180


def test_decompression_bomb_as_pil_object_is_refused():
    from PIL import Image
    big = Image.new("L", (1, 1)).resize((8000, 8000))
    with pytest.raises(ImageInputError, match="refused"):
        load_image(big)


@pytest.mark.parametrize("name", sorted(corpus.BAD_QUESTIONS))
def test_bad_questions(tiny, image, name):
    q, words = corpus.BAD_QUESTIONS[name]
    before = count_hooks(tiny.model)
    with pytest.raises(ValueError) as e:
        tiny.run(image, q, tiny.config_for("64"), max_new_tokens=1)
    assert_words(str(e.value), words)
    assert count_hooks(tiny.model) == before


@pytest.mark.parametrize("name", sorted(corpus.BAD_KNOBS))
def test_bad_knobs(tiny, image, name):
    kw, words = corpus.BAD_KNOBS[name]
    before = count_hooks(tiny.model)
    with pytest.raises(ValueError) as e:
        tiny.run(image, Q, tiny.config_for("64").replace(**kw), max_new_tokens=1)
    assert_words(str(e.value), words)
    assert count_hooks(tiny.model) == before


@pytest.mark.parametrize("name", sorted(corpus.BAD_MAX_NEW_TOKENS))
def test_bad_max_new_tokens(tiny, image, name):
    with pytest.raises(ValueError, match="max new tokens"):
        tiny.run(image, Q, tiny.config_for("64"), max_new_tokens=corpus.BAD_MAX_NEW_TOKENS[name])


def test_good_run_after_bad_inputs_is_unchanged(tiny, image):
    cfg = tiny.config_for("64")
    first = tiny.run(image, Q, cfg, max_new_tokens=3).trace
    for q, _ in corpus.BAD_QUESTIONS.values():
        with pytest.raises(ValueError):
            tiny.run(image, q, cfg)
    again = tiny.run(image, Q, cfg, max_new_tokens=3).trace
    assert first.meta["generation"]["token_ids"] == again.meta["generation"]["token_ids"]
    assert first.meta["stage2"] == again.meta["stage2"]


def test_model_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="offline"):
        load_llava("llava-hf/llava-1.5-7b-hf-does-not-exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_llava(str(empty))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelLoadError, match="'bert'"):
        load_llava(str(bert))


def test_model_folder_without_weights(tiny_dir, tmp_path):
    import shutil
    folder = tmp_path / "noweights"
    shutil.copytree(tiny_dir, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="weights"):
        load_llava(str(folder))


@pytest.fixture(scope="module")
def good_trace(tiny):
    from conftest import half_textured_image
    return tiny.run(half_textured_image(), Q, tiny.config_for("64"), max_new_tokens=2).trace


def test_bad_trace_files(good_trace, tmp_path):
    for name, (path, words) in corpus.bad_trace_files(tmp_path, good_trace).items():
        if words is None:
            t = Trace.load(path)               # hostile names load as plain strings ...
            assert t.meta["model"]["id"].startswith("../")
            continue
        with pytest.raises(TraceError) as e:
            Trace.load(path)
        assert_words(str(e.value), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors"), "loading wrote nothing"


def run_cli(cwd, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mustdrop", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_cli_bad_inputs_give_messages_and_write_nothing(tiny_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    bad_png, _ = corpus.BAD_IMAGES["text_renamed_png"]
    img = bad_png(tmp_path)
    cases = [
        (["--image", str(img), "--question", Q], "not an image"),
        (["--image", str(corpus.GOOD_ODD_IMAGES["rgba"](tmp_path)), "--question", "  "], "empty"),
        (["--image", str(corpus.GOOD_ODD_IMAGES["rgba"](tmp_path)), "--question", Q, "--max-new-tokens", "0"],
         "max new tokens"),
    ]
    for args, words in cases:
        p = run_cli(work, "run", "--model", str(tiny_dir), *args, "--out", str(work / "out" / "t.safetensors"))
        assert p.returncode == 2, p.stderr
        assert words in p.stderr and "Traceback" not in p.stderr
    assert list(work.rglob("*")) == [], "a failed run writes nothing"
    p = run_cli(work, "show", str(img))
    assert p.returncode == 2 and "not a MustDrop trace" in p.stderr
