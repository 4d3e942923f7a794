"""Stage 3: which patches the LLM layer on the slider still holds in its KV cache, and the cache's
bytes per layer."""

from __future__ import annotations

import gradio as gr

from mustdrop import vis

from .base import CROP, GT, LAYER, SELECTION, View, image_output, view

TAB, TAB_ID = "3 KV cache", "tab_3"


@view
class KVCacheView(View):
    tab, tab_id, order = TAB, TAB_ID, 40
    depends = frozenset({LAYER, SELECTION, CROP, GT})

    def build(self):
        self.image = image_output("3: patches in this layer's KV cache", "img_kv")
        self.legend = gr.HTML()

    @property
    def outputs(self):
        return [self.image, self.legend]

    @property
    def clickable(self):
        return [self.image]

    def draw(self, s, f):
        kw = f.kw(s)
        return {self.image: vis.kv_overlay(s.trace, f.layer, **kw),
                self.legend: vis.legend_html("kv", s.trace, gt=kw["gt_masks"] is not None)}


@view
class KVBytesView(View):
    tab, tab_id, order = TAB, TAB_ID, 41

    def build(self):
        self.plot = gr.Plot(label="KV bytes per layer")

    @property
    def outputs(self):
        return [self.plot]

    def draw(self, s, f):
        return {self.plot: vis.kv_bytes_figure(s.trace, s.vanilla)}
