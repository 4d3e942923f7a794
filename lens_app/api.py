"""The /analyze API endpoint: (image, question, preset[, method]) -> trace file, answers and, with a
method, its trace, answer and the comparison. Its components are hidden; the page's other named
endpoints (/run, /replay, /layer) are the page's own events (events.py)."""

from __future__ import annotations

import gradio as gr

from mustdrop.config import PRESET_NAMES
from mustdrop.images import ImageInputError
from mustdrop.vis import compare as vis_compare

from . import inputs
from .engine import compare_method, compare_methods, user_errors
from .session import save_comparison



def description() -> str:
    """/analyze's description; its methods are the registry's (mustdrop.methods), read when the page is built."""
    return ("Run vanilla and MustDrop on (image, question, preset off|192|128|64); returns the MustDrop trace file and "
            "both answers. With method (" + ", ".join(compare_methods()[1:]) + "; default none) it also runs that "
            "method at the MustDrop run's budget and returns its trace file, its answer and the comparison (overlap "
            "counts after the first prune layer and after every layer, budgets in both conventions).")


class AnalyzeEndpoint:
    """/analyze, on the hidden components it declares (its presets: the named ones; no knobs)."""

    def __init__(self, lens, gate, workdir):
        self.lens, self.gate, self.workdir = lens, gate, workdir

    def build(self) -> None:
        self.preset = gr.Radio(list(PRESET_NAMES), value="64", label="Preset (average vision-token budget)",
                               visible="hidden")
        self.trace = gr.File(visible="hidden", label="trace")
        self.vanilla = gr.Textbox(visible="hidden", label="vanilla answer")
        self.mustdrop = gr.Textbox(visible="hidden", label="MustDrop answer")
        self.method = gr.Dropdown(list(compare_methods()), value="none", label="compare with (same budget)",
                                  visible="hidden")
        self.compare_trace = gr.File(visible="hidden", label="comparison trace")
        self.compare_answer = gr.Textbox(visible="hidden", label="comparison answer")
        self.compare = gr.JSON(visible="hidden", label="comparison")
        self.button = gr.Button(visible="hidden")

    def wire(self, image_in, question_in) -> None:
        self.button.click(self.analyze, [image_in, question_in, self.preset, self.method],
                          [self.trace, self.vanilla, self.mustdrop, self.compare_trace, self.compare_answer,
                           self.compare],
                          api_name="analyze", api_description=description(), preprocess=False,
                          concurrency_limit=1, concurrency_id="model")

    def analyze(self, image, question, preset, method="none"):
        """/analyze: (image, question, preset[, method]) -> trace file, vanilla answer, MustDrop answer,
        and with a method: its trace file, its answer and the comparison (vis.compare.summary)."""
        try:
            src = self.gate.payload(image)
            if src is None:
                raise ImageInputError("no image given")
            question = inputs.require_question(question)
            if preset == "custom":
                raise ValueError(f"/analyze takes a preset in {', '.join(PRESET_NAMES)}, got 'custom'; a custom "
                                 "configuration runs in the app's advanced panel")
            config = self.lens.config(inputs.preset_name(preset, PRESET_NAMES))
            vanilla, trace, _, other = self.lens.analyze(src, question, config, 16, compare=compare_method(method))
        except user_errors() as e:
            raise gr.Error(str(e)) from None
        path = trace.save(self.workdir.folder("api", trace) / f"mustdrop-{trace.meta['config'].get('preset')}.safetensors")
        if other is None:
            return str(path), vanilla.answer, trace.answer, None, "", None
        summary = vis_compare.summary(trace, other, trace.start_layer, all_layers=True)
        return (str(path), vanilla.answer, trace.answer, save_comparison(other, str(path))[0], other.answer, summary)

