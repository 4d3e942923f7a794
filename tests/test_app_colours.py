"""The app's views draw in the palette's colours at the visitor's opacity (decisions still read back
from the pixels), the answer boxes highlight in the neutral grey without special tokens, and the
page has the opacity slider wired to a redraw. Drawn from a stored trace: no model, no server."""

import html
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from lens_app.session import Frame, Session
from mustdrop import vis
from mustdrop.trace import Trace

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def session():
    t = Trace.load(FIXTURES / "v1-llava-64.safetensors")
    va = Trace.load(FIXTURES / "v1-llava-off.safetensors")
    w, h = t.meta["input"]["image"]["width"], t.meta["input"]["image"]["height"]
    img = np.random.default_rng(5).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Session.of_run(t, va, img)


def built(cls):
    v = cls()
    with gr.Blocks():
        v.build()
    return v


def test_views_draw_at_the_sessions_opacity_and_still_decode(session):
    from lens_app.views.filter import FilterView
    from lens_app.views.kv import KVCacheView

    fv, kv = built(FilterView), built(KVCacheView)
    layer = session.trace.prune_layers[0]
    geom = session.geometry
    shown = {}
    for o in (0.1, 0.9):
        session.opacity = o
        f = Frame.of(session, layer)
        shown[o] = (fv.draw(session, f)[fv.status], kv.draw(session, f)[kv.image])
    session.opacity = vis.DEFAULT_OPACITY
    for i, (palette, truth) in enumerate(((vis.STATUS_COLOURS, vis.status_map(session.trace, layer)),
                                          (vis.KV_COLOURS, vis.kv_map(session.trace, layer)))):
        faint, strong = shown[0.1][i], shown[0.9][i]
        assert not np.array_equal(faint, strong)
        assert np.array_equal(vis.decode_categories(faint, geom, palette), truth)
        assert np.array_equal(vis.decode_categories(strong, geom, palette), truth)


def test_legends_of_the_app_explain_dots_and_contours(session):
    from lens_app.views.filter import FilterView
    from lens_app.views.merge import MergeView

    for cls, comp in ((FilterView, "legend"), (MergeView, "legend")):
        v = built(cls)
        html = v.draw(session, Frame.of(session, session.trace.prune_layers[0]))[getattr(v, comp)]
        assert "centre dots" in html


def test_answer_boxes_use_the_neutral_grey_and_drop_special_tokens(session):
    import copy

    from lens_app.views.answers import AnswersView

    def answered(t, pieces, ids):
        meta = copy.deepcopy(t.meta)
        meta["generation"].update(tokens=pieces, token_ids=ids, probs=[0.5] * len(ids),
                                  answer="".join(pieces).replace("</s>", "").strip())
        return Trace(meta, t.arrays)

    s = Session(answered(session.trace, ["red", " </s>"], [7, 2]), answered(session.vanilla, ["blue", " </s>"], [8, 2]))
    v = built(AnswersView)
    assert v.vanilla.color_map == {"differs": vis.css(vis.ANSWER_DIFFERS)}
    out = v.draw(s, Frame.of(s, 0))
    assert out[v.mustdrop] == [("red", "differs")] and out[v.vanilla] == [("blue", "differs")]
    assert "</s>" in html.unescape(out[v.probs]).replace("\\", ""), "the probability table still lists the stop token"


def test_the_page_has_an_opacity_slider_that_redraws():
    from lens_app import app, engine

    lens = engine.Lens("/nonexistent-model-folder")
    demo = app.build_app(lens, examples=[])
    slider = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "opacity_in")
    assert isinstance(slider, gr.Slider) and slider.value == vis.DEFAULT_OPACITY
    assert (slider.minimum, slider.maximum) == (0, 1)
    listens = [d for d in demo.config["dependencies"] if any(t[0] == slider._id for t in d["targets"])]
    assert listens, "a change of the slider redraws the overlays"
    outputs = set(listens[0]["outputs"])
    img_filter = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "img_filter")
    assert img_filter._id in outputs


def test_the_page_chrome_has_no_hue_of_its_own():
    """Buttons, sliders, checkboxes and the active tab take the theme's primary and secondary
    colours: neutral greys, so no UI accent shares a hue with a palette meaning (Gradio's default
    orange is close to 'dropped')."""
    from lens_app.app import theme

    t = theme()
    for name in ("primary", "secondary"):
        for step in ("50", "100", "200", "300", "400", "500", "600", "700", "800", "900"):
            hexa = getattr(t, f"{name}_{step}").lstrip("#")
            rgb = tuple(int(hexa[i:i + 2], 16) for i in (0, 2, 4))
            assert vis.palette.oklch(rgb)[1] < 0.02, f"{name}_{step} {rgb} has a hue"


def test_legend_text_entries_are_spaced_like_swatches(session):
    """A legend's plain-text entry (the merge threshold) sits in its own spaced box: at phone width it
    wrapped into the next swatch's label ('merge threshold 0.8◉ contour ...')."""
    import re

    h = vis.legend_html("similarity", session.trace, gt=True)
    thr = session.trace.meta["stage1a"]["threshold"]
    assert re.search(rf'<span style="display:inline-block;margin:[^"]*">merge threshold {thr}</span>', h)
