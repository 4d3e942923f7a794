"""The slide a user exports: the whole question, clean answers, the image undrawn on, a curve whose
legend covers no line, 0-based layer numbers, file names that do not collide; and a server that
does not print Gradio's share hint. Drawn from stored traces (no model)."""

import copy
import html
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mustdrop import vis
from mustdrop.trace import Trace

FIXTURES = Path(__file__).parent / "fixtures"
LONG_Q = ("Looking very carefully at every part of this picture, including the background, the flags and "
          "the helmet, what colour is the suit the astronaut is wearing, and is there anything written on "
          "it, maybe a name tag or a mission patch with small letters around its edge?")


@pytest.fixture(scope="module")
def pair():
    return Trace.load(FIXTURES / "v1-llava-64.safetensors"), Trace.load(FIXTURES / "v1-llava-off.safetensors")


def with_meta(t, **changes):
    """A copy of a trace with meta fields changed (dotted paths: "input.question")."""
    meta = copy.deepcopy(t.meta)
    for path, value in changes.items():
        d = meta
        *keys, last = path.split(".")
        for k in keys:
            d = d[k]
        d[last] = value
    return Trace(meta, t.arrays)


def image_for(t):
    w, h = t.meta["input"]["image"]["width"], t.meta["input"]["image"]["height"]
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def slide(pair):
    """The default slide of the stored pair (shared by the tests that only read it)."""
    md, va = pair
    return vis.slide_figure(md, vanilla=va)


