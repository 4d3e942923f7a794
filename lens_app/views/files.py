"""Trace files to download, traces to upload and replay, the slide export."""

from __future__ import annotations

import gradio as gr

from mustdrop import vis

from .base import View, view


@view
class FilesView(View):
    slot, order = "sidebar", 0

    def build(self):
        with gr.Accordion("Trace files and slides", open=True):
            self.downloads = gr.File(label="Download traces (.safetensors: JSON + arrays, one file per run)",
                                     file_count="multiple", interactive=False, elem_id="trace_files")
            self.upload = gr.File(label="Upload trace(s) to replay without a model (MustDrop, optional vanilla)",
                                  file_count="multiple", file_types=[".safetensors"], elem_id="trace_upload")
            self.slides_button = gr.Button("Export slides (PNG + PDF)", elem_id="slides_btn")
            self.slides = gr.File(label="Slides", file_count="multiple", interactive=False, elem_id="slides_files")
            self.preview = gr.Image(label="Slide preview", interactive=False, format="png", visible=True,
                                    elem_id="slides_img", height=200)

    @property
    def outputs(self):
        return [self.downloads]

    def draw(self, s, f):
        return {self.downloads: s.files}

    def export(self, s, f, workdir) -> dict:
        """The slide of the crop and layer shown, as PNG + PDF files and a preview."""
        view = s.views[s.crop] if s.views else None
        png, pdf = vis.save_slides(s.trace, workdir.folder("slides", s.trace), vanilla=s.vanilla, layer=f.layer,
                                   gt_masks=s.ground_truth(f.show_gt), view=view, crop=s.crop,
                                   compare=s.compare, opacity=s.opacity, image_name=s.image_name or None)
        return {self.slides: [str(png), str(pdf)], self.preview: str(png)}
