"""Trace files to download, traces to upload and replay (the /replay endpoint), the slide export."""

from __future__ import annotations

import gradio as gr

from mustdrop import vis

from ..session import Frame
from .base import NO_SESSION, View, view


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

    def wire(self, app):
        from ..events import after_new_session, session_outputs

        p = app.page
        after_new_session(app, self.upload.upload(
            app.guarded(app.on_upload), [self.upload, p.image_in, p.show_gt], session_outputs(app), api_name="replay",
            api_visibility="undocumented", preprocess=False, concurrency_limit=2, concurrency_id="replay"))

        def on_slides(session, layer, show_gt):
            if not session:
                return app.warn(NO_SESSION)
            out = self.export(session, Frame.of(session, layer, None, show_gt), app.workdir)
            out[p.status] = "**Done:** slides exported (PNG and PDF)"
            return out

        self.slides_button.click(app.guarded(on_slides), [p.state, p.layer_slider, p.show_gt],
                                 [self.slides, self.preview, p.status], api_visibility="undocumented",
                                 concurrency_limit=2)

    def export(self, s, f, workdir) -> dict:
        """The slide of the crop and layer shown, as PNG + PDF files and a preview."""
        view = s.views[s.crop] if s.views else None
        png, pdf = vis.save_slides(s.trace, workdir.folder("slides", s.trace), vanilla=s.vanilla, layer=f.layer,
                                   gt_masks=s.ground_truth(f.show_gt), view=view, crop=s.crop,
                                   compare=s.compare, opacity=s.opacity, image_name=s.image_name or None)
        return {self.slides: [str(png), str(pdf)], self.preview: str(png)}