def renderer(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def figure_text(fig) -> str:
    return "\n".join(t.get_text() for ax in fig.axes for t in ax.texts) + "\n" + fig._suptitle.get_text()


def flat(s) -> str:
    return " ".join(str(s).split())


def test_the_question_appears_whole_and_fits_on_the_slide(pair):
    md, va = pair
    t = with_meta(md, **{"input.question": LONG_Q})
    fig = vis.slide_figure(t, vanilla=va)
    text = next(x for ax in fig.axes for x in ax.texts if x.get_text().startswith("Q: "))
    q_block = text.get_text().split("\n\n")[0]
    assert flat(q_block) == flat("Q: " + LONG_Q), "the question is wrapped, never cut"
    assert "…" not in text.get_text()
    box = text.get_window_extent(renderer(fig))
    assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= 1920 and box.y1 <= 1080, box


def test_answer_boxes_show_no_special_tokens(pair):
    md, va = pair
    t = with_meta(md, **{"generation.answer": "a red square </s>"})
    v = with_meta(va, **{"generation.answer": "<s> a red square</s><|im_end|>"})
    fig = vis.slide_figure(t, vanilla=v)
    text = figure_text(fig)
    assert "a red square" in text
    for special in ("</s>", "<s>", "<|im_end|>"):
        assert special not in text
    # the app's answer boxes too: pieces without the stop token, the probability table keeps it
    t2 = with_meta(md, **{"generation.tokens": ["red", " </s>"], "generation.token_ids": [1, 2],
                           "generation.probs": [0.9, 0.8], "generation.answer": "red"})
    d = vis.answer_diff(None, t2)
    assert [p for p, _ in d["mustdrop"]] == ["red"]
    assert "</s>" in html.unescape(d["table"]).replace("\\", "")      # Markdown-escaped in the table


def test_special_tokens_recorded_in_the_trace_are_used(pair):
    md, _ = pair
    t = with_meta(md, tokenizer={"special_tokens": ["<|my_stop|>"]})
    assert vis.strip_special("blue <|my_stop|>", t) == "blue"
    assert vis.strip_special("blue </s>", t) == "blue"            # the known list still applies


def test_the_first_panel_is_the_image_with_nothing_drawn_on_it(pair):
    md, va = pair
    img = image_for(md)
    fig = vis.slide_figure(md, image=img, vanilla=va)
    first = fig.axes[0]
    assert first.get_title().startswith("the image as the model saw it")
    shown = np.asarray(first.images[0].get_array())
    geom = vis.geometry(md, target=336)
    assert np.array_equal(shown, vis.model_view(img, md, geom.size))
    overlays = [np.asarray(ax.images[0].get_array()) for ax in fig.axes[1:5]]
    assert all(not np.array_equal(shown, o) for o in overlays)


def test_the_curve_legend_covers_no_line(slide):
    fig = slide
    ax = next(a for a in fig.axes if a.get_title() == "vision tokens per LLM layer")
    r = renderer(fig)
    legend = ax.get_legend().get_window_extent(r)
    plot = ax.get_window_extent(r)
    assert not legend.overlaps(plot), "the legend sits outside the axes"
    assert ax.get_xlabel() == "LLM layer (0-based)"


def test_layers_say_they_count_from_zero(pair, slide):
    md, _ = pair
    fig = slide
    titles = [a.get_title() for a in fig.axes]
    assert any(t.startswith("2  filter after layer") and "(0-based)" in t for t in titles), titles
    assert any(t.startswith("3  KV cache of layer") and t.endswith("(0-based)") for t in titles), titles
    assert "counted from 0" in fig._suptitle.get_text()
    assert "(0-based" in vis.layer_markdown(md, 0) and "counted from 0" in vis.lifecycle_markdown(md, 0, 0)


def test_slide_file_names_carry_model_preset_image_and_layer(pair, tmp_path):
    md, va = pair
    a = vis.slide_stem(md, 3, "/tmp/gradio/abc/cat photo.png")
    assert a.endswith("-L3") and "-64-" in a and "cat_photo" in a
    assert a == vis.slide_stem(md, 3, "/tmp/gradio/abc/cat photo.png"), "the name is stable"
    other_image = with_meta(md, **{"input.image.sha256": "f" * 64})
    other_preset = with_meta(md, **{"config.preset": "128"})
    other_model = with_meta(md, **{"model.id": "llava-hf/llava-1.5-7b-hf"})
    names = {a, vis.slide_stem(other_image, 3, "/x/cat photo.png"), vis.slide_stem(other_preset, 3, "cat photo.png"),
             vis.slide_stem(md, 4, "cat photo.png"), vis.slide_stem(other_model, 3, "cat photo.png"),
             vis.slide_stem(md, 3, None)}
    assert len(names) == 6, names
    assert vis.slide_stem(other_model, 3, None).startswith("llava-1.5-7b-hf-64-")
    odd = with_meta(md, **{"model.id": "../we ird:/name?", "config.preset": "a/b"})
    stem = vis.slide_stem(odd, 0, "../../etc/pass wd.png")
    assert all(ch.isalnum() or ch in "._-" for ch in stem), stem
    png1, _ = vis.save_slides(md, tmp_path, vanilla=va, layer=3, image_name="one.png")
    png2, _ = vis.save_slides(other_preset, tmp_path, vanilla=va, layer=3, image_name="one.png")
    assert png1 != png2 and png1.is_file() and png2.is_file()


def test_slide_opacity_reaches_the_panels(pair):
    md, _ = pair
    img = image_for(md)
    faint = vis.slide_figure(md, image=img, opacity=0.0)
    strong = vis.slide_figure(md, image=img, opacity=1.0)
    geom = vis.geometry(md, target=336)
    for i in (1, 3, 4):                                   # 1a, 2, 3: the category panels
        a = np.asarray(faint.axes[i].images[0].get_array())
        b = np.asarray(strong.axes[i].images[0].get_array())
        assert not np.array_equal(a, b)
        assert np.array_equal(vis.decode_dots(a, geom), vis.decode_dots(b, geom)), "same exact dots"


def test_every_slide_legend_explains_the_centre_dots(slide):
    fig = slide
    for ax in fig.axes[1:5]:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any("centre dot" in lab for lab in labels), (ax.get_title(), labels)


def test_the_server_does_not_print_the_share_hint(capfd):
    import gradio as gr

    from conftest import free_port
    from lens_app.app import launch

    port = free_port()
    with gr.Blocks() as demo:
        gr.Markdown("hello")
    try:
        launch(demo, "127.0.0.1", port, prevent_thread_lock=True)
        out = capfd.readouterr()
    finally:
        demo.close()
    printed = out.out + out.err
    assert "share=True" not in printed
    assert f"127.0.0.1:{port}" in printed, printed
