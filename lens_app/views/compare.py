"""MustDrop against a same-budget baseline on the same image: each one's kept patches after the LLM
layer on the slider, their overlap (both / only MustDrop / only the other), the counts, both answers
and both budgets in both token conventions. Drawn from the two traces alone (mustdrop.vis.compare)."""

from __future__ import annotations

import gradio as gr

from mustdrop import methods
from mustdrop.vis import compare as vc
from mustdrop.vis.text import md_text

from ..engine import COMPARE_NONE, compare_choices, refused_methods
from ..events import QUIET
from ..stale import stale_note
from .base import CROP, GT, LAYER, SELECTION, View, image_output, view

NONE_NOTE = ("**No comparison in this session.** Choose a method under **Compare with** and press "
             "**Run**; or upload a baseline's trace (e.g. the `compare-*.safetensors` a comparison run offers) "
             "together with the MustDrop trace.")


def refused_note(refused: dict) -> str:
    """The methods this model runs no config of, by label, each with the reason its host gives."""
    labels = methods.labels()
    return "Not offered for this model: " + "; ".join(
        f"**{md_text(labels[m])}** ({md_text(why)})" for m, why in refused.items()) + "."


@view
class CompareView(View):
    tab, tab_id, order = "Compare", "tab_compare", 45
    depends = frozenset({LAYER, SELECTION, CROP, GT})

    def build_inputs(self, lens):
        """The "compare with" choice (the methods the loaded model runs; a note names the others and
        why), placed among the run inputs, and the choice held server-side for the next Run (so /run
        keeps its parameters)."""
        self.choice = gr.Dropdown(compare_choices(lens.runner), value=COMPARE_NONE, elem_id="compare_in",
                                  label="Compare with (runs it at the MustDrop run's budget, same image)")
        refused = refused_methods(lens.runner)
        if refused:
            gr.Markdown(refused_note(refused), elem_id="compare_refused")
        self.held = gr.State(COMPARE_NONE)
        return {"compare": self.choice}

    @property
    def run_inputs(self):
        return {"compare": self.held}

    def wire(self, app):
        p = app.page

        def on_compare(session, compare, preset, *knob_values):
            """The comparison choice, kept for the next Run; the results are stale when it differs."""
            return {self.held: compare, p.stale_md: stale_note(session, preset, knob_values, compare)}

        self.choice.change(app.guarded(on_compare), [p.state, self.choice, p.preset_in] + p.knobs.inputs,
                           [self.held, p.stale_md, p.status], **QUIET)

    def build(self):
        with gr.Row():
            self.mustdrop = image_output("MustDrop: kept after this layer", "img_cmp_md")
            self.other = image_output("compared method: kept after this layer", "img_cmp_other")
        with gr.Row():
            self.overlap = image_output("overlap: both / only MustDrop / only the compared method", "img_cmp_overlap")
            self.text = gr.Markdown(NONE_NOTE, elem_id="compare_md")
        self.legend = gr.HTML()

    @property
    def outputs(self):
        return [self.mustdrop, self.other, self.overlap, self.text, self.legend]

    def draw(self, s, f):
        other = s.compare
        if other is None:
            return {self.mustdrop: None, self.other: None, self.overlap: None, self.text: NONE_NOTE, self.legend: ""}
        kw = f.kw(s)
        return {self.mustdrop: vc.kept_overlay(s.trace, f.layer, "mustdrop", **kw),
                self.other: vc.kept_overlay(other, f.layer, "other", **kw),
                self.overlap: vc.overlap_overlay(s.trace, other, f.layer, **kw),
                self.text: vc.compare_markdown(s.trace, other, f.layer, vanilla=s.vanilla, crop=s.crop),
                self.legend: vc.legend_html(other)}
