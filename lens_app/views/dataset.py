"""The Dataset tab: a run folder (many samples x configs) read as a whole, and any of its rows opened
in the per-image views.

Not a registered View: it draws from a run (mustdrop.dataset.TraceSet), not from the Session the
other views share, and it makes that Session when a row is clicked (``wire`` sends the click to the
same outputs a replay has; app.py places the tab after the views' tabs). The runs offered are the
folders under ``--runs DIR`` by name; the browser names a folder from that list, never a path. A run can also be uploaded as a zip, which
is checked member by member (mustdrop.dataset.archive) and unpacked inside the app's work folder.
Nothing here calls the model: every redraw reads the run's index and traces.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import numpy as np

from mustdrop import vis
from mustdrop.dataset import RunError, TraceSet
from mustdrop.dataset import aggregate as A
from mustdrop.dataset import figures as F
from mustdrop.dataset.archive import unpack_run
from mustdrop.trace import TraceError
from mustdrop.vis import compare as vis_compare
from mustdrop.vis.text import md_text, md_value

ALL = "all"
VERDICTS = ("all", "lost", "gained", "wrong", "right")
TABLE_COLUMNS = ["id", "config", "qtype", "question", "answer", "prediction", "correct", "lost", "gained", "recall",
                 "eq_tokens_authors", "eq_tokens_compute", "flops_ratio_image", "kv_ratio"]
MAX_SHOWN = 2000
MAX_RUNS_LISTED = 500
OPEN_RUNS = 8                 # TraceSets kept open on the server (LRU)


def run_folders(root: Path | None) -> dict[str, Path]:
    """{name: folder} of the runs under ``root`` (a folder with run.json, summary.jsonl or
    samples.rank*.jsonl; lmms-eval's OUTPUT/mustdrop listed as OUTPUT/mustdrop)."""
    if root is None or not Path(root).is_dir():
        return {}
    out = {}
    for d in sorted(Path(root).iterdir()):
        for cand in (d, d / "mustdrop"):
            if cand.is_dir() and ((cand / "run.json").is_file() or (cand / "summary.jsonl").is_file()
                                  or any(cand.glob("samples.rank*.jsonl"))):
                out[str(cand.relative_to(root))] = cand
                break
        if len(out) >= MAX_RUNS_LISTED:
            break
    return out


_DRAWING = threading.Lock()      # pyplot (and mathtext's parser) are not thread-safe; gradio calls from workers


def figure_array(make, *args) -> np.ndarray:
    """Draw ``make(*args)`` (a figure function of mustdrop.dataset.figures) as an RGB array."""
    import matplotlib.pyplot as plt

    with _DRAWING:
        fig = make(*args)
        fig.canvas.draw()
        arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
    return arr


class DatasetTab:
    """The tab: built by the layout after the views' tabs, its events attached by ``wire``."""

    tab, tab_id = "Dataset", "tab_dataset"

    def __init__(self, runs_dir, workdir):
        import matplotlib

        matplotlib.use("Agg")
        self.runs_dir = None if runs_dir is None else Path(runs_dir)
        self.workdir = workdir
        self._open: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ runs
    def run_of(self, key) -> TraceSet:
        """The open run of a key the server gave out ("runs:NAME" or "upload:FOLDER")."""
        if not isinstance(key, str) or ":" not in key:
            raise RunError("open a run first: choose one under --runs or upload a zipped run folder")
        with self._lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
        kind, name = key.split(":", 1)
        if kind == "runs":
            folders = run_folders(self.runs_dir)
            if name not in folders:
                raise RunError(f"no run named {name!r} under the app's --runs folder")
            path = folders[name]
        elif kind == "upload":
            path = self.workdir.root / name
            if "/" in name or not name.startswith("dataset-") or not path.is_dir():
                raise RunError("that uploaded run is no longer on the server; upload it again")
        else:
            raise RunError("unknown run")
        ts = TraceSet.open(path)
        with self._lock:
            self._open[key] = ts
            while len(self._open) > OPEN_RUNS:
                self._open.popitem(last=False)
        return ts

    def upload(self, src) -> str:
        """Unpack a zipped run (``src``: the upload's path, already passed through the app's UploadGate)
        into a new folder of the work folder and open it; the key of the open run."""
        if not src or not isinstance(src, (str, Path)):
            raise RunError("upload a zip of a run folder")
        into = self.workdir.root / f"dataset-{int(time.time() * 1000) % 10 ** 10}"
        ts = unpack_run(src, into)
        key = f"upload:{into.name}"
        with self._lock:
            self._open[key] = ts
        return key

    # ------------------------------------------------------------------ layout
    def wire(self, app) -> None:
        """The tab's events: open a run, filter its table, open a row in the per-image tabs (no model
        call; a row opens as a new Session, with the outputs and follow-ups of a replay)."""
        from ..events import QUIET, after_new_session, session_outputs

        p, g = app.page, app.guarded

        def on_dataset_row(key, a, b, show_gt, evt: gr.SelectData):
            session, what = self.sample_session(key, evt.row_value, a, b)
            return app.show_session(session, bool(show_gt), f"**Opened** {md_text(what)}") \
                | {p.tabs: gr.Tabs(selected="tab_2")}

        outputs = self.run_outputs + [p.status]
        self.run_in.input(g(lambda name: self.show_run(f"runs:{name}")), [self.run_in], outputs, **QUIET)
        self.zip_in.upload(g(lambda f: self.show_run(self.upload(app.gate.payload(f)))), [self.zip_in], outputs,
                           api_visibility="undocumented", preprocess=False, concurrency_limit=1)
        for c in self.filters[1:]:
            c.input(g(lambda *v: {self.table: self.rows(*v)}), self.filters, [self.table, p.status], **QUIET)
        self.maps_cfg.input(g(self.show_maps), [self.state, self.maps_cfg], self.maps_outputs + [p.status], **QUIET)
        after_new_session(app, self.table.select(g(on_dataset_row), [self.state, self.cmp_a, self.cmp_b, p.show_gt],
                                                 session_outputs(app) + [p.tabs], **QUIET))

    def build(self):
        names = list(run_folders(self.runs_dir))
        self.state = gr.State(None, time_to_live=3 * 3600)
        with gr.Row():
            self.run_in = gr.Dropdown(names, value=None, label="run folder (under --runs)", elem_id="ds_run",
                                      allow_custom_value=False, scale=2)
            self.zip_in = gr.File(label="or upload a run folder as a zip", file_types=[".zip"], elem_id="ds_zip",
                                  scale=1, height=120)
        self.info = gr.Markdown("Open a run: a folder written by `python -m analysis.batch`, "
                                "`analysis.sweep compare` or the lmms-eval model.", elem_id="ds_info")
        self.summary = gr.Dataframe(label="configs (lost: vanilla right, this config wrong; gained: the reverse)",
                                    interactive=False, elem_id="ds_summary")
        with gr.Row():
            self.config_f = gr.Dropdown([ALL], value=ALL, label="config", elem_id="ds_config", scale=1)
            self.verdict_f = gr.Radio(list(VERDICTS), value="all", label="answers", elem_id="ds_verdict", scale=2)
            self.qtype_f = gr.Dropdown([ALL], value=ALL, label="question type", elem_id="ds_qtype", scale=1)
            self.search = gr.Textbox(label="id / question contains", elem_id="ds_search", scale=1)
        with gr.Row():
            self.cmp_a = gr.Dropdown([], label="method A", elem_id="ds_cmp_a")
            self.cmp_b = gr.Dropdown([], label="method B (the Compare tab's other method)", elem_id="ds_cmp_b")
            self.disagree = gr.Checkbox(False, label="only samples where A and B answer differently",
                                        elem_id="ds_disagree")
        self.table = gr.Dataframe(label="samples (click a row: it opens in every tab above, from its traces)",
                                  interactive=False, elem_id="ds_table", max_height=420)
        self.maps_cfg = gr.Dropdown([], label="maps of config", elem_id="ds_maps_cfg")
        self.maps = gr.Image(label="how often each patch is merged / key / dropped / kept / trimmed", format="png",
                             interactive=False, elem_id="ds_maps")
        with gr.Row():
            self.survival = gr.Image(label="survival: vision tokens per LLM layer", format="png", interactive=False,
                                     elem_id="ds_survival")
            self.bias = gr.Image(label="positional bias", format="png", interactive=False, elem_id="ds_bias")
        self.attribution_md = gr.Markdown(elem_id="ds_attr_md")
        self.attribution = gr.Dataframe(label="failure attribution of the maps' config (lost answers with masks)",
                                        interactive=False, elem_id="ds_attr")

    @property
    def filters(self):
        return [self.state, self.config_f, self.verdict_f, self.qtype_f, self.search, self.cmp_a, self.cmp_b,
                self.disagree]

    @property
    def run_outputs(self):
        return [self.state, self.info, self.summary, self.config_f, self.qtype_f, self.cmp_a, self.cmp_b, self.table,
                self.maps_cfg, self.maps, self.survival, self.bias, self.attribution_md, self.attribution]

    @property
    def maps_outputs(self):
        return [self.maps, self.attribution_md, self.attribution]

    # ------------------------------------------------------------------ drawing
    def show_run(self, key: str) -> dict:
        ts = self.run_of(key)
        summ = A.config_summary(ts)
        sdf = _frame([dict(config=c, **{k: v[k] for k in ("method", "n_samples", "accuracy", "lost", "gained",
                                                            "eq_tokens_authors", "eq_tokens_compute", "kv_ratio")})
                      for c, v in summ.items()])
        pruned = [c for c in ts.configs if c != ts.vanilla] or ts.configs
        qtypes = sorted({str(q) for q in ts.rows["qtype"].dropna()})
        a = pruned[0] if pruned else None
        b = pruned[1] if len(pruned) > 1 else (ts.vanilla or a)
        note = (f"**Run** {md_text(ts.root.name)} ({md_text(ts.kind)}): {md_value(len(ts.rows))} rows, "
                f"{md_value(len(ts.configs))} configs, model {md_text(ts.settings.get('model') or '?')}"
                + (f"; {md_value(len(ts.problems))} trace(s) left out (they do not validate)" if ts.problems else ""))
        out = {self.state: key, self.info: note, self.summary: sdf,
               self.config_f: gr.Dropdown([ALL] + ts.configs, value=ALL),
               self.qtype_f: gr.Dropdown([ALL] + qtypes, value=ALL),
               self.cmp_a: gr.Dropdown(ts.configs, value=a), self.cmp_b: gr.Dropdown(ts.configs, value=b),
               self.table: self.rows(key, ALL, "all", ALL, "", a, b, False),
               self.maps_cfg: gr.Dropdown(ts.configs, value=a),
               self.survival: figure_array(F.survival_figure, ts), self.bias: figure_array(F.bias_figure, ts)}
        out.update(self.show_maps(key, a))
        return out

    def rows(self, key, config, verdict, qtype, search, a, b, disagree):
        """The sample table after the filters (first MAX_SHOWN rows)."""
        ts = self.run_of(key)
        df = A.sample_table(ts)
        if config and config != ALL:
            df = df[df["config"] == config]
        if verdict == "lost":
            df = df[df["lost"]]
        elif verdict == "gained":
            df = df[df["gained"]]
        elif verdict in ("wrong", "right"):
            df = df[df["correct"] == (1.0 if verdict == "right" else 0.0)]
        if qtype and qtype != ALL:
            df = df[df["qtype"] == qtype]
        if search:
            s = str(search).lower()[:200]
            df = df[df["id"].str.lower().str.contains(s, regex=False)
                    | df["question"].fillna("").str.lower().str.contains(s, regex=False)]
        if disagree and a and b:
            d = A.disagreements(ts, a, b)
            df = df[df["id"].isin(set(d["id"])) & df["config"].isin([a, b])]
        return df[TABLE_COLUMNS].head(MAX_SHOWN).reset_index(drop=True)

    def show_maps(self, key, config) -> dict:
        ts = self.run_of(key)
        if config not in ts.configs:
            return {self.maps: None, self.attribution_md: "", self.attribution: None}
        t = A.attribution_table(ts, config)
        lines = A.attribution_sentences(ts, config)
        return {self.maps: figure_array(F.maps_figure, ts, config),
                self.attribution_md: md_text("; ".join(lines) or "no lost answers with object masks"),
                self.attribution: t}

    # ------------------------------------------------------------------ a row -> the per-image views
    def sample_session(self, key, row, a, b):
        """(Session, what was opened in plain text: the caller escapes it) of a clicked row: its trace, the vanilla trace, the other of methods A / B
        as the Compare tab's comparison, the sample's image (when its pixels match) and masks."""
        from ..session import Session, save_comparison

        ts = self.run_of(key)
        sid, cfg = _row_key(row)
        t = ts.trace(sid, cfg)
        other_cfg = b if cfg != b else a
        other = None
        if other_cfg and other_cfg != cfg and other_cfg != ts.vanilla:
            try:
                other = ts.trace(sid, other_cfg)
            except TraceError:
                other = None
        if other is not None and vis_compare.is_baseline(t) and not vis_compare.is_baseline(other):
            t, other = other, t                   # the Compare tab shows a MustDrop run against a baseline
        if other is not None and not vis_compare.is_baseline(other):
            other = None
        vanilla = None
        if ts.vanilla and ts.vanilla != cfg:
            try:
                vanilla = ts.trace(sid, ts.vanilla)
            except TraceError:
                vanilla = None
        image = ts.image(sid, t)
        gt = None
        scene = ts.scene(sid) if image is not None else None
        if scene is not None:
            s, targets = scene
            gt = vis.GroundTruth(np.stack([o.patch_mask for o in s.objects]), targets)
        note = "drawn on the sample's image" if image is not None else "drawn on grey (the run does not hold this image)"
        saved = self.workdir.save_traces(t, vanilla)
        session = Session.of_run(t, vanilla, image, gt, saved + save_comparison(other, saved[0]), note, compare=other)
        what = (f"sample {sid} of run {ts.root.name}: {t.meta['config'].get('preset')}"
                + ("" if other is None else f" compared with {other.meta['config'].get('preset')}")
                + f", from its traces (no model call); {note}")
        return session, what


def _row_key(row) -> tuple[str, str]:
    """(id, config) of a clicked table row (its first two cells)."""
    if isinstance(row, dict):
        row = [row.get("id"), row.get("config")]
    if not isinstance(row, (list, tuple)) or len(row) < 2:
        raise RunError("click a row of the sample table")
    return str(row[0]), str(row[1])


def _frame(recs):
    import pandas as pd

    return pd.DataFrame(recs)
