"""The patch inspector: one patch's whole lifecycle (merged into which group, key token or not, its
scores at every prune layer against the thresholds, dropped where and why, cached in which layers)."""

from __future__ import annotations

import gradio as gr

from mustdrop import vis

from .. import inputs
from .base import CROP, NO_SESSION, SELECTION, View, view

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

    def wire(self, app):
        from ..events import after_select, select_outputs

        p = app.page

        def on_inspect(session, layer, row, col, show_gt):
            if not session:
                return app.warn(NO_SESSION)
            rc = (inputs.number(row, "row", int), inputs.number(col, "column", int))
            vis.patch_lifecycle(session.trace, *rc, crop=session.crop)        # validates the range, clear message
            return app.select(session, layer, rc, show_gt)

        after_select(self.button.click(app.guarded(on_inspect), [p.state, p.layer_slider, self.row, self.col, p.show_gt],
                                       select_outputs(app), api_visibility="undocumented", queue=False))

    @property
    def outputs(self):
        return [self.text, self.row, self.col]

    def draw(self, s, f):
        if f.selected is None:
            return {self.text: PROMPT}
        r, c = f.selected
        return {self.text: vis.lifecycle_markdown(s.trace, r, c, crop=s.crop), self.row: r, self.col: c}
