"""viz_app.py without a browser: the /analyze API through gradio_client against a live local server,
bad inputs (never a traceback, the server keeps serving), replay of uploaded traces, the vanilla
cache, two users at once, and the tolerant example loader."""

import io
import json
import socket
import threading

import numpy as np
import pytest
from PIL import Image

import viz_app
from mustdrop.trace import Trace


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    lens = viz_app.Lens(runner=tiny)
    demo = viz_app.build_app(lens, examples=[])
    port = free_port()
    viz_app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


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
    return client.predict(handle_file(str(path)), question, preset, api_name="/analyze")


def test_analyze_endpoint_returns_trace_and_answers(client, files, server):
    path, vanilla, mustdrop = analyze(client, files / "scene.png")
    t = Trace.load(path)
    assert t.answer == mustdrop and t.meta["config"]["preset"] == "64"
    assert isinstance(vanilla, str) and vanilla
    assert any(s["dropped"] for s in t.meta["stage2"])
    api = client.view_api(return_format="dict", print_info=False)
    assert "/analyze" in api["named_endpoints"]
    params = [p["label"] for p in api["named_endpoints"]["/analyze"]["parameters"]]
    assert params == ["Image", "Question", "Preset (average vision-token budget)"]


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


def status_of(result):
    return next((x for x in result if isinstance(x, str) and x.startswith(("**Problem", "**Done", "**Replaying"))), None)


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


def test_replay_and_hostile_traces(client, files, tmp_path):
    from gradio_client import handle_file

    path, _, _ = analyze(client, files / "scene.png")
    good = Trace.load(path)
    ok = client.predict([handle_file(path)], None, True, api_name="/replay")
    assert status_of(ok).startswith("**Replaying**")
    # the same image in the image box: drawn on it
    ok = client.predict([handle_file(path)], handle_file(str(files / "scene.png")), True, api_name="/replay")
    assert "matching image" in status_of(ok)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    bad_meta = dict(good.meta)
    bad_meta["stage1b"] = dict(good.meta["stage1b"], key_tokens=[10 ** 9])
    Trace(bad_meta, good.arrays).save(tmp_path / "hostile.safetensors")
    Trace(dict(good.meta, schema="evil/9"), good.arrays).save(tmp_path / "schema.safetensors")
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "plain.safetensors"),
              metadata={"mustdrop_trace": "{not json"})
    # patch maps missing or forged: rebuilt from the token-level records
    arrays = {k: v for k, v in good.arrays.items() if k != "patch.token"}
    arrays["patch.key"] = np.ones_like(good.arrays["patch.key"])
    Trace(good.meta, arrays).save(tmp_path / "nomaps.safetensors")
    assert np.array_equal(viz_app.load_trace(tmp_path / "nomaps.safetensors").patch("key"), good.patch("key"))
    res = client.predict([handle_file(str(tmp_path / "nomaps.safetensors"))], None, True, api_name="/replay")
    assert status_of(res).startswith("**Replaying**")
    other = dict(good.meta, config=dict(good.meta["config"], merge=False, key_set=False, filter=False, kv_trim=False),
                 input=dict(good.meta["input"], input_hash="0123456789abcdef"))
    Trace(other, good.arrays).save(tmp_path / "other-vanilla.safetensors")
    res = client.predict([handle_file(path), handle_file(str(tmp_path / "other-vanilla.safetensors"))], None, True,
                         api_name="/replay")
    assert "another image, question or model" in status_of(res)
    for name, msg in [("garbage", "not a MustDrop trace"), ("hostile", "key_tokens"),
                      ("schema", "unknown trace schema"), ("plain", "malformed JSON")]:
        res = client.predict([handle_file(str(tmp_path / f"{name}.safetensors"))], None, True, api_name="/replay")
        st = status_of(res)
        assert st.startswith("**Problem:**") and msg in st, (name, st)
    # still serving
    assert Trace.load(analyze(client, files / "scene.png")[0]).answer


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

    lens = viz_app.Lens(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelLoadError):
        lens.load()
    assert lens.load_error
    demo = viz_app.build_app(lens, examples=[])     # builds: replay works without a model
    assert demo is not None


def test_header_names_the_model_without_machine_paths():
    assert viz_app.Lens(str(viz_app.HERE / "assets" / "toy-llava")).model_label == "assets/toy-llava"
    assert viz_app.Lens("llava-hf/llava-1.5-7b-hf").model_label.endswith("llava-hf/llava-1.5-7b-hf")


