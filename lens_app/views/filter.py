"""Stage 2: at the prune layer the slider shows, which tokens were kept (and why) or dropped, and
the two scores the dual-attention filter compared with its thresholds."""

from __future__ import annotations

import gradio as gr

from mustdrop import vis
from mustdrop.methods import words_of

from .base import CROP, GT, LAYER, SELECTION, View, image_output, view


@view
class FilterView(View):
    tab, tab_id, order = "2 filter", "tab_2", 30
    depends = frozenset({LAYER, SELECTION, CROP, GT})

    def build(self):
        self.status = image_output("2: kept vs dropped (and why)", "img_filter")
        with gr.Row():
            self.global_share = image_output("2: global share", "img_gs")
            self.individual_max = image_output("2: individual max", "img_im")
        self.legend = gr.HTML()

    @property
    def outputs(self):
        return [self.status, self.global_share, self.individual_max, self.legend]

    @property
    def clickable(self):
        return [self.status, self.global_share, self.individual_max]

    def draw(self, s, f):
        tr, kw = s.trace, f.kw(s)
        pl = tr.stage2_layer_for(f.layer)
        if pl is None:
            blank = vis.blank_overlay(tr, kw["base"], kw.get("opacity", vis.DEFAULT_OPACITY))
            return {self.status: blank, self.global_share: blank, self.individual_max: blank,
                    self.legend: "<div>Stage 2 did not run in this trace (no prune layers / filter off).</div>"}
        words = words_of(tr)           # the method's own names for its scores (MustDrop: the two filter scores)
        names = {k: ("2: " + k.replace("_", " ") if words.thresholds else f"2: {words.scores.get(k, 'not used')}")
                 for k in ("global_share", "individual_max")}
        return {self.status: vis.filter_overlay(tr, pl, **kw),
                self.global_share: gr.update(value=vis.heatmap_overlay(tr, "global_share", layer=pl, **kw),
                                             label=names["global_share"]),
                self.individual_max: gr.update(value=vis.heatmap_overlay(tr, "individual_max", layer=pl, **kw),
                                               label=names["individual_max"]),
                self.legend: (vis.legend_html("filter", tr, inspected=False)
                              + vis.legend_html("global_share", tr, pl, False, crop=s.crop)
                              + vis.legend_html("individual_max", tr, pl, crop=s.crop, gt=kw["gt_masks"] is not None))}
