"""The page's callbacks: make a Session (a Run, a replayed upload) and redraw the views from it.

No callback here calls the model except through ``Lens.analyze``; every other one redraws from the
traces. ``App`` holds what the events of one page share (the lens, the upload gate, the examples'
ground truth, the work folder, the views and the page's components); views reach it in their
``wire`` to attach their own events.
"""

from __future__ import annotations

import functools
import inspect
import logging
import traceback

import gradio as gr

from mustdrop import vis
from mustdrop.config import KNOB_FIELDS, knob_info
from mustdrop.images import ImageInputError, load_image
from mustdrop.trace import Trace, TraceError
from mustdrop.vis.text import html_text, md_code, md_text

from . import inputs
from .engine import PRESETS, user_errors
from .examples import image_sha
from .session import Frame, Session, pair_traces, save_comparison, split_comparison
from .stale import stale_note
from .views.base import CROP, GT, LAYER, NO_SESSION, SELECTION
from .views.layer import slider_range

GREY_NOTE = "drawn on grey: the trace holds no pixels; put the same image in the image box to see it under the overlays"
# /run's parameters, in order: the knobs by their short names (mustdrop.config.knob), then decoding;
# the views' run inputs (by role, e.g. compare) follow as keyword arguments of Lens.analyze.
RUN_PARAMS = ("image", "question", "preset", *(knob_info(k)["short"] for k in KNOB_FIELDS),
              "max_new", "mode", "temperature", "top_p", "seed", "show_gt")

log = logging.getLogger("mustdrop.app")


