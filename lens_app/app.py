"""The Gradio page: layout, and the events that make a Session and redraw the views from it.

Every view comes from the registry (``lens_app.views``); this module places them and derives each
event's outputs from what the views depend on. No callback here calls the model except through
``Lens.analyze``; every other one redraws from the traces.
"""

from __future__ import annotations

import functools
import logging
import traceback

import gradio as gr

from mustdrop import vis
from mustdrop.config import PRESET_NAMES
from mustdrop.images import ImageInputError, load_image
from mustdrop.trace import Trace, TraceError
from mustdrop.vis import compare as vis_compare
from mustdrop.vis.text import html_text, md_code, md_text

from . import inputs
from .engine import COMPARE_METHODS, PRESETS, Lens, compare_method, user_errors
from .examples import EXAMPLES_DIR, GroundTruthIndex, image_sha, load_examples, offer
from .session import Frame, Session, save_comparison, split_comparison
from .style import CSS, REVEAL_INSPECTOR, REVEAL_RESULTS, theme  # noqa: F401 - theme: app.theme
from .uploads import MAX_UPLOAD_BYTES, UploadGate
from .views import View, all_views
from .views.base import CROP, GT, LAYER, SELECTION
from .views.layer import slider_range
from .workdir import Workdir

MAX_FILE_SIZE = MAX_UPLOAD_BYTES          # uploads (images, traces); traces are limited to 64 MB anyway
GREY_NOTE = "drawn on grey: the trace holds no pixels; put the same image in the image box to see it under the overlays"

log = logging.getLogger("mustdrop.app")


def pair_traces(traces: list[Trace]) -> tuple[Trace, Trace | None]:
    """(MustDrop trace, vanilla trace or None) of one or two uploaded traces of the same input."""
    if len(traces) > 2:
        raise TraceError("upload one MustDrop trace, optionally with its vanilla trace (two files at most)")
    vanilla = [t.is_vanilla for t in traces]
    if len(traces) == 2 and vanilla[0] == vanilla[1]:
        raise TraceError("two traces of the same kind: upload one MustDrop trace and one vanilla trace")
    md = next((t for t, v in zip(traces, vanilla) if not v), traces[0])
    va = next((t for t, v in zip(traces, vanilla) if v), None)
    if va is not None and (va.grid != md.grid or va.meta["input"].get("input_hash") != md.meta["input"].get("input_hash")):
        raise TraceError("the vanilla trace is of another image, question or model than the MustDrop trace")
    return md, va


