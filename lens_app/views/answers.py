"""The question and both answers side by side, tokens from the first divergence on highlighted (in
the palette's neutral grey, a colour no overlay uses), special tokens such as ``</s>`` left out of
the answer boxes, each token's probability under the run that chose it."""

from __future__ import annotations

import gradio as gr

from mustdrop import vis
from mustdrop.methods import words_of
from mustdrop.vis.text import md_text

from .base import View, view


@view
class AnswersView(View):
    slot, order = "top", 0

    def build(self):
        self.question = gr.Markdown(elem_id="q_md")
        with gr.Row():
            kw = dict(color_map={"differs": vis.css(vis.ANSWER_DIFFERS)}, show_inline_category=False,
                      show_legend=False)
            self.vanilla = gr.HighlightedText(label="Vanilla answer", elem_id="ans_vanilla", **kw)
            self.mustdrop = gr.HighlightedText(label="MustDrop answer", elem_id="ans_md", **kw)
        self.diff = gr.Markdown(elem_id="diff_md")
        gr.Markdown("<small>Grey background: the answer's tokens from the first one that differs between the "
                    "two runs on.</small>")
        with gr.Accordion("Each token's probability (under the run that chose it)", open=False):
            self.probs = gr.Markdown()

    @property
    def outputs(self):
        return [self.question, self.vanilla, self.mustdrop, self.diff, self.probs]

    def draw(self, s, f):
        tr, va = s.trace, s.vanilla
        d = vis.answer_diff(va, tr)
        return {self.question: f"**Question:** {md_text(tr.meta['input']['question'])}\n\n"
                               f"**Vanilla:** {md_text(va.answer) if va is not None else '–'}  \n"
                               f"**{md_text(words_of(tr).label)} ({md_text(tr.meta['config'].get('preset'))}):** {md_text(tr.answer)}",
                self.vanilla: d["vanilla"], self.mustdrop: d["mustdrop"], self.diff: d["text"],
                self.probs: d["table"]}
