"""The caption under the layer slider: that LLM layer in numbers, and how long the redraw took."""

from __future__ import annotations

import time

import gradio as gr

from mustdrop import vis

from .base import CROP, GT, LAYER, View, view


def slider_range(num_layers: int) -> dict:
    """The layer slider's range for a model of ``num_layers`` LLM layers. Gradio refuses a slider whose
    minimum equals its maximum, so a one-layer model gets 0..1, fixed (every redraw clamps to layer 0)."""
    return dict(minimum=0, maximum=max(1, num_layers - 1), interactive=num_layers > 1)


@view
class LayerCaption(View):
    slot, order = "caption", 0
    depends = frozenset({LAYER, CROP, GT})
    draw_last = True

    def build(self):
        self.text = gr.Markdown(elem_id="layer_md")

    @property
    def outputs(self):
        return [self.text]

    def draw(self, s, f):
        text = vis.layer_markdown(s.trace, f.layer, s.ground_truth(f.show_gt), s.crop)
        ms = 1000 * (time.perf_counter() - f.started)
        return {self.text: text + f"\n\n<small>drawn from the trace in {ms:.0f} ms, no model call</small>"}
