"""The page's events: which callback (handlers.App) runs on which component, with which inputs and
outputs, and the named API endpoints among them (/run, /layer; /replay is the files view's, /analyze
is api.py's). Every event's outputs are derived from what the views depend on; a view's own events are
attached by the view (View.wire)."""

from __future__ import annotations

from .style import REVEAL_INSPECTOR, REVEAL_RESULTS
from .views.base import CROP, GT, LAYER, SELECTION

QUIET = dict(api_visibility="undocumented", queue=False, show_progress="hidden")   # redraws: no queue, no API


def session_outputs(app) -> list:
    """What a new session redraws: every view, and the controls fitted to the trace."""
    p = app.page
    return app.outputs_on(None) + [p.state, p.sel_state, p.stale_md, p.layer_slider, p.crop_in, p.status]


def select_outputs(app) -> list:
    return app.outputs_on(SELECTION) + [app.page.sel_state, app.page.status]


def stale_inputs(app) -> list:
    """What the stale note compares with the session: the preset, the knobs and the views' choices."""
    p = app.page
    return [p.state, p.preset_in] + p.knobs.inputs + list(p.choices.values())


def after_new_session(app, event):
    """A new session takes the opacity slider's value, then its results scroll into view."""
    p = app.page
    opacity_inputs = [p.state, p.opacity_in, p.layer_slider, p.sel_state, p.show_gt]
    return event.then(app.guarded(app.on_opacity), opacity_inputs, app.outputs_on(SELECTION) + [p.state, p.status],
                      **QUIET).then(None, js=REVEAL_RESULTS)


def after_select(event):
    return event.then(None, js=REVEAL_INSPECTOR)


def wire(app) -> None:
    """Attach every event of the page (inside its open gr.Blocks)."""
    p, g = app.page, app.guarded
    run_inputs = ([p.image_in, p.question_in, p.preset_in] + p.knobs.inputs
                  + [p.max_new_in, p.mode_in, p.temp_in, p.top_p_in, p.seed_in, p.show_gt] + list(p.run_inputs.values()))
    after_new_session(app, p.run_btn.click(
        g(app.run_endpoint(list(p.run_inputs))), run_inputs, session_outputs(app), api_name="run",
        api_visibility="undocumented", preprocess=False, concurrency_limit=1, concurrency_id="model"))
    for v in app.views:
        v.wire(app)
    redraw_inputs = [p.state, p.layer_slider, p.sel_state, p.show_gt]
    p.opacity_in.change(g(app.on_opacity), [p.state, p.opacity_in, p.layer_slider, p.sel_state, p.show_gt],
                        app.outputs_on(SELECTION) + [p.state, p.status], trigger_mode="always_last", **QUIET)
    p.layer_slider.change(g(app.on_layer), redraw_inputs, app.outputs_on(LAYER) + [p.status], api_name="layer",
                          trigger_mode="always_last", **QUIET)
    p.show_gt.change(g(app.on_redraw), redraw_inputs, app.outputs_on(GT) + [p.status], **QUIET)
    for v in app.views:
        for im in v.clickable:
            after_select(im.select(g(app.on_select), [p.state, p.layer_slider, p.show_gt], select_outputs(app),
                                   **QUIET))
    p.crop_in.input(g(app.on_crop), [p.state, p.crop_in, p.layer_slider, p.show_gt],
                    app.outputs_on(CROP) + [p.state, p.sel_state, p.status], **QUIET)
    knobs = p.knobs.inputs
    p.preset_in.change(g(app.on_preset), stale_inputs(app), knobs + [p.stale_md, p.status], **QUIET)
    for k in knobs:
        k.input(g(app.on_knob), stale_inputs(app), [p.preset_in, p.stale_md, p.status], **QUIET)
    for t in app.tabs:
        t.wire(app)
