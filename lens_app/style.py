"""The page's look: Gradio's theme with neutral accents, the CSS for narrow screens and the example
thumbnails, and the scripts that scroll what an event drew into view."""

from __future__ import annotations

import gradio as gr


def theme():
    """Gradio's default look with its orange accent (buttons, sliders, checkboxes, the active tab)
    replaced by neutral greys: every hue on the page belongs to the palette's meanings
    (mustdrop/vis/palette.py), and orange would read as 'dropped'."""
    return gr.themes.Default(primary_hue="neutral", secondary_hue="neutral")


# Narrow screens: table cells wrap between words only (a wide table scrolls sideways instead of
# breaking "prune" into "pru / ne"), a checkbox in a row takes a new line rather than clip its label
# (gradio gives a checkbox in a form no minimum width), and file names wrap instead of shrinking to
# "m….safetensors". Small example thumbnails and a one-row preset choice bring the examples above the
# fold of a 1440 x 900 window.
CSS = """
.gradio-container .prose table { display: block; width: max-content; max-width: 100%; overflow-x: auto; word-break: normal; }
.gradio-container .prose table th, .gradio-container .prose table td { word-break: normal; overflow-wrap: normal; hyphens: none; }
#examples td .container.table { width: var(--size-12); height: var(--size-12); }
#preset_in .wrap { gap: var(--size-1); }
#show_gt { min-width: min(200px, 100%) !important; }
.form > .block:has(> label.checkbox-container):not(#show_gt) { min-width: fit-content !important; }
#preset_in label { padding: var(--size-1) var(--size-2); }
.file-preview td.filename { flex-wrap: wrap; min-width: 0; }
.file-preview td.filename .stem { white-space: normal; overflow: visible; overflow-wrap: anywhere; }
"""


# JS run after an event: scroll what it drew into view unless the page already shows it. The results
# column after Run or a replay (its top in the upper half of the window is enough; on a phone it is far
# below the Run button), or the status line when the event reported a problem; the patch inspector after
# a click on an overlay, aligned by its nearest edge so the overlay stays in view as far as the two fit.
_REVEAL = """() => { setTimeout(() => {
  const status = document.querySelector('#status');
  const e = document.querySelector(%s);
  if (!e) return;
  const r = e.getBoundingClientRect(), h = window.innerHeight;
  let dy = 0;
  %s
  if (dy) window.scrollBy({top: dy, behavior: 'instant'});
}, 150); }"""
REVEAL_RESULTS = _REVEAL % ("status && status.innerText.includes('Problem:') ? '#status' : '#results'",
                            "if (r.top < 0 || r.top > h / 2) dy = r.top - 8;")
REVEAL_INSPECTOR = _REVEAL % ("'#inspector'", "if (r.top < 0 || r.bottom > h) "
                              "dy = (r.top > 0 && r.height <= h - 16) ? r.bottom - h + 8 : r.top - 8;")
