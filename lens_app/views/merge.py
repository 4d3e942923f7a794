"""Stage 1a: which patches were merged into one token, and each window's similarity."""

from __future__ import annotations

import gradio as gr

from mustdrop import vis

from .base import CROP, GT, SELECTION, View, image_output, view


@view
class MergeView(View):
    tab, tab_id, order = "1a merge", "tab_1a", 10
    depends = frozenset({SELECTION, CROP, GT})

    def build(self):
        with gr.Row():
            self.groups = image_output("1a: merge groups", "img_merge")
            self.similarity = image_output("1a: window similarity", "img_sim")
        self.legend = gr.HTML()

    @property
    def outputs(self):
        return [self.groups, self.similarity, self.legend]

    @property
    def clickable(self):
        return [self.groups, self.similarity]

    def draw(self, s, f):
        tr, kw = s.trace, f.kw(s)
        return {self.groups: vis.merge_overlay(tr, **kw),
                self.similarity: vis.heatmap_overlay(tr, "similarity", **kw),
                self.legend: vis.legend_html("merge", tr, inspected=False)
                + vis.legend_html("similarity", tr, crop=s.crop, gt=kw["gt_masks"] is not None)}