def build_app(lens: Lens, examples=None) -> gr.Blocks:
    examples = load_examples() if examples is None else examples
    truth = GroundTruthIndex(examples)
    offered = offer(examples, getattr(getattr(lens.runner, "processor", None), "tokenizer", None), lens.model_label)
    depth = lens.runner.num_layers if lens.runner is not None else 32   # a trace sets it when no model is loaded
    workdir = Workdir()
    gate = UploadGate([EXAMPLES_DIR, workdir.root], [e.image for e in examples])   # the files a request may name
    views: list[View] = [cls() for cls in all_views()]

    def of(name):
        return next(v for v in views if type(v).__name__ == name)

    # ------------------------------------------------------------------ drawing (no model)
    def outputs_on(change: str | None) -> list:
        """The components an event redraws: every view's on a new session (change None)."""
        return [c for v in views if change is None or change in v.depends for c in v.outputs]

    def draw(session: Session, frame: Frame, change: str | None = None) -> dict:
        out = {}
        for v in sorted((v for v in views if change is None or change in v.depends), key=lambda v: v.draw_last):
            out.update(v.draw(session, frame))
        return out

    def unchanged():
        """An event's answer that changes nothing (an empty dict would be read as one output value)."""
        return {status: gr.skip()}

    def warn(msg):
        gr.Warning(html_text(msg))  # Gradio renders toasts as (sanitised) HTML: show the message as text
        return {status: f"**Problem:** {md_text(msg)}"}

    def guarded(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except user_errors() as e:
                return warn(str(e))
            except Exception as e:  # noqa: BLE001 - never a traceback in the UI; the log has it
                log.error("internal error in %s: %s", fn.__name__, traceback.format_exc())
                return warn(f"internal error ({type(e).__name__}): {str(e)[:300]}")
        return wrapper

    def show_session(session: Session, show_gt: bool, message: str) -> dict:
        """Every view of a new session, at the layer a trace opens at, and the controls fitted to it."""
        tr = session.trace
        out = draw(session, Frame.of(session, tr.start_layer, None, show_gt))
        out.update({state: session, sel_state: None, stale_md: "",
                    layer_slider: gr.Slider(value=tr.start_layer, step=1, **slider_range(tr.num_layers)),
                    crop_in: gr.Dropdown(choices=session.crop_choices(), value=0, visible=tr.n_crops > 1),
                    status: message})
        return out

    # ------------------------------------------------------------------ callbacks
    def on_run(image, question, preset, window, merge_thr, key_rate, prune, gthr, ithr, positions, m1a, m1b, m2, m3,
               max_new, mode, temperature, top_p, seed, show_gt, compare=None, progress=gr.Progress()):
        src = gate.payload(image)
        if src is None:
            raise ImageInputError("no image given: upload, paste or choose an example image")
        inputs.require_question(question)
        custom = inputs.custom_knobs(window, merge_thr, key_rate, prune, gthr, ithr, positions, m1a, m1b, m2, m3) \
            if preset == "custom" else None
        max_new = inputs.number(max_new, "max new tokens", int)
        sampling = inputs.sampling_from(mode, temperature, top_p, seed)
        img = load_image(src)
        config = lens.config(str(preset), custom)
        progress(0.0, desc="starting")
        vanilla, trace, img, other = lens.analyze(img, question, config, max_new, sampling,
                                                  progress=lambda f, d: progress(f, desc=d), compare=compare)
        gt = truth.for_trace(trace)
        saved = workdir.save_traces(trace, vanilla)
        session = Session.of_run(trace, vanilla, img, gt, saved + save_comparison(other, saved[0]), compare=other)
        session.image_name = src if isinstance(src, str) else ""
        return show_session(session, bool(show_gt),
                            f"**Done:** vanilla and MustDrop ({md_text(trace.meta['config'].get('preset'))})"
                            f"{'' if other is None else ' and ' + md_text(other.meta['config'].get('preset'))} on "
                            f"{md_code(trace.meta['model']['id'])}" + ("" if gt is None else " · ground-truth outlines available"))

    def on_upload(uploaded, image, show_gt=True):
        paths = gate.payload(uploaded)
        if not paths:
            return unchanged()
        if not isinstance(paths, list):
            paths = [paths]
        if any(isinstance(p, bytes) for p in paths):
            raise TraceError("upload a trace file (.safetensors)")
        runs, other = split_comparison([Trace.load(p) for p in paths])
        md, va = pair_traces(runs)
        img, note = None, GREY_NOTE
        src = gate.payload(image)
        if src is not None and image_sha(src) == md.meta["input"]["image"]["sha256"]:
            img, note = load_image(src), "drawn on the matching image from the image box"
        session = Session.of_run(md, va, img, truth.for_trace(md), [str(p) for p in paths], note, compare=other)
        return show_session(session, bool(show_gt),
                            f"**Replaying** the trace of {md_code(md.meta['model']['id'])} (preset "
                            f"{md_text(md.meta['config'].get('preset'))}{', with vanilla' if va is not None else ', no vanilla trace'}"
                            f"{'' if other is None else ', compared with ' + md_text(other.meta['config'].get('preset'))})"
                            f" without the model; {note}")

    def on_layer(session, layer, sel, show_gt):
        if not session:
            return unchanged()
        return draw(session, Frame.of(session, layer, sel, show_gt), LAYER)

    def on_redraw(session, layer, sel, show_gt):
        if not session:
            return unchanged()
        return draw(session, Frame.of(session, layer, sel, show_gt), GT)

    def select(session, layer, rc, show_gt):
        out = draw(session, Frame.of(session, layer, rc, show_gt), SELECTION)
        out[sel_state] = list(rc)
        return out

    def on_select(session, layer, show_gt, evt: gr.SelectData):
        if not session:
            return warn("run an analysis or upload a trace first")
        rc = session.geometry.patch_at(evt.index[0], evt.index[1])
        return unchanged() if rc is None else select(session, layer, rc, show_gt)

    def on_inspect(session, layer, row, col, show_gt):
        if not session:
            return warn("run an analysis or upload a trace first")
        rc = (inputs.number(row, "row", int), inputs.number(col, "column", int))
        vis.patch_lifecycle(session.trace, *rc, crop=session.crop)        # validates the range, clear message
        return select(session, layer, rc, show_gt)

    def on_opacity(session, opacity, layer, sel, show_gt):
        """The category colours' opacity: redraw the overlays (also after a run or upload, so a new
        session takes the slider's value)."""
        opacity = vis.check_opacity(opacity)
        if not session or session.opacity == opacity:
            return unchanged()
        session.opacity = opacity
        out = draw(session, Frame.of(session, layer, sel, show_gt), SELECTION)
        out[state] = session
        return out

    def on_crop(session, crop, layer, show_gt):
        if not session:
            return unchanged()
        session.show_crop(crop)
        out = draw(session, Frame.of(session, layer, None, show_gt), CROP)
        out.update({state: session, sel_state: None})
        return out

    def on_slides(session, layer, show_gt):
        if not session:
            return warn("run an analysis or upload a trace first")
        out = files.export(session, Frame.of(session, layer, None, show_gt), workdir)
        out[status] = "**Done:** slides exported (PNG and PDF)"
        return out

    def stale_note(session, preset, knob_values, compare="none") -> str:
        """What a Run would change about the results shown ("" when they are of the preset, knobs and
        comparison chosen)."""
        if not session:
            return ""
        cfg = session.trace.meta["config"]
        shown = cfg.get("preset")
        shown_cmp = session.compare.meta["config"].get("method") if session.compare is not None else "none"
        wanted_cmp = compare or "none"
        same_run = preset == shown != "custom"
        if preset == shown == "custom":
            try:
                same_run = inputs.same_knobs(cfg, inputs.custom_knobs(*knob_values))
            except ValueError:
                same_run = False
        if same_run and wanted_cmp == shown_cmp:
            return ""
        now = f"preset {shown}" + ("" if shown_cmp == "none" else f" compared with {shown_cmp}")
        then = f"{preset}" + ("" if wanted_cmp == "none" else f" compared with {wanted_cmp}")
        return f"**Stale:** shown: {md_text(now)}; press **Run** for {md_text(then)}."

    def on_preset(session, preset, *knob_values_and_compare):
        """Fill the advanced panel with a named preset's knobs (the model's own defaults); say whether
        the results shown are still of the chosen preset."""
        *knob_values, compare = knob_values_and_compare
        out = {stale_md: stale_note(session, preset, knob_values, compare)}
        if preset != "custom" and lens.runner is not None:
            out.update(zip(knobs, inputs.knob_values(lens.runner.config_for(preset))))
        return out

    def on_knob(session, preset, *knob_values_and_compare):
        """An edited knob is a custom run: the preset switches to custom (which redraws the stale note)."""
        *knob_values, compare = knob_values_and_compare
        if preset != "custom":
            return {preset_in: "custom"}
        return {stale_md: stale_note(session, preset, knob_values, compare)}

    def on_compare(session, compare, preset, *knob_values):
        """The comparison choice, kept for the next Run; the results are stale when it differs."""
        return {compare_state: compare, stale_md: stale_note(session, preset, knob_values, compare)}

    def api_analyze(image, question, preset, method="none"):
        """/analyze: (image, question, preset[, method]) -> trace file, vanilla answer, MustDrop answer,
        and with a method: its trace file, its answer and the comparison (vis.compare.summary)."""
        try:
            src = gate.payload(image)
            if src is None:
                raise ImageInputError("no image given")
            if preset not in PRESET_NAMES:
                raise ValueError(f"/analyze takes a preset in {', '.join(PRESET_NAMES)}, got {preset!r}; a custom "
                                 "configuration runs in the app's advanced panel")
            config = lens.config(str(preset))
            vanilla, trace, _, other = lens.analyze(src, question, config, 16, compare=compare_method(method))
        except user_errors() as e:
            raise gr.Error(str(e)) from None
        path = trace.save(workdir.folder("api", trace) / f"mustdrop-{trace.meta['config'].get('preset')}.safetensors")
        if other is None:
            return str(path), vanilla.answer, trace.answer, None, "", None
        summary = vis_compare.summary(trace, other, trace.start_layer, all_layers=True)
        return (str(path), vanilla.answer, trace.answer, save_comparison(other, str(path))[0], other.answer, summary)

    # ------------------------------------------------------------------ layout
    model_note = ("" if lens.load_error is None else
                  f"\n\n**The model could not be loaded:** {md_text(lens.load_error)}\n\nTrace upload and replay still work.")
    slot = lambda name: [v for v in views if v.slot == name]  # noqa: E731
    with gr.Blocks(title="MustDrop Lens", delete_cache=(3600, 7200)) as demo:   # hourly: files older than 2 h
        state = gr.State(None, time_to_live=3 * 3600)      # the visitor's Session, freed after 3 h
        sel_state = gr.State(None, time_to_live=3 * 3600)  # the inspected patch [row, col]
        gr.Markdown("# MustDrop Lens\nWhat multi-stage vision token dropping "
                    "([MustDrop](https://arxiv.org/abs/2411.10803)) does to every image patch of a LLaVA model: "
                    "**1a** spatial merge · **1b** key tokens · **2** dual-attention filter · "
                    f"**3** KV trim. Model: {md_code(lens.model_label)}." + model_note)
        status = gr.Markdown("Choose an example or upload an image, ask a question, press **Run**.", elem_id="status")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                image_in = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                    elem_id="image_in", height=200)
                question_in = gr.Textbox(label="Question", value="", max_lines=3, elem_id="question_in",
                                         placeholder="choose an example, or type a question")
                preset_in = gr.Radio(PRESETS, value="64", label="Preset (average vision-token budget)",
                                     elem_id="preset_in")
                compare_in = of("CompareView").choice_input()
                compare_state = gr.State("none")      # the choice, held server-side: /run keeps its parameters
                run_btn = gr.Button("Run vanilla + MustDrop", variant="primary", elem_id="run_btn")
                if offered.rows:
                    gr.Examples(offered.rows, inputs=[image_in, question_in], label=offered.label,
                                examples_per_page=6, elem_id="examples")
                if offered.photos:
                    gr.Markdown(offered.note, elem_id="photo_note")
                    gr.Examples([[p] for p in offered.photos], inputs=[image_in], label="Photos (for a real checkpoint)",
                                elem_id="photo_examples")
                with gr.Accordion("Advanced: every MustDrop knob (used when the preset is 'custom')", open=False):
                    d = lens.defaults("64")
                    with gr.Row():
                        k_window = gr.Number(d.window, label="window (w x w)", precision=0)
                        k_merge_thr = gr.Number(d.merge_threshold, label="merge threshold (cosine)")
                        k_key_rate = gr.Number(d.key_keep_rate, label="key keep rate")
                    k_prune = gr.Textbox(", ".join(str(x) for x in d.prune_layers), label="prune layers (0-based)")
                    with gr.Row():
                        k_gthr = gr.Number(d.global_thr, label="global threshold")
                        k_ithr = gr.Number(d.individual_thr, label="individual threshold")
                    k_positions = gr.Radio(["reference", "original"], value=d.positions, label="positions")
                    with gr.Row():
                        k_1a = gr.Checkbox(True, label="1a merge")
                        k_1b = gr.Checkbox(True, label="1b key set")
                        k_2 = gr.Checkbox(True, label="2 filter")
                        k_3 = gr.Checkbox(True, label="3 KV trim")
                with gr.Accordion("Decoding", open=False):
                    max_new_in = gr.Number(16, label="max new tokens", precision=0, minimum=1, maximum=1024)
                    mode_in = gr.Radio(["greedy", "sampling"], value="greedy", label="decoding")
                    with gr.Row():
                        temp_in = gr.Number(0.7, label="temperature")
                        top_p_in = gr.Number(0.9, label="top p")
                        seed_in = gr.Number(0, label="seed", precision=0)
                for v in slot("sidebar"):
                    v.build()
            with gr.Column(scale=2, min_width=520, elem_id="results"):
                stale_md = gr.Markdown(elem_id="stale_md")
                for v in slot("top"):
                    v.build()
                with gr.Row():
                    layer_slider = gr.Slider(value=0, step=1, label="LLM layer (0-based)", elem_id="layer_slider",
                                             scale=3, **slider_range(depth))
                    crop_in = gr.Dropdown(choices=[("image", 0)], value=0, label="crop (LLaVA-NeXT: base image, tiles)",
                                          visible=False, elem_id="crop_in", scale=1)
                    show_gt = gr.Checkbox(True, label="ground-truth objects (scene-world examples; thick white = the one asked about)",
                                          elem_id="show_gt", scale=1)
                    opacity_in = gr.Slider(0, 1, value=vis.DEFAULT_OPACITY, step=0.05, label="overlay opacity",
                                           info="how strongly category colours tint the image", elem_id="opacity_in",
                                           scale=1)
                for v in slot("caption"):
                    v.build()
                with gr.Tabs(overflow_behavior="wrap"):     # every tab's button in reach on a phone
                    tabs = {}
                    for v in slot("tab"):
                        tabs.setdefault((v.tab, v.tab_id), []).append(v)
                    for (name, elem_id), members in tabs.items():
                        with gr.Tab(name, elem_id=elem_id):
                            for v in members:
                                v.build()
                for v in slot("below"):
                    v.build()
        # hidden components of the /analyze API endpoint (its presets: the named ones; no knobs)
        api_preset = gr.Radio(list(PRESET_NAMES), value="64", label="Preset (average vision-token budget)",
                              visible="hidden")
        api_trace = gr.File(visible="hidden", label="trace")
        api_vanilla = gr.Textbox(visible="hidden", label="vanilla answer")
        api_md = gr.Textbox(visible="hidden", label="MustDrop answer")
        api_method = gr.Dropdown(list(COMPARE_METHODS), value="none", label="compare with (same budget)",
                                 visible="hidden")
        api_compare_trace = gr.File(visible="hidden", label="comparison trace")
        api_compare_answer = gr.Textbox(visible="hidden", label="comparison answer")
        api_compare = gr.JSON(visible="hidden", label="comparison")
        api_btn = gr.Button(visible="hidden")

        # ------------------------------------------------------------------ wiring
        files, inspector = of("FilesView"), of("Inspector")
        knobs = [k_window, k_merge_thr, k_key_rate, k_prune, k_gthr, k_ithr, k_positions, k_1a, k_1b, k_2, k_3]
        session_outputs = outputs_on(None) + [state, sel_state, stale_md, layer_slider, crop_in, status]
        run_inputs = [image_in, question_in, preset_in] + knobs + [max_new_in, mode_in, temp_in, top_p_in, seed_in, show_gt,
                                                                   compare_state]
        redraw_inputs = [state, layer_slider, sel_state, show_gt]
        quiet = dict(api_visibility="undocumented", queue=False, show_progress="hidden")
        opacity_inputs = [state, opacity_in, layer_slider, sel_state, show_gt]
        opacity_outputs = outputs_on(SELECTION) + [state, status]
        run_btn.click(guarded(on_run), run_inputs, session_outputs, api_name="run", api_visibility="undocumented",
                      preprocess=False, concurrency_limit=1, concurrency_id="model") \
            .then(guarded(on_opacity), opacity_inputs, opacity_outputs, **quiet).then(None, js=REVEAL_RESULTS)
        files.upload.upload(guarded(on_upload), [files.upload, image_in, show_gt], session_outputs, api_name="replay",
                            api_visibility="undocumented", preprocess=False, concurrency_limit=2,
                            concurrency_id="replay") \
            .then(guarded(on_opacity), opacity_inputs, opacity_outputs, **quiet).then(None, js=REVEAL_RESULTS)
        opacity_in.change(guarded(on_opacity), opacity_inputs, opacity_outputs, trigger_mode="always_last", **quiet)
        layer_slider.change(guarded(on_layer), redraw_inputs, outputs_on(LAYER) + [status], api_name="layer",
                            trigger_mode="always_last", **quiet)
        show_gt.change(guarded(on_redraw), redraw_inputs, outputs_on(GT) + [status], **quiet)
        select_outputs = outputs_on(SELECTION) + [sel_state, status]
        for v in views:
            for im in v.clickable:
                im.select(guarded(on_select), [state, layer_slider, show_gt], select_outputs, **quiet) \
                    .then(None, js=REVEAL_INSPECTOR)
        inspector.button.click(guarded(on_inspect), [state, layer_slider, inspector.row, inspector.col, show_gt],
                               select_outputs, api_visibility="undocumented", queue=False).then(None, js=REVEAL_INSPECTOR)
        crop_in.input(guarded(on_crop), [state, crop_in, layer_slider, show_gt],
                      outputs_on(CROP) + [state, sel_state, status], **quiet)
        files.slides_button.click(guarded(on_slides), [state, layer_slider, show_gt],
                                  [files.slides, files.preview, status], api_visibility="undocumented",
                                  concurrency_limit=2)
        compare_in.change(guarded(on_compare), [state, compare_in, preset_in] + knobs, [compare_state, stale_md, status],
                          **quiet)
        preset_in.change(guarded(on_preset), [state, preset_in] + knobs + [compare_in], knobs + [stale_md, status],
                         **quiet)
        for k in knobs:
            k.input(guarded(on_knob), [state, preset_in] + knobs + [compare_in], [preset_in, stale_md, status], **quiet)
        api_btn.click(api_analyze, [image_in, question_in, api_preset, api_method],
                      [api_trace, api_vanilla, api_md, api_compare_trace, api_compare_answer, api_compare],
                      api_name="analyze", api_description="Run vanilla and MustDrop on (image, question, preset "
                      "off|192|128|64); returns the MustDrop trace file and both answers. With method (fastv, "
                      "visionzip, fastervlm, pdrop, random, pool; default none) it also runs that method at the "
                      "MustDrop run's budget and returns its trace file, its answer and the comparison (overlap "
                      "counts after the first prune layer and after every layer, budgets in both conventions).",
                      preprocess=False,
                      concurrency_limit=1, concurrency_id="model")
    gate.bind(demo)
    demo.lens = lens
    demo.workdir = workdir.root
    demo.views = views
    return demo


def launch(demo: gr.Blocks, host="127.0.0.1", port=7860, **kw):
    """Serve the app. Gradio's own banner is silenced (``quiet``): it ends with a hint to create a
    public link (setting launch's share to true), which this app never wants (no public links,
    tests/test_security.py), so the address is printed here instead."""
    demo.queue(default_concurrency_limit=1, max_size=64)
    kw.setdefault("state_session_capacity", 500)     # at most 500 visitors' view states (a few MB each) kept
    kw["css"] = CSS + kw.get("css", "")
    kw.setdefault("theme", theme())
    quiet = kw.setdefault("quiet", True)
    block = not kw.pop("prevent_thread_lock", False)
    out = demo.launch(server_name=host, server_port=port, share=False, max_file_size=MAX_FILE_SIZE,
                      show_error=False, footer_links=["api"], prevent_thread_lock=True,
                      allowed_paths=[str(EXAMPLES_DIR)] + list(kw.pop("allowed_paths", [])), **kw)
    if quiet:
        print(f"* Running on local URL:  {demo.local_url}", flush=True)
    if block:
        demo.block_thread()
    return out
