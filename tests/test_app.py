"""The app without a browser: the /analyze API through gradio_client against a live local server,
bad inputs (never a traceback, the server keeps serving), replay of uploaded traces, the vanilla
cache, two users at once, the example listing, and the pieces of lens_app on their own."""

import html
import json
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lens_app import app as lens_app_app, cli, engine, examples, inputs
from conftest import serving
from lens_app.session import Frame, Session
from mustdrop.trace import Trace

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    demo = lens_app_app.build_app(engine.Lens(runner=tiny), examples=[])
    with serving(demo) as url:
        yield demo, url


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client
    return Client(server[1], verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from conftest import half_textured_image

    d = tmp_path_factory.mktemp("inputs")
    img = half_textured_image()
    img.save(d / "scene.png")
    (d / "notes.txt").write_text("not an image")
    data = (d / "scene.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 3])
    Image.new("RGB", (1, 1)).save(d / "one.png")
    Image.new("L", (8000, 7000)).save(d / "huge.png")
    img.convert("CMYK").save(d / "cmyk.jpg")
    a16 = (np.asarray(img.convert("L"), np.uint16) * 257)
    Image.fromarray(a16).save(d / "deep16.png")
    return d


def analyze(client, path, question="what color is the square?", preset="64"):
    from gradio_client import handle_file
    return client.predict(handle_file(str(path)), question, preset, api_name="/analyze")[:3]   # no comparison


def test_analyze_endpoint_returns_trace_and_answers(client, files, server):
    path, vanilla, mustdrop = analyze(client, files / "scene.png")
    t = Trace.load(path)
    assert t.answer == mustdrop and t.meta["config"]["preset"] == "64"
    assert isinstance(vanilla, str) and vanilla
    assert any(s["dropped"] for s in t.meta["stage2"])
    api = client.view_api(return_format="dict", print_info=False)
    assert "/analyze" in api["named_endpoints"]
    params = [p["label"] for p in api["named_endpoints"]["/analyze"]["parameters"]]
    assert params == ["Image", "Question", "Preset (average vision-token budget)", "compare with (same budget)"]


def test_vanilla_is_cached(server, files, client):
    lens = server[0].lens
    hits = lens.vanilla_hits
    analyze(client, files / "scene.png", preset="192")
    assert lens.vanilla_hits == hits + 1


@pytest.mark.parametrize("name,question,message", [
    ("notes.txt", "what?", "not an image"),
    ("truncated.png", "what?", "truncated or corrupt"),
    ("one.png", "what?", "at least 2 pixels"),
    ("huge.png", "what?", "pixels"),
    ("scene.png", "   ", "question is empty"),
    ("scene.png", "x" * 3000, "limit is 2000"),
    ("scene.png", "what is <image> here", "placeholder"),
])
def test_bad_inputs_get_clear_messages(client, files, name, question, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        analyze(client, files / name, question)
    assert message in str(e.value) and "Traceback" not in str(e.value)


@pytest.mark.parametrize("name", ["cmyk.jpg", "deep16.png"])
def test_unusual_image_modes_work(client, files, name):
    path, _, answer = analyze(client, files / name, "what shape is there?")
    assert Trace.load(path).meta["input"]["image"]["width"] == 336


RUN_DEFAULTS = dict(window=3, merge_thr=0.8, key_rate=0.08, prune="0, 1, 2, 3", gthr=0.011, ithr=0.01,
                    positions="reference", m1a=True, m1b=True, m2=True, m3=True, max_new=4, mode="greedy",
                    temperature=0.7, top_p=0.9, seed=0, show_gt=True)


def run_ui(client, path, question="what color is the square?", preset="custom", **kw):
    from gradio_client import handle_file
    v = dict(RUN_DEFAULTS, **kw)
    return client.predict(handle_file(str(path)), question, preset, *v.values(), api_name="/run")


def md_plain(md: str) -> str:
    """Escaped Markdown read back as the page shows it (``\\[`` -> ``[``, ``&lt;`` -> ``<``)."""
    return html.unescape(re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", md))


def status_of(result):
    """The status line's Markdown, its escaped values read back."""
    md = next((x for x in result if isinstance(x, str) and x.startswith(("**Problem", "**Done", "**Replaying"))), None)
    return None if md is None else md_plain(md)


@pytest.mark.parametrize("kw,message", [
    (dict(window="nan"), "window must be a finite number"),
    (dict(ithr="inf"), "individual threshold must be a finite number"),
    (dict(merge_thr="abc"), "merge threshold must be a number"),
    (dict(gthr=2.0), "global threshold must be a finite number in [0, 1]"),
    (dict(prune="1, 99"), "prune layer 99 is outside"),
    (dict(prune="3, 1"), "ascending"),
    (dict(prune="x"), "prune layers must be whole numbers"),
    (dict(prune=""), "at least one prune layer"),
    (dict(window=5), "window 5 does not divide"),
    (dict(max_new=0), "max new tokens"),
    (dict(mode="sampling", temperature=0), "temperature > 0"),
])
def test_bad_knobs_show_a_message(client, files, kw, message):
    status = status_of(run_ui(client, files / "scene.png", **kw))
    assert status is not None and status.startswith("**Problem:**") and message in status, status


def test_ui_run_custom_sampling(client, files):
    res = run_ui(client, files / "scene.png", mode="sampling", temperature=0.8, seed=3, prune="1, 3")
    assert status_of(res).startswith("**Done:**")


@pytest.fixture(scope="module")
def stored(client, files):
    """A MustDrop trace file the app wrote (through /analyze)."""
    path, _, _ = analyze(client, files / "scene.png")
    return path


def replay(client, *paths, image=None):
    from gradio_client import handle_file
    return client.predict([handle_file(str(p)) for p in paths], handle_file(str(image)) if image else None, True,
                          api_name="/replay")


def test_replay_without_the_image(client, stored):
    assert status_of(replay(client, stored)).startswith("**Replaying**")


def test_replay_draws_on_the_matching_image(client, stored, files):
    assert "matching image" in status_of(replay(client, stored, image=files / "scene.png"))


def test_replay_rebuilds_missing_or_forged_patch_maps(client, stored, tmp_path):
    good = Trace.load(stored)
    arrays = {k: v for k, v in good.arrays.items() if k != "patch.token"}
    arrays["patch.key"] = np.ones_like(good.arrays["patch.key"])
    Trace(good.meta, arrays).save(tmp_path / "nomaps.safetensors")
    assert np.array_equal(Trace.load(tmp_path / "nomaps.safetensors").patch("key"), good.patch("key"))
    assert status_of(replay(client, tmp_path / "nomaps.safetensors")).startswith("**Replaying**")


def test_replay_refuses_a_vanilla_trace_of_another_input(client, stored, tmp_path):
    good = Trace.load(stored)
    other = dict(good.meta, config=dict(good.meta["config"], merge=False, key_set=False, filter=False, kv_trim=False),
                 input=dict(good.meta["input"], input_hash="0123456789abcdef"))
    Trace(other, good.arrays).save(tmp_path / "other-vanilla.safetensors")
    assert "another image, question or model" in status_of(replay(client, stored, tmp_path / "other-vanilla.safetensors"))


def _hostile(good, tmp_path, name):
    path = tmp_path / f"{name}.safetensors"
    if name == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif name == "hostile":
        Trace(dict(good.meta, stage1b=dict(good.meta["stage1b"], key_tokens=[10 ** 9])), good.arrays).save(path)
    elif name == "schema":
        Trace(dict(good.meta, schema="evil/9"), good.arrays).save(path)
    else:
        from safetensors.numpy import save_file
        save_file({"x": np.zeros(3, np.float32)}, str(path), metadata={"mustdrop_trace": "{not json"})
    return path


@pytest.mark.parametrize("name,msg", [("garbage", "not a MustDrop trace"), ("hostile", "key_tokens"),
                                      ("schema", "unknown trace schema"), ("plain", "malformed JSON")])
def test_hostile_traces_get_a_message_and_the_server_keeps_serving(client, stored, files, tmp_path, name, msg):
    st = status_of(replay(client, _hostile(Trace.load(stored), tmp_path, name)))
    assert st.startswith("**Problem:**") and msg in st, (name, st)
    assert Trace.load(analyze(client, files / "scene.png")[0]).answer


def test_replay_of_a_pooling_baseline_with_its_vanilla_trace(client, tiny, tmp_path):
    """A baseline trace switches every MustDrop stage off: it is still told apart from the vanilla run."""
    from conftest import half_textured_image
    from mustdrop.config import MustDropConfig

    img, q = half_textured_image(), "what color is the square?"
    pool = tiny.run(img, q, MustDropConfig.baseline("pool", 36), max_new_tokens=2).trace.save(tmp_path / "pool.safetensors")
    va = tiny.run(img, q, tiny.config_for("off"), max_new_tokens=2).trace.save(tmp_path / "va.safetensors")
    st = status_of(replay(client, pool, va))
    assert st.startswith("**Replaying**") and "with vanilla" in st and "pool@36" in st, st


def test_replay_of_traces_written_before_the_key_score_rename(client):
    res = replay(client, FIXTURES / "v1-llava-64.safetensors", FIXTURES / "v1-llava-off.safetensors")
    assert status_of(res).startswith("**Replaying**") and "with vanilla" in status_of(res)
    legend = next(x for x in res if isinstance(x, str) and "Stage 1b: key score" in x)
    assert "CLS attention of the last vision layer" in legend


def test_two_users_at_once(server, files):
    from gradio_client import Client

    url = server[1]
    results = {}

    def user(q):
        c = Client(url, verbose=False)
        path, _, _ = analyze(c, files / "scene.png", q)
        results[q] = Trace.load(path).meta["input"]["question"]

    qs = ["what color is the square?", "how many shapes are there?"]
    threads = [threading.Thread(target=user, args=(q,)) for q in qs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {q: q for q in qs}


def test_missing_model_still_replays(tmp_path):
    from mustdrop.adapters.loading import ModelLoadError

    lens = engine.Lens(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelLoadError):
        lens.load()
    assert lens.load_error
    demo = lens_app_app.build_app(lens, examples=[])     # builds: replay works without a model
    assert demo is not None


def test_header_names_the_model_without_machine_paths():
    assert engine.Lens(str(engine.HERE / "assets" / "toy-llava")).model_label == "assets/toy-llava"
    assert engine.Lens("llava-hf/llava-1.5-7b-hf").model_label.endswith("llava-hf/llava-1.5-7b-hf")


def test_shipped_model_keeps_its_calibrated_presets_from_any_working_directory(tmp_path, monkeypatch):
    """Started outside the repository, the default model still loads with its own mustdrop.json
    (prune layers and calibrated thresholds), not the reference defaults scaled to its depth."""
    from mustdrop.config import ModelDefaults

    monkeypatch.chdir(tmp_path)
    runner = engine.Lens().load()
    shipped = ModelDefaults.from_file(engine.HERE / "assets" / "toy-llava" / "mustdrop.json")
    assert runner.model_id == "assets/toy-llava"
    assert runner.defaults.prune_layers == shipped.prune_layers
    cfg = runner.config_for("64")
    assert (cfg.global_thr, cfg.individual_thr) == shipped.presets["64"]
    assert shipped.presets["64"] != ModelDefaults.load(None, 8).presets["64"]     # the check can fail


def test_cli_help():
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0


def test_viz_app_script_starts_the_cli():
    """`python viz_app.py` (the README command and the Spaces app_file) reaches the app's CLI."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "viz_app.py", "--help"], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--model" in out.stdout and "MustDrop Lens" in out.stdout


# ------------------------------------------------------------------------------ examples
def _png(path, colour=(10, 20, 30)):
    Image.new("RGB", (64, 64), colour).save(path)


def _listing(folder, entries):
    (folder / "examples.json").write_text(json.dumps(entries))
    return examples.load_examples(folder)


def test_examples_one_entry_per_question(tmp_path):
    _png(tmp_path / "a.png")
    ex = _listing(tmp_path, [{"file": "a.png", "question": "what color?", "answer": "red"},
                             {"file": "a.png", "question": "how many?"}])
    assert [(e.name, e.questions) for e in ex] == [("a", ["what color?", "how many?"])]
    assert ex[0].masks is None and Path(ex[0].image).is_absolute()


def test_examples_masks_and_targets(tmp_path):
    _png(tmp_path / "b.png", (200, 0, 0))
    masks = np.zeros((2, 24, 24), np.float32)
    masks[0, 2:5, 2:5] = 1
    np.savez_compressed(tmp_path / "b.npz", patch_masks=masks, meta=np.array("{}"))
    ex = _listing(tmp_path, [{"file": "b.png", "question": "Is there  a star?", "masks": "b.npz", "target_ids": [1]}])
    assert ex[0].masks.shape == (2, 24, 24) and ex[0].masks[0, 3, 3] == 1
    assert ex[0].targets == {"is there a star?": (1,)}


@pytest.mark.parametrize("entry", [
    {"file": "missing.png", "question": "x"},
    {"file": "a.png"},
    {"question": "x"},
    {"file": "a.png", "question": "x", "masks": "nowhere.npz"},
    {"file": "a.png", "question": "x", "target_ids": "0"},
    {"file": "a.png", "question": "x", "world": "moon"},
    42,
])
def test_unusable_example_entries_are_skipped(tmp_path, entry):
    _png(tmp_path / "a.png")
    ex = _listing(tmp_path, [entry, {"file": "a.png", "question": "what shape?"}])
    assert [e.questions for e in ex] == [["what shape?"]]


def test_example_world_from_the_listing(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "p.png")
    _png(tmp_path / "q.png")
    ex = _listing(tmp_path, [{"file": "a.png", "question": "what color is the star ?"},
                             {"file": "p.png", "question": "What animal is this?", "world": "photo"},
                             {"file": "q.png", "question": "what is in the image ?", "question_type": "natural_photo"}])
    assert [e.world for e in ex] == ["scene", "photo", "photo"]


# what the app offers: honest examples for the model loaded
PHOTO_QUESTION = re.compile(r"^(what|how many)\b", re.I)


@pytest.fixture(scope="module")
def toy_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(engine.HERE / engine.DEFAULT_MODEL))


def test_shipped_toy_model_is_offered_only_the_scene_questions_it_was_trained_on(toy_tokenizer):
    from analysis.toyworld import make_sample

    shipped = examples.load_examples()
    assert examples.closed_vocabulary(toy_tokenizer)
    shown = examples.offer(shipped, toy_tokenizer, engine.DEFAULT_MODEL)
    scenes = {e.image: e for e in shipped if e.world == "scene"}
    assert shown.rows and all(img in scenes for img, _ in shown.rows)
    listed = json.loads((examples.EXAMPLES_DIR / "examples.json").read_text())
    for entry in (e for e in listed if e.get("world") == "scene"):     # the training distribution: regenerated
        assert make_sample(entry["split"], entry["index"]).question == entry["question"]
        assert [str(examples.EXAMPLES_DIR / entry["file"]), entry["question"]] in shown.rows
    assert all(examples.reads(toy_tokenizer, q) for _, q in shown.rows)
    assert sorted(shown.photos) == sorted(e.image for e in shipped if e.world == "photo") and shown.photos
    assert "scene world only" in shown.note and "assets/toy-llava" in shown.note


def test_the_photo_note_names_a_checkpoint_with_the_apps_own_flag(toy_tokenizer):
    shown = examples.offer(examples.load_examples(), toy_tokenizer, engine.DEFAULT_MODEL)
    command = re.search(r"`python viz_app\.py ([^`]+)`", shown.note).group(1)
    args = cli.parser().parse_args(shlex.split(command))
    assert args.model == "llava-hf/llava-1.5-7b-hf"
    assert not examples.closed_vocabulary(None) and examples.offer(examples.load_examples()).photos == []


def test_a_closed_vocabulary_is_not_offered_a_question_it_cannot_read(tmp_path, toy_tokenizer):
    _png(tmp_path / "a.png")
    ex = _listing(tmp_path, [{"file": "a.png", "question": "what color is the star ?"},
                             {"file": "a.png", "question": "what colour is the sky ?"}])
    assert examples.offer(ex, toy_tokenizer).rows == [[ex[0].image, "what color is the star ?"]]


def test_a_real_checkpoint_gets_real_questions_about_the_photos(tiny):
    tok = tiny.processor.tokenizer
    assert not examples.closed_vocabulary(tok)          # BPE, as the published checkpoints' tokenizers
    shipped = examples.load_examples()
    shown = examples.offer(shipped, tok, tiny.model_id)
    photos = [e for e in shipped if e.world == "photo"]
    asked = [q for img, q in shown.rows if img in {e.image for e in photos}]
    assert shown.photos == [] and shown.note == ""
    assert shown.rows[: len(asked)] == [[img, q] for img, q in shown.rows if img in {e.image for e in photos}]
    assert {img for img, q in shown.rows[: len(asked)]} == {e.image for e in photos}
    assert all(PHOTO_QUESTION.match(q) for q in asked)
    kinds = " ".join(asked).lower()
    assert "how many" in kinds and "color" in kinds and "what is in the image" not in kinds
    assert len(shown.rows) == len(asked) + sum(len(e.questions) for e in shipped if e.world == "scene")


def test_the_page_offers_the_toy_its_scene_questions_and_fits_the_slider_to_the_model(tiny):
    from mustdrop.adapters import LlavaMustDrop, load_llava

    def props(demo):
        return {c["props"].get("elem_id"): c["props"] for c in demo.get_config_file()["components"]
                if c.get("props", {}).get("elem_id")}

    model, processor = load_llava(str(engine.HERE / engine.DEFAULT_MODEL))
    toy = LlavaMustDrop(model, processor, engine.DEFAULT_MODEL)
    page = props(lens_app_app.build_app(engine.Lens(runner=toy)))
    questions = [row[1] for row in page["examples"]["samples"]]
    assert questions and all(examples.reads(processor.tokenizer, q) for q in questions)
    assert len(page["photo_examples"]["samples"]) == 3 and page["photo_examples"]["headers"] == ["Image"]
    assert "scene world only" in page["photo_note"]["value"]
    assert page["layer_slider"]["maximum"] == toy.num_layers - 1 == 7
    assert page["question_in"]["value"] == ""                # no question before an image is chosen
    real = props(lens_app_app.build_app(engine.Lens(runner=tiny)))
    assert "photo_note" not in real and real["layer_slider"]["maximum"] == tiny.num_layers - 1
    assert any(PHOTO_QUESTION.match(row[1]) and "photo_" in row[0]["path"] for row in real["examples"]["samples"])


def test_examples_without_a_listing(tmp_path):
    assert examples.load_examples(tmp_path / "nowhere") == []
    (tmp_path / "examples.json").write_text("{")
    assert examples.load_examples(tmp_path) == []
    (tmp_path / "examples.json").write_text('{"file": "a.png"}')
    assert examples.load_examples(tmp_path) == []


def test_shipped_examples_all_load():
    listed = json.loads((examples.EXAMPLES_DIR / "examples.json").read_text())
    ex = examples.load_examples()
    assert sum(len(e.questions) for e in ex) == len(listed)
    assert sum(e.masks is not None for e in ex) == sum("masks" in e for e in listed)


def test_parse_prune_layers():
    assert inputs.parse_prune_layers("2, 6;10 14") == (2, 6, 10, 14)
    assert inputs.parse_prune_layers("") == ()


def test_numbers_are_checked():
    with pytest.raises(ValueError):
        inputs.number(float("inf"), "x")
    with pytest.raises(ValueError, match="whole number"):
        inputs.number(1.5, "seed", int)


def test_ui_run_preset_off_is_vanilla(client, files):
    res = run_ui(client, files / "scene.png", preset="off")
    st = status_of(res)
    assert st.startswith("**Done:**") and "(off)" in st
    assert any(isinstance(x, str) and "did not run" in x for x in res)     # stage-2 legend says so


def test_spaces_gpu_used_when_importable(monkeypatch):
    import importlib
    import types

    calls = []
    fake = types.ModuleType("spaces")

    def GPU(fn=None, **kw):
        calls.append(fn.__name__)
        return fn
    fake.GPU = GPU
    monkeypatch.setitem(sys.modules, "spaces", fake)
    try:
        importlib.reload(engine)
        assert calls == ["_run_model"] and engine.spaces is fake
    finally:
        monkeypatch.delitem(sys.modules, "spaces")
        importlib.reload(engine)
    assert engine.spaces is None


def test_replay_llava_next_trace_and_switch_crop(client, tmp_path):
    """A LLaVA-NeXT trace (base + tiles) replays with no model; each crop can be shown."""
    from gradio_client import handle_file
    from mustdrop.adapters import load_llava, make_runner
    from mustdrop.testing import build_tiny_llava_next

    folder = build_tiny_llava_next(tmp_path / "next")
    runner = make_runner(*load_llava(str(folder)), str(folder))
    wide = Image.fromarray(np.tile(np.linspace(0, 255, 600, dtype=np.uint8)[None, :, None], (400, 1, 3)))
    path = runner.run(wide, "what is in the image?", runner.config_for("64"), max_new_tokens=2).trace \
        .save(tmp_path / "next.safetensors")
    res = client.predict([handle_file(str(path))], None, True, api_name="/replay")
    assert status_of(res).startswith("**Replaying**")
    res = client.predict(2, 1, True, api_name="/on_crop")
    assert not any(isinstance(x, str) and x.startswith("**Problem") for x in res)
    res = client.predict(1, 3, 4, True, api_name="/on_inspect")
    text = next(x for x in res if isinstance(x, str) and x.startswith("### Patch"))
    assert "of tile" in text


# ------------------------------------------------------------------------------ engine, session, views
def test_progress_names_every_stage_of_both_runs_in_order(tiny):
    from conftest import half_textured_image
    from mustdrop.adapters.llava import RUN_STAGES

    seen = []
    lens = engine.Lens(runner=tiny)
    img = half_textured_image(seed=5)
    lens.analyze(img, "what shape?", lens.config("64"), 2, progress=lambda f, d: seen.append((f, d)))
    words = list(RUN_STAGES.values())
    assert [d for _, d in seen] == [f"vanilla: {w}" for w in words] + [f"MustDrop 64: {w}" for w in words]
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] < 1


def test_session_canvas_is_built_once_per_crop():
    t = Trace.load(FIXTURES / "v1-llava-next-64.safetensors")
    s = Session.of_run(t, None, None)
    first = s.canvas()
    assert s.canvas() is first
    s.show_crop(2)
    assert s.canvas() is not first and s.crop_choices()[2] == (t.crop_name(2), 2)
    with pytest.raises(ValueError, match="crop 9"):
        s.show_crop(9)


def test_frame_clamps_the_layer_and_outlines_only_the_base_image():
    t = Trace.load(FIXTURES / "v1-llava-64.safetensors")
    s = Session(t, gt=object())
    assert Frame.of(s, 99).layer == t.num_layers - 1 and Frame.of(s, -3).layer == 0
    assert Frame.of(s, 1, [2, 3]).selected == (2, 3)
    assert s.ground_truth(True) is s.gt and s.ground_truth(False) is None
    s.crop = 1
    assert s.ground_truth(True) is None


def test_every_registered_view_is_on_the_page(server):
    from lens_app.views import all_views

    demo = server[0]
    assert {type(v) for v in demo.views} == set(all_views())
    names = {type(v).__name__ for v in demo.views}
    assert {"AnswersView", "MergeView", "KeySetView", "FilterView", "KVCacheView", "CountsView", "Inspector",
            "FilesView", "LayerCaption"} <= names
    on_page = {id(b) for b in demo.blocks.values()}
    for v in demo.views:
        assert v.outputs and all(id(c) in on_page for c in v.outputs), type(v).__name__


def test_every_overlay_selects_a_patch(server):
    demo = server[0]
    clickable = [c for v in demo.views for c in v.clickable]
    assert len(clickable) == 7
    wired = {target for fn in demo.fns.values() for target, event in fn.targets if event == "select"}
    table = [b._id for b in demo.blocks.values() if getattr(b, "elem_id", None) == "ds_table"]   # Dataset tab rows
    assert {c._id for c in clickable} | set(table) == wired and len(table) == 1


def test_redraws_before_any_run_change_nothing_and_raise_nothing(server):
    """The slider moved, or a preset chosen, before there is anything to draw: no server error."""
    from gradio_client import Client

    c = Client(server[1], verbose=False)
    res = c.predict(3, True, api_name="/layer")          # raises AppError on a server error
    assert not any(isinstance(x, str) and x.startswith("**Problem") for x in res)



def test_same_knobs_compares_a_trace_config_with_the_panel():
    t = Trace.load(FIXTURES / "v1-llava-64.safetensors")
    from mustdrop.config import MustDropConfig

    cfg = MustDropConfig.from_dict(t.meta["config"])
    panel = inputs.custom_knobs(*inputs.knob_values(cfg))
    assert inputs.same_knobs(t.meta["config"], panel)
    assert not inputs.same_knobs(t.meta["config"], dict(panel, global_thr=panel["global_thr"] * 2))
    assert not inputs.same_knobs(t.meta["config"], dict(panel, prune_layers=(0, 1)))


def test_analyze_lists_only_the_named_presets(client):
    api = client.view_api(return_format="dict", print_info=False)
    preset = api["named_endpoints"]["/analyze"]["parameters"][2]
    assert preset["type"]["enum"] == ["off", "192", "128", "64"]


def test_analyze_refuses_custom_with_a_message(client, files):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="takes a preset in off, 192, 128, 64"):
        analyze(client, files / "scene.png", preset="custom")
