"""Stage 1b: the key score of every patch, the key token set outlined."""

from __future__ import annotations

import gradio as gr

from mustdrop import vis

from .base import CROP, GT, SELECTION, View, image_output, view


@view
class KeySetView(View):
    tab, tab_id, order = "1b key set", "tab_1b", 20
    depends = frozenset({SELECTION, CROP, GT})

    def build(self):
        self.image = image_output("1b: key score, key tokens outlined", "img_key")
        self.legend = gr.HTML()

    @property
    def outputs(self):
        return [self.image, self.legend]

    @property
    def clickable(self):
        return [self.image]

    def draw(self, s, f):
        return {self.image: vis.key_overlay(s.trace, **f.kw(s)),
                self.legend: vis.legend_html("key_score", s.trace, crop=s.crop,
                                             gt=s.ground_truth(f.show_gt) is not None)}
