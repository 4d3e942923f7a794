"""The Gradio page, as wiring: build_app puts together the layout (layout.py, the views placing
themselves by slot), the knob panel generated from the config's fields (knobs.py), the callbacks
(handlers.py), the events (events.py, and each view's own), the stale-results note (stale.py), the
/analyze endpoint (api.py) and the look (style.py); launch serves it.

Every view comes from the registry (``lens_app.views``); nothing here knows a view by name.
"""

from __future__ import annotations

import gradio as gr

from . import events
from .api import AnalyzeEndpoint
from .engine import Lens
from .examples import EXAMPLES_DIR, GroundTruthIndex, load_examples, offer
from .handlers import GREY_NOTE, App  # noqa: F401 - GREY_NOTE: the replay note, named here before
from .layout import build_page
from .session import pair_traces  # noqa: F401 - its home before the split
from .style import CSS, theme
from .uploads import MAX_UPLOAD_BYTES, UploadGate
from .views import all_views
from .views.dataset import DatasetTab
from .workdir import Workdir

MAX_FILE_SIZE = MAX_UPLOAD_BYTES          # uploads (images, traces); traces are limited to 64 MB anyway


def build_app(lens: Lens, examples=None, runs_dir=None) -> gr.Blocks:
    examples = load_examples() if examples is None else examples
    offered = offer(examples, getattr(getattr(lens.runner, "processor", None), "tokenizer", None), lens.model_label)
    depth = lens.runner.num_layers if lens.runner is not None else 32   # a trace sets it when no model is loaded
    workdir = Workdir()
    gate = UploadGate([EXAMPLES_DIR, workdir.root], [e.image for e in examples])   # the files a request may name
    app = App(lens, [cls() for cls in all_views()], GroundTruthIndex(examples), workdir, gate)
    app.tabs = [DatasetTab(runs_dir, workdir)]      # tabs of their own (not Session views): placed after the views' tabs
    api = AnalyzeEndpoint(lens, gate, workdir)
    with gr.Blocks(title="MustDrop Lens", delete_cache=(3600, 7200)) as demo:   # hourly: files older than 2 h
        app.page = build_page(lens, app.views, offered, depth, app.tabs)
        api.build()
        events.wire(app)
        api.wire(app.page.image_in, app.page.question_in)
    gate.bind(demo)
    demo.lens = lens
    demo.workdir = workdir.root
    demo.views = app.views
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
