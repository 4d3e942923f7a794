"""The advanced panel: one input per MustDropConfig knob, generated from the fields' metadata
(``mustdrop.config.knob``: label, row, choices), so a knob added to the config appears in the panel
(and in /run, see handlers.RUN_PARAMS) without an edit to the app."""

from __future__ import annotations

from itertools import groupby

import gradio as gr

from mustdrop.config import KNOB_FIELDS, MustDropConfig, knob_info

from . import inputs

TITLE = "Advanced: every MustDrop knob (used when the preset is 'custom')"


def knob_input(key: str, value):
    """The input of one knob, by the kind of its value: a switch, a whole number, a number, a list of
    layers (text), or one of its choices."""
    info = knob_info(key)
    if info["choices"] is not None:
        return gr.Radio(list(info["choices"]), value=value, label=info["label"])
    if isinstance(value, bool):
        return gr.Checkbox(value, label=info["label"])
    if isinstance(value, int):
        return gr.Number(value, label=info["label"], precision=0)
    if isinstance(value, float):
        return gr.Number(value, label=info["label"])
    return gr.Textbox(value, label=info["label"])


class KnobPanel:
    """The accordion of knobs, filled with a preset's values (the model's defaults)."""

    def __init__(self, defaults: MustDropConfig):
        self.defaults = defaults
        self.inputs: list = []

    def build(self) -> list:
        """Build the panel (knobs of one metadata row side by side); the inputs in KNOB_FIELDS order."""
        values = dict(zip(KNOB_FIELDS, inputs.knob_values(self.defaults)))
        with gr.Accordion(TITLE, open=False):
            for row, keys in groupby(KNOB_FIELDS, key=lambda k: knob_info(k)["row"]):
                if row is None:
                    self.inputs += [knob_input(k, values[k]) for k in keys]
                    continue
                with gr.Row():
                    self.inputs += [knob_input(k, values[k]) for k in keys]
        return self.inputs

    def fill(self, config: MustDropConfig) -> dict:
        """{input: value} showing a config's knobs."""
        return dict(zip(self.inputs, inputs.knob_values(config)))
