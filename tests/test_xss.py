"""Hostile strings in a trace (and from a user or an example file) reach the page as text: no markup,
no link, no LaTeX, no mathtext. A real trace of the tiny model has its metadata strings replaced by
payloads; every value the app returns for it into gr.HTML / gr.Markdown is rendered here with a
GFM Markdown renderer and must hold none of the payloads' elements. Also: a one-layer model's trace
replays (gradio refuses a slider whose minimum equals its maximum)."""

import re
import socket

import numpy as np
import pytest

from lens_app import app as lens_app_app, engine
from mustdrop import vis
from mustdrop.config import ModelDefaults, MustDropConfig
from mustdrop.trace import Trace
from mustdrop.vis import compare as vc
from mustdrop.vis.text import html_text, md_code, md_text, md_value

IMG = '<img src=x onerror="window.__xss=1">'
SCRIPT = "<script>window.__xss=1</script>"
LINK = "`x` [sign in again](https://evil.example)"
MATH = "$\\over$"
LATEX = "$$\\href{https://evil.example}{x}$$"
PAYLOADS = (IMG, SCRIPT, LINK, MATH, LATEX)


def hostile_meta(meta: dict, n: int = 0) -> dict:
    """``meta`` with every string field the readers show replaced by a payload (``n`` rotates them)."""
    p = lambda k: PAYLOADS[(k + n) % len(PAYLOADS)] + " " + IMG   # noqa: E731
    m = {k: (dict(v) if isinstance(v, dict) else v) for k, v in meta.items()}
    m["model"] = dict(m["model"], id=LINK + " " + SCRIPT, device=p(1))
    m["input"] = dict(m["input"], question=p(2))
    m["config"] = dict(m["config"], preset=p(3))
    m["stage1a"] = dict(m["stage1a"], threshold=p(4))
    m["stage1b"] = dict(m["stage1b"], score=p(5))
    gen = dict(m["generation"], answer=p(6))
    gen["tokens"] = [p(7)] + list(gen["tokens"][1:])
    m["generation"] = gen
    return m


