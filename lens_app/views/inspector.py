"""The patch inspector: one patch's whole lifecycle (merged into which group, key token or not, its
scores at every prune layer against the thresholds, dropped where and why, cached in which layers)."""

from __future__ import annotations

import gradio as gr

from mustdrop import vis

from .base import CROP, SELECTION, View, view

PROMPT = "Click a patch on any overlay (or enter row / column) to see its lifecycle."


@view
class Inspector(View):
    slot, order = "below", 0
    depends = frozenset({SELECTION, CROP})

    def build(self):
        with gr.Group(elem_id="inspector"):      # app.py scrolls it into view after a click on an overlay
            gr.Markdown("### Patch inspector — click a patch on any overlay, or give row / column")
            with gr.Row():
                self.row = gr.Number(0, label="row", precision=0, elem_id="row_in")
                self.col = gr.Number(0, label="column", precision=0, elem_id="col_in")
                self.button = gr.Button("Inspect", elem_id="inspect_btn", scale=0, min_width=110)
            self.text = gr.Markdown(elem_id="inspect_md")

    @property
    def outputs(self):
        return [self.text, self.row, self.col]

    def draw(self, s, f):
        if f.selected is None:
            return {self.text: PROMPT}
        r, c = f.selected
        return {self.text: vis.lifecycle_markdown(s.trace, r, c, crop=s.crop), self.row: r, self.col: c}