def test_shipped_model_keeps_its_calibrated_presets_from_any_working_directory(tmp_path, monkeypatch):
    """Started outside the repository, the default model still loads with its own mustdrop.json
    (prune layers and calibrated thresholds), not the reference defaults scaled to its depth."""
    from mustdrop.config import ModelDefaults

    monkeypatch.chdir(tmp_path)
    runner = viz_app.Lens().load()
    shipped = ModelDefaults.from_file(viz_app.HERE / "assets" / "toy-llava" / "mustdrop.json")
    assert runner.model_id == "assets/toy-llava"
    assert runner.defaults.prune_layers == shipped.prune_layers
    cfg = runner.config_for("64")
    assert (cfg.global_thr, cfg.individual_thr) == shipped.presets["64"]
    assert shipped.presets["64"] != ModelDefaults.load(None, 8).presets["64"]     # the check can fail


def test_cli_help():
    with pytest.raises(SystemExit) as e:
        viz_app.main(["--help"])
    assert e.value.code == 0


# ------------------------------------------------------------------------------ examples
def _png(path, colour=(10, 20, 30)):
    Image.new("RGB", (64, 64), colour).save(path)


def test_examples_from_a_json_list(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", (200, 0, 0))
    masks = np.zeros((2, 24, 24), np.float32)
    masks[0, 2:5, 2:5] = 1
    np.savez_compressed(tmp_path / "b.npz", patch_masks=masks, meta=np.array(json.dumps(
        {"objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "star"}]})))
    (tmp_path / "examples.json").write_text(json.dumps([
        {"image": "a.png", "questions": [{"question": "what color?", "answer": "red"}, "how many?"]},
        {"image": "b.png", "question": "is there a star?", "scene": "b.npz", "target_ids": [1]},
        {"image": "missing.png", "question": "x"},
        42,
    ]))
    ex = viz_app.load_examples(tmp_path)
    assert [e.questions for e in ex] == [["what color?", "how many?"], ["is there a star?"]]
    assert ex[1].masks.shape == (2, 24, 24) and ex[1].objects == ["red circle", "blue star"]
    assert ex[1].targets == {"is there a star?": (1,)}


def test_examples_from_dict_listing_and_sidecars(tmp_path):
    _png(tmp_path / "s1.png")
    (tmp_path / "index.json").write_text(json.dumps({"scenes": {"first": {"file": "s1.png", "questions": ["q1"]}}}))
    ex = viz_app.load_examples(tmp_path)
    assert [(e.name, e.questions) for e in ex] == [("first", ["q1"])]
    other = tmp_path / "other"
    other.mkdir()
    _png(other / "x.png")
    (other / "x.json").write_text(json.dumps({"questions": ["what shape?"], "masks": [[[0, 1], [1, 0]]]}))
    _png(other / "y.png")
    scene_img = np.zeros((336, 336, 3), np.uint8)
    np.savez_compressed(other / "z.npz", image=scene_img, patch_masks=np.zeros((1, 24, 24), np.float32))
    ex = viz_app.load_examples(other)
    by = {e.name: e for e in ex}
    assert by["x"].questions == ["what shape?"] and by["x"].masks.shape == (1, 2, 2)
    assert by["y"].questions and by["y"].masks is None
    assert by["z"].masks.shape == (1, 24, 24) and Image.open(by["z"].image).size == (336, 336)
    assert viz_app.load_examples(tmp_path / "nowhere") == []
    (other / "broken.json").write_text("{")
    assert len(viz_app.load_examples(other)) == 3


def test_parse_helpers():
    assert viz_app.parse_prune_layers("2, 6;10 14") == (2, 6, 10, 14)
    assert viz_app.parse_prune_layers("") == ()
    with pytest.raises(ValueError):
        viz_app._num(float("inf"), "x")
    with pytest.raises(ValueError, match="whole number"):
        viz_app._num(1.5, "seed", int)


def test_ui_run_preset_off_is_vanilla(client, files):
    res = run_ui(client, files / "scene.png", preset="off")
    st = status_of(res)
    assert st.startswith("**Done:**") and "(off)" in st
    assert any(isinstance(x, str) and "did not run" in x for x in res)     # stage-2 legend says so


def test_spaces_gpu_used_when_importable(monkeypatch):
    import importlib
    import sys
    import types

    calls = []
    fake = types.ModuleType("spaces")

    def GPU(fn=None, **kw):
        calls.append(fn.__name__)
        return fn
    fake.GPU = GPU
    monkeypatch.setitem(sys.modules, "spaces", fake)
    try:
        importlib.reload(viz_app)
        assert calls == ["_run_model"] and viz_app.spaces is fake
    finally:
        monkeypatch.delitem(sys.modules, "spaces")
        importlib.reload(viz_app)
    assert viz_app.spaces is None


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
