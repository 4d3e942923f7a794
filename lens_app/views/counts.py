"""Counts and cost: vision tokens per LLM layer, equivalent tokens, FLOPs, KV bytes, timings."""

from __future__ import annotations

import gradio as gr

from mustdrop import vis

from .base import View, view


@view
class CountsView(View):
    tab, tab_id, order = "Counts and cost", "tab_counts", 50

    def build(self):
        self.curve = gr.Plot(label="Vision tokens per LLM layer", elem_id="plot_curve")
        self.summary = gr.Markdown(elem_id="summary_md")

    @property
    def outputs(self):
        return [self.curve, self.summary]

    def draw(self, s, f):
        return {self.curve: vis.token_curve(s.trace, s.vanilla), self.summary: vis.summary_markdown(s.trace, s.vanilla)}