class App:
    """What one page's events share, and the callbacks that make and redraw a Session."""

    def __init__(self, lens, views, truth, workdir, gate):
        self.lens, self.views, self.truth, self.workdir, self.gate = lens, views, truth, workdir, gate
        self.tabs = []            # tabs that are not Session views (the Dataset tab): built and wired after the views
        self.page = None          # the components, set by layout.build_page

    # ------------------------------------------------------------------ drawing (no model)
    def outputs_on(self, change: str | None) -> list:
        """The components an event redraws: every view's on a new session (change None)."""
        return [c for v in self.views if change is None or change in v.depends for c in v.outputs]

    def draw(self, session: Session, frame: Frame, change: str | None = None) -> dict:
        out = {}
        for v in sorted((v for v in self.views if change is None or change in v.depends), key=lambda v: v.draw_last):
            out.update(v.draw(session, frame))
        return out

    def unchanged(self):
        """An event's answer that changes nothing (an empty dict would be read as one output value)."""
        return {self.page.status: gr.skip()}

    def warn(self, msg):
        gr.Warning(html_text(msg))  # Gradio renders toasts as (sanitised) HTML: show the message as text
        return {self.page.status: f"**Problem:** {md_text(msg)}"}

    def guarded(self, fn):
        """``fn`` with its user errors shown as a message and any other error logged, never a traceback."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except user_errors() as e:
                return self.warn(str(e))
            except Exception as e:  # noqa: BLE001 - never a traceback in the UI; the log has it
                log.error("internal error in %s: %s", fn.__name__, traceback.format_exc())
                return self.warn(f"internal error ({type(e).__name__}): {str(e)[:300]}")
        return wrapper

    def show_session(self, session: Session, show_gt: bool, message: str) -> dict:
        """Every view of a new session, at the layer a trace opens at, and the controls fitted to it."""
        p, tr = self.page, session.trace
        out = self.draw(session, Frame.of(session, tr.start_layer, None, show_gt))
        out.update({p.state: session, p.sel_state: None, p.stale_md: "",
                    p.layer_slider: gr.Slider(value=tr.start_layer, step=1, **slider_range(tr.num_layers)),
                    p.crop_in: gr.Dropdown(choices=session.crop_choices(), value=0, visible=tr.n_crops > 1),
                    p.status: message})
        return out

    # ------------------------------------------------------------------ a new session
    def run_endpoint(self, roles: list[str]):
        """/run's callback: the inputs in RUN_PARAMS order, then the views' run inputs (``roles``)."""
        def on_run(*args):
            n = len(RUN_PARAMS)
            return self.on_run(args[:n], dict(zip(roles, args[n:-1])), args[-1])
        P = inspect.Parameter
        on_run.__signature__ = inspect.Signature(
            [P(n, P.POSITIONAL_OR_KEYWORD) for n in RUN_PARAMS]
            + [P(r, P.POSITIONAL_OR_KEYWORD, default=None) for r in roles]
            + [P("progress", P.POSITIONAL_OR_KEYWORD, default=gr.Progress())])
        return on_run

    def on_run(self, values, extras: dict, progress):
        image, question, preset = values[:3]
        k = 3 + len(KNOB_FIELDS)
        knob_values = values[3:k]
        max_new, mode, temperature, top_p, seed, show_gt = values[k:]
        src = self.gate.payload(image)
        if src is None:
            raise ImageInputError("no image given: upload, paste or choose an example image")
        question = inputs.require_question(question)
        preset = inputs.preset_name(preset, PRESETS)
        custom = inputs.custom_knobs(*knob_values) if preset == "custom" else None
        max_new = inputs.number(max_new, "max new tokens", int)
        sampling = inputs.sampling_from(mode, temperature, top_p, seed)
        img = load_image(src, getattr(self.lens.runner, "processor", None))   # shape limits before decoding
        config = self.lens.config(str(preset), custom)
        progress(0.0, desc="starting")
        vanilla, trace, img, other = self.lens.analyze(img, question, config, max_new, sampling,
                                                       progress=lambda f, d: progress(f, desc=d), **extras)
        gt = self.truth.for_trace(trace)
        saved = self.workdir.save_traces(trace, vanilla)
        session = Session.of_run(trace, vanilla, img, gt, saved + save_comparison(other, saved[0]), compare=other)
        session.image_name = src if isinstance(src, str) else ""
        return self.show_session(session, bool(show_gt),
                                 f"**Done:** vanilla and MustDrop ({md_text(trace.meta['config'].get('preset'))})"
                                 f"{'' if other is None else ' and ' + md_text(other.meta['config'].get('preset'))} on "
                                 f"{md_code(trace.meta['model']['id'])}"
                                 + ("" if gt is None else " · ground-truth outlines available"))

    def on_upload(self, uploaded, image, show_gt=True):
        paths = self.gate.payload(uploaded)
        if not paths:
            return self.unchanged()
        if not isinstance(paths, list):
            paths = [paths]
        if any(isinstance(p, bytes) for p in paths):
            raise TraceError("upload a trace file (.safetensors)")
        runs, other = split_comparison([Trace.load(p) for p in paths])
        md, va = pair_traces(runs)
        img, note = None, GREY_NOTE
        src = self.gate.payload(image)
        if src is not None and image_sha(src) == md.meta["input"]["image"]["sha256"]:
            img, note = load_image(src), "drawn on the matching image from the image box"
        session = Session.of_run(md, va, img, self.truth.for_trace(md), [str(p) for p in paths], note, compare=other)
        return self.show_session(session, bool(show_gt),
                                 f"**Replaying** the trace of {md_code(md.meta['model']['id'])} (preset "
                                 f"{md_text(md.meta['config'].get('preset'))}"
                                 f"{', with vanilla' if va is not None else ', no vanilla trace'}"
                                 f"{'' if other is None else ', compared with ' + md_text(other.meta['config'].get('preset'))})"
                                 f" without the model; {note}")

    # ------------------------------------------------------------------ redraws of the session shown
    def on_layer(self, session, layer, sel, show_gt):
        if not session:
            return self.unchanged()
        return self.draw(session, Frame.of(session, layer, sel, show_gt), LAYER)

    def on_redraw(self, session, layer, sel, show_gt):
        if not session:
            return self.unchanged()
        return self.draw(session, Frame.of(session, layer, sel, show_gt), GT)

    def select(self, session, layer, rc, show_gt):
        """Inspect patch ``rc``: redraw what shows the selection."""
        out = self.draw(session, Frame.of(session, layer, rc, show_gt), SELECTION)
        out[self.page.sel_state] = list(rc)
        return out

    def on_select(self, session, layer, show_gt, evt: gr.SelectData):
        if not session:
            return self.warn(NO_SESSION)
        rc = session.geometry.patch_at(evt.index[0], evt.index[1])
        return self.unchanged() if rc is None else self.select(session, layer, rc, show_gt)

    def on_opacity(self, session, opacity, layer, sel, show_gt):
        """The category colours' opacity: redraw the overlays (also after a run or upload, so a new
        session takes the slider's value)."""
        opacity = vis.check_opacity(opacity)
        if not session or session.opacity == opacity:
            return self.unchanged()
        session.opacity = opacity
        out = self.draw(session, Frame.of(session, layer, sel, show_gt), SELECTION)
        out[self.page.state] = session
        return out

    def on_crop(self, session, crop, layer, show_gt):
        if not session:
            return self.unchanged()
        session.show_crop(crop)
        out = self.draw(session, Frame.of(session, layer, None, show_gt), CROP)
        out.update({self.page.state: session, self.page.sel_state: None})
        return out

    # ------------------------------------------------------------------ the run inputs (no redraw)
    def stale(self, session, preset, values) -> str:
        """The stale note for the inputs of a stale event: the knobs (KNOB_FIELDS order), then the
        views' choices by role (page.choices)."""
        knob_values, chosen = values[:len(KNOB_FIELDS)], dict(zip(self.page.choices, values[len(KNOB_FIELDS):]))
        return stale_note(session, preset, knob_values, chosen.get("compare", "none"))

    def on_preset(self, session, preset, *values):
        """Fill the advanced panel with a named preset's knobs (the model's own defaults); say whether
        the results shown are still of the chosen preset."""
        p = self.page
        out = {p.stale_md: self.stale(session, preset, values)}
        if preset != "custom" and self.lens.runner is not None:
            out.update(p.knobs.fill(self.lens.runner.config_for(preset)))
        return out

    def on_knob(self, session, preset, *values):
        """An edited knob is a custom run: the preset switches to custom (which redraws the stale note)."""
        p = self.page
        if preset != "custom":
            return {p.preset_in: "custom"}
        return {p.stale_md: self.stale(session, preset, values)}
