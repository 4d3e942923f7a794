"""Whether the results shown are still those of the preset, knobs and comparison the visitor has
chosen: a note above the results when a Run would change them (the page never reruns by itself)."""

from __future__ import annotations

from mustdrop.vis.text import md_text

from . import inputs


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
