"""The page's layout: the inputs column (image, question, preset, the views' own run inputs, Run,
the examples, the knob panel, decoding, the sidebar views) and the results column (stale note, the
layer controls, the views in their slots and tabs). Views place themselves by ``slot``; nothing here
knows a view by name."""

from __future__ import annotations

import gradio as gr

from mustdrop import vis
from mustdrop.vis.text import md_code, md_text

from .engine import PRESETS
from .knobs import KnobPanel
from .views.layer import slider_range

SESSION_TTL = 3 * 3600          # a visitor's Session (and inspected patch) is freed after 3 h


class Page:
    """The components events read and write, by name (set by build_page)."""

    choices: dict          # the views' run inputs shown on the page, by role ({"compare": dropdown})
    run_inputs: dict       # the values views feed to a Run, by role ({"compare": held choice})


def header(lens) -> str:
    model_note = ("" if lens.load_error is None else
                  f"\n\n**The model could not be loaded:** {md_text(lens.load_error)}\n\nTrace upload and replay still work.")
    return ("# MustDrop Lens\nWhat multi-stage vision token dropping "
            "([MustDrop](https://arxiv.org/abs/2411.10803)) does to every image patch of a LLaVA model: "
            "**1a** spatial merge · **1b** key tokens · **2** dual-attention filter · "
            f"**3** KV trim. Model: {md_code(lens.model_label)}." + model_note)


def build_page(lens, views, offered, depth: int, tabs=()) -> Page:
    """Build the page inside an open gr.Blocks; the components events need, as a Page."""
    p = Page()
    p.state = gr.State(None, time_to_live=SESSION_TTL)      # the visitor's Session
    p.sel_state = gr.State(None, time_to_live=SESSION_TTL)  # the inspected patch [row, col]
    gr.Markdown(header(lens))
    p.status = gr.Markdown("Choose an example or upload an image, ask a question, press **Run**.", elem_id="status")
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            build_inputs(p, lens, views, offered)
        with gr.Column(scale=2, min_width=520, elem_id="results"):
            build_results(p, views, depth, tabs)
    return p


def slot(views, name):
    return [v for v in views if v.slot == name]


def build_inputs(p: Page, lens, views, offered) -> None:
    p.image_in = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                          elem_id="image_in", height=200)
    p.question_in = gr.Textbox(label="Question", value="", max_lines=3, elem_id="question_in",
                               placeholder="choose an example, or type a question")
    p.preset_in = gr.Radio(PRESETS, value="64", label="Preset (average vision-token budget)", elem_id="preset_in")
    p.choices, p.run_inputs = {}, {}
    for v in views:
        p.choices.update(v.build_inputs(lens))
        p.run_inputs.update(v.run_inputs)
    p.run_btn = gr.Button("Run vanilla + MustDrop", variant="primary", elem_id="run_btn")
    if offered.rows:
        gr.Examples(offered.rows, inputs=[p.image_in, p.question_in], label=offered.label,
                    examples_per_page=6, elem_id="examples")
    if offered.photos:
        gr.Markdown(offered.note, elem_id="photo_note")
        gr.Examples([[x] for x in offered.photos], inputs=[p.image_in], label="Photos (for a real checkpoint)",
                    elem_id="photo_examples")
    p.knobs = KnobPanel(lens.defaults("64"))
    p.knobs.build()
    with gr.Accordion("Decoding", open=False):
        p.max_new_in = gr.Number(16, label="max new tokens", precision=0, minimum=1, maximum=1024)
        p.mode_in = gr.Radio(["greedy", "sampling"], value="greedy", label="decoding")
        with gr.Row():
            p.temp_in = gr.Number(0.7, label="temperature")
            p.top_p_in = gr.Number(0.9, label="top p")
            p.seed_in = gr.Number(0, label="seed", precision=0)
    for v in slot(views, "sidebar"):
        v.build()


def build_results(p: Page, views, depth: int, extra_tabs=()) -> None:
    p.stale_md = gr.Markdown(elem_id="stale_md")
    for v in slot(views, "top"):
        v.build()
    with gr.Row():
        p.layer_slider = gr.Slider(value=0, step=1, label="LLM layer (0-based)", elem_id="layer_slider",
                                   scale=3, **slider_range(depth))
        p.crop_in = gr.Dropdown(choices=[("image", 0)], value=0, label="crop (LLaVA-NeXT: base image, tiles)",
                                visible=False, elem_id="crop_in", scale=1)
        p.show_gt = gr.Checkbox(True, label="ground-truth objects (scene-world examples; thick white = the one asked about)",
                                elem_id="show_gt", scale=1)
        p.opacity_in = gr.Slider(0, 1, value=vis.DEFAULT_OPACITY, step=0.05, label="overlay opacity",
                                 info="how strongly category colours tint the image", elem_id="opacity_in", scale=1)
    for v in slot(views, "caption"):
        v.build()
    with gr.Tabs(overflow_behavior="wrap") as p.tabs:     # every tab's button in reach on a phone
        tabs = {}
        for v in slot(views, "tab"):
            tabs.setdefault((v.tab, v.tab_id), []).append(v)
        for (name, elem_id), members in tabs.items():
            with gr.Tab(name, elem_id=elem_id, id=elem_id):
                for v in members:
                    v.build()
        for t in extra_tabs:                                # e.g. the Dataset tab (views/dataset.py)
            with gr.Tab(t.tab, elem_id=t.tab_id, id=t.tab_id):
                t.build()
    for v in slot(views, "below"):
        v.build()