def rendered(markdown: str) -> str:
    """HTML of ``markdown`` as a GFM renderer with raw HTML allowed (the page's renderer) makes it;
    bare links, which GFM also turns into anchors, are checked in ``assert_inert``."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).render(markdown)


def assert_inert(value: str, where: str = "") -> None:
    """No element of a payload survives in ``value`` (HTML, or Markdown rendered to HTML)."""
    for html in (value, rendered(value)):
        low = html.lower()
        assert "<img" not in low and "<script" not in low, (where, value)
        assert not re.search(r"<[a-z][^>]*\bon\w+\s*=", low), (where, value)
        assert not re.search(r"<a\b[^>]*evil", low), (where, value)
    if not value.startswith("<div"):                   # Markdown (a legend is HTML: no autolinks, no KaTeX)
        assert "$$" not in value, (where, value)       # gradio renders $$...$$ with KaTeX
        assert not re.search(r"(?i)(https?://|www\.|(?<!\\)@)evil", value), (where, value)   # GFM autolinks


@pytest.fixture(scope="module")
def traces(tiny, tmp_path_factory):
    """(MustDrop, vanilla, pool baseline) traces of one input, with hostile strings, saved and loaded."""
    from conftest import half_textured_image

    d = tmp_path_factory.mktemp("xss")
    img, q = half_textured_image(), "what color is the square?"
    runs = [tiny.run(img, q, tiny.config_for("64"), max_new_tokens=3).trace,
            tiny.run(img, q, tiny.config_for("off"), max_new_tokens=3).trace,
            tiny.run(img, q, MustDropConfig.baseline("pool", 36), max_new_tokens=3).trace]
    paths = []
    for i, (t, name) in enumerate(zip(runs, ("md", "vanilla", "pool"))):
        m = hostile_meta(t.meta, i)
        m["input"]["input_hash"] = t.meta["input"]["input_hash"]
        paths.append(Trace(m, t.arrays).save(d / f"{name}.safetensors"))
    return [Trace.load(p) for p in paths], paths


# ----------------------------------------------------------------------------- the helpers
@pytest.mark.parametrize("payload", PAYLOADS + ("# heading", "1. item", "> quote", "- item", "www.evil.example",
                                                "a@evil.example", "https://evil.example", "**bold** _it_ ~~s~~",
                                                "| a | b |", "\\[x](y)", "&lt;img src=x onerror=1&gt;"))
def test_escaped_markdown_renders_as_the_text_itself(payload):
    from html import unescape

    for md, tag in ((md_text(payload), "p"), (md_code(payload), "code")):
        out = rendered(md).strip()
        assert_inert(md)
        inner = re.fullmatch(rf"<p>(?:<{tag}>)?(.*?)(?:</{tag}>)?</p>", out, re.S)
        assert inner and unescape(inner.group(1)) == payload, (payload, md, out)


def test_html_text_and_numbers():
    assert html_text(IMG) == "&lt;img src=x onerror=&quot;window.__xss=1&quot;&gt;"
    assert md_value(0.8) == "0.8" and md_value(3) == "3" and md_value(True) == "True"
    assert md_value("tiny-llava") == "tiny-llava" and md_text("what color is the square?") == "what color is the square?"


# ----------------------------------------------------------------------------- the vis layer
def test_every_readout_and_legend_of_a_hostile_trace_is_inert(traces):
    (md, va, pool), _ = traces
    gt = vis.GroundTruth(np.ones((1, md.grid, md.grid), np.float32), (0,))
    out = {"summary": vis.summary_markdown(md, va), "lifecycle": vis.lifecycle_markdown(md, 3, 4),
           "compare": vc.compare_markdown(md, pool, md.start_layer, vanilla=va), "compare_legend": vc.legend_html(pool)}
    for layer in range(md.num_layers):
        out[f"layer {layer}"] = vis.layer_markdown(md, layer, gt)
    d = vis.answer_diff(va, md)
    out["diff"], out["table"] = d["text"], d["table"]
    for kind in ("merge", "similarity", "key_score", "filter", "kv", "compare", "global_share", "individual_max"):
        out[f"legend {kind}"] = vis.legend_html(kind, md, md.prune_layers[0], gt=True)
    for where, value in out.items():
        assert_inert(value, where)
    assert "sign in again" in out["summary"] and "window.__xss" in out["legend merge"]   # shown, as text


def test_a_slide_of_a_hostile_trace_renders(traces, tmp_path):
    """Matplotlib reads $...$ as mathtext: '$\\over$' in a title or answer raised at savefig."""
    (md, va, pool), _ = traces
    png, pdf = vis.save_slides(md, tmp_path, vanilla=va, compare=pool)
    assert png.stat().st_size and pdf.stat().st_size
    assert re.fullmatch(r"[A-Za-z0-9._-]+", png.stem)


# ----------------------------------------------------------------------------- the app
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(tiny):
    from gradio_client import Client

    demo = lens_app_app.build_app(engine.Lens(runner=tiny), examples=[])
    port = free_port()
    lens_app_app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    demo.close()


def replay(client, *paths):
    from gradio_client import handle_file
    return client.predict([handle_file(str(p)) for p in paths], None, True, api_name="/replay")


def strings(result):
    return [x for x in result if isinstance(x, str)]


def test_replay_of_a_hostile_trace_returns_only_inert_markup(client, traces):
    _, paths = traces
    res = replay(client, *paths)
    status = next(s for s in strings(res) if s.startswith(("**Replaying", "**Problem")))
    assert status.startswith("**Replaying**"), status
    assert "sign in again" in status and "<code>" in status
    for value in strings(res):
        assert_inert(value)
    for layer in (0, 2):
        for value in strings(client.predict(layer, True, api_name="/layer")):
            assert_inert(value, f"layer {layer}")


def test_a_hostile_file_name_in_a_problem_message_is_inert(client, tmp_path):
    bad = tmp_path / "[sign in again](https:⁄⁄evil.example) <img src=x onerror=1>.safetensors"
    bad.write_bytes(b"\x00" * 64)
    status = next(s for s in strings(replay(client, bad)) if s.startswith("**Problem"))
    assert_inert(status)


def test_a_one_layer_model_trace_replays(client, tmp_path):
    """Gradio refuses a slider with minimum == maximum: a one-layer trace failed with 'Slider minimum
    must be less than maximum'."""
    from conftest import half_textured_image
    from mustdrop.adapters import LlavaMustDrop, load_llava
    from mustdrop.testing import build_tiny_llava

    folder = build_tiny_llava(tmp_path / "one-layer", text_layers=1)
    model, processor = load_llava(str(folder))
    runner = LlavaMustDrop(model, processor, str(folder), defaults=ModelDefaults(prune_layers=(0,)))
    assert runner.num_layers == 1
    t = runner.run(half_textured_image(), "what color is the square?", runner.config_for("64"), max_new_tokens=2).trace
    path = t.save(tmp_path / "one.safetensors")
    res = replay(client, path)
    status = next(s for s in strings(res) if s.startswith(("**Replaying", "**Problem")))
    assert status.startswith("**Replaying**"), status
    assert any("**LLM layer 0** of 1" in s for s in strings(res))
    assert any(s.startswith("<div") and "threshold" in s for s in strings(res))   # stage 2 ran at layer 0


def test_the_layer_slider_of_a_one_layer_model_is_fixed():
    from lens_app.views.layer import slider_range

    assert slider_range(1) == dict(minimum=0, maximum=1, interactive=False)
    assert slider_range(32) == dict(minimum=0, maximum=31, interactive=True)
