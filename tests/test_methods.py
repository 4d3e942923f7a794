"""Methods as plug-ins: one registry that every list reads; a researcher's file (examples/methods/,
copied outside the project) runs in the CLI, the app's Compare choice and analysis.sweep compare and
is explained in its own words everywhere; an installed entry point registers too; a plug-in with a bug
is refused with a message naming it and the fault, with no hook left attached."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import half_textured_image
from mustdrop import methods, stages
from mustdrop.config import MustDropConfig
from mustdrop.trace import Trace

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "methods" / "last_token_topk.py"
QUESTION = "what colour is the square?"
BUILTINS = ("mustdrop", "fastv", "visionzip", "fastervlm", "pdrop", "random", "pool")


def cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mustdrop", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=600)


@pytest.fixture(scope="module")
def plugin_file(tmp_path_factory):
    """The shipped example, copied into a folder outside the project, unedited."""
    folder = tmp_path_factory.mktemp("researcher")
    path = folder / "my_method.py"
    shutil.copy(EXAMPLE, path)
    yield path
    methods.unregister("lasttok_max")


@pytest.fixture(scope="module")
def plugin(plugin_file):
    (m,) = methods.load_file(plugin_file)
    return m


def hook_snapshot(model):
    return {name: (list(m._forward_hooks), list(m._forward_pre_hooks)) for name, m in model.named_modules()}


# ----------------------------------------------------------------------------- the registry
def test_every_list_reads_the_registry(plugin):
    from analysis import sweep
    from analysis.common import parse_spec
    from lens_app import engine

    assert methods.names()[:len(BUILTINS)] == BUILTINS and methods.names()[-1] == "lasttok_max"
    assert engine.compare_methods() == ("none",) + BUILTINS[1:] + ("lasttok_max",)
    assert ("last token, max head", "lasttok_max") in engine.compare_choices()
    assert "lasttok_max@64" in sweep.compare_specs("64")
    assert parse_spec("lasttok_max@64").base == "lasttok_max"
    assert MustDropConfig.baseline("lasttok_max", 100, layer=1).method == "lasttok_max"
    with pytest.raises(ValueError, match="method must be one of mustdrop, fastv"):
        MustDropConfig(method="nope")


def test_lmms_eval_method_arg_reads_the_registry(plugin, tiny):
    pytest.importorskip("lmms_eval")
    from mustdrop.lmms import build_config

    assert build_config(tiny, method="lasttok_max", budget=64).method == "lasttok_max"
    with pytest.raises(ValueError, match="method must be one of mustdrop, .*lasttok_max"):
        build_config(tiny, method="nope", budget=64)


def test_methods_command_lists_one_per_line_name_first(plugin_file):
    p = cli("methods", "--method-file", str(plugin_file))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == list(BUILTINS) + ["lasttok_max"]
    assert "plug-in" in lines[-1] and "last token, max head" in lines[-1]


def test_a_v1_trace_of_each_builtin_is_explained_in_its_words():
    t = Trace.load(ROOT / "tests" / "fixtures" / "v1-llava-64.safetensors")
    assert "method_info" not in t.meta
    assert methods.words_of(t).thresholds and methods.words_of(t).label == "MustDrop"
    w = methods.words_of({"method": "fastv"})
    assert w.label == "FastV" and "last token" in w.status(stages.DROPPED)


# ----------------------------------------------------------------------------- the example, everywhere
def test_example_runs_in_the_cli_and_replays_without_the_plugin(plugin_file, tiny_dir, tmp_path):
    img = tmp_path / "img.png"
    half_textured_image().save(img)
    out = tmp_path / "t.safetensors"
    p = cli("run", "--model", str(tiny_dir), "--image", str(img), "--question", QUESTION, "--method", "lasttok_max",
            "--method-file", str(plugin_file), "--max-new-tokens", "2", "--no-vanilla", "--out", str(out),
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "budget" in p.stdout and "last token, max head (lasttok_max)" in p.stdout
    t = Trace.load(out)
    assert t.meta["method"] == "lasttok_max" and t.meta["config"]["method"] == "lasttok_max"
    assert t.meta["method_info"]["label"] == "last token, max head"
    # the default budget is the MustDrop run at --preset on this input (mustdrop.matched, the app's rule)
    from mustdrop.adapters import LlavaMustDrop, load_llava
    from mustdrop.matched import run_budget

    runner = LlavaMustDrop(*load_llava(str(tiny_dir)), str(tiny_dir))
    md = runner.run(str(img), QUESTION, runner.config_for("64"), max_new_tokens=2).trace
    assert t.meta["baseline"]["plan"]["budget"] == pytest.approx(run_budget(md))
    # replayed by a process that never loaded the plug-in: the trace carries its words
    shown = cli("show", str(out))
    assert shown.returncode == 0 and "last token, max head" in shown.stdout
    bad = cli("run", "--model", str(tiny_dir), "--image", str(img), "--question", QUESTION, "--method", "nope")
    assert bad.returncode == 2 and "method must be one of" in bad.stderr and "Traceback" not in bad.stderr


def test_example_in_the_apps_compare_choice_and_every_view(plugin, tiny):
    import gradio as gr

    from lens_app import app as lens_app_app, engine
    from lens_app.session import Frame, Session
    from lens_app.views.compare import CompareView
    from mustdrop import vis
    from mustdrop.accounting import summarize
    from mustdrop.matched import run_budget

    demo = lens_app_app.build_app(engine.Lens(runner=tiny), examples=[])
    assert "lasttok_max" in str(demo.config), "the Compare choice and /analyze offer the plug-in"
    lens = engine.Lens(runner=tiny)
    a = lens.analyze(half_textured_image(), QUESTION, lens.config("64"), 1, compare="lasttok_max")
    other = a.compare
    assert other.meta["method"] == "lasttok_max"
    assert abs(summarize(other)["equivalent_tokens"]["compute"] - run_budget(a.trace)) <= 0.5 + 1e-9
    with gr.Blocks():
        v = CompareView()
        v.build()
    s = Session.of_run(a.trace, a.vanilla, a.image, compare=other)
    out = v.draw(s, Frame.of(s, a.trace.start_layer, None, False))
    assert "last token, max head" in out[v.text]
    # the plug-in's trace alone, in every view's words: legend, inspector, slides
    layer = other.prune_layers[0]
    legend = vis.legend_html("filter", other)
    assert "no head of the last token attends to it much" in legend and "AND individual max" not in legend
    assert "max over heads" in vis.legend_html("global_share", other, layer)
    dropped = np.argwhere(other.patch("dropped_after_layer") == layer)[0]
    md = vis.lifecycle_markdown(other, int(dropped[0]), int(dropped[1]))
    assert "no attention head of the last instruction token" in md and "below their thresholds" not in md
    assert "last token, max head:" in "\n".join(vis.text_lines(other, a.vanilla))
    fig = vis.slide_figure(other, vanilla=a.vanilla, layer=layer)
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert "kept: one head of the last token attends to it strongly" in labels


def test_example_in_sweep_compare(plugin_file, tiny_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "cmp"
    p = subprocess.run([sys.executable, "-m", "analysis.sweep", "compare", "--model", str(tiny_dir), "--out", str(out),
                        "--n", "1", "--no-ablations", "--no-figures", "--max-new-tokens", "1",
                        "--method-file", str(plugin_file)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    import pandas as pd

    table = pd.read_csv(out / "compare.csv")
    row = table[table["config"] == "lasttok_max@64"]
    assert len(row) == 1 and row["method"].iloc[0] == "last token, max head" and row["failed"].iloc[0] == 0
    assert row["budget_gap_max"].iloc[0] <= 0.5 + 1e-9


def test_entry_point_group_registers_an_installed_method(tmp_path, monkeypatch):
    (tmp_path / "epdemo_mod.py").write_text(
        "from mustdrop.methods import RankedDrop\n"
        "class EpDemo(RankedDrop):\n    name = 'epdemo'\n    label = 'entry point demo'\n"
        "    def score(self, x):\n        return x.attn[:, -1, :].mean(0)\n"
        "METHOD = EpDemo\n")
    dist = tmp_path / "epdemo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: epdemo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mustdrop.methods]\nepdemo = epdemo_mod:METHOD\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert [m.name for m in methods.load_entry_points()] == ["epdemo"]
        assert "epdemo" in methods.baselines() and not methods.is_builtin("epdemo")
    finally:
        methods.unregister("epdemo")


# ----------------------------------------------------------------------------- plug-ins with a bug
def _result(kept, v, device):
    score = torch.zeros(v, device=device)
    status = torch.full((v,), stages.DROPPED, dtype=torch.int8)
    status[kept[(kept >= 0) & (kept < v)]] = stages.KEPT_BOTH
    return stages.FilterResult(kept, torch.zeros(0, dtype=torch.long), score, score, status, 0)


class _Ranked(methods.RankedDrop):
    label = "buggy"


class Raises(_Ranked):
    name = "bug_raises"

    def score(self, x):
        raise RuntimeError("boom")


class WrongShape(_Ranked):
    name = "bug_shape"

    def score(self, x):
        return x.attn.mean(0)                       # (T, V), not (V,)


class WrongDtype(_Ranked):
    name = "bug_dtype"

    def score(self, x):
        return torch.arange(x.num_tokens)           # integers


class OutOfRange(_Ranked):
    name = "bug_range"

    def decide(self, x):
        return _result(torch.arange(x.keep) + x.num_tokens - x.keep + 1, x.num_tokens, x.attn.device)


class Repeated(_Ranked):
    name = "bug_repeat"

    def decide(self, x):
        return _result(torch.zeros(x.keep, dtype=torch.long), x.num_tokens, x.attn.device)


class MissesBudget(_Ranked):
    name = "bug_budget"

    def decide(self, x):
        return _result(torch.arange(x.keep - 1), x.num_tokens, x.attn.device)


class PlanMissesBudget(_Ranked):
    name = "bug_plan"

    def score(self, x):
        return x.attn[:, -1, :].float().mean(0)

    def plan(self, budget, n0, config, num_layers):
        p = stages.plan_single_drop(self.name, budget, n0, config.prune_layers[0], num_layers)
        return stages.BudgetPlan(self.name, budget, n0, p.pre_keep, p.layers, tuple(k // 2 for k in p.keep))


class VisionOutOfRange(methods.Method):
    name = "bug_vision"
    label = "buggy vision"
    stages = ("vision",)

    def select_vision(self, x):
        return torch.arange(x.keep) + x.features.shape[0]


class VisionBadScore(VisionOutOfRange):
    name = "bug_vision_score"

    def select_vision(self, x):
        kept = torch.arange(x.keep)
        return methods.VisionSelection(x.features[kept], kept.unsqueeze(1), torch.zeros(x.keep))


class VisionEmptyToken(VisionOutOfRange):
    name = "bug_vision_empty"

    def select_vision(self, x):
        groups = torch.arange(x.keep).unsqueeze(1)
        groups[0] = -1                              # a token that covers no patch
        return methods.VisionSelection(x.features[: x.keep], groups)


@pytest.mark.parametrize("cls, fault", [
    (Raises, "failed at LLM layer 1: RuntimeError: boom"),
    (WrongShape, r"score must be a float tensor of shape \(\d+,\)"),
    (WrongDtype, "score must be a float tensor"),
    (OutOfRange, "indices outside 0"),
    (Repeated, "repeats indices"),
    (MissesBudget, "misses its budget"),
    (PlanMissesBudget, "misses its budget: its plan averages"),
    (VisionOutOfRange, "the selection before the LLM has indices outside"),
    (VisionBadScore, r"score must be one value per token, \(576,\), got \(150,\)"),
    (VisionEmptyToken, "each row naming at least one"),
])
def test_a_buggy_plugin_is_refused_naming_it_and_leaves_no_hook(tiny, image, cls, fault):
    from lens_app.engine import user_errors
    from mustdrop.hooks import count_hooks

    # transformers adds its own output-capturing hooks to the vision tower on the first forward that
    # asks for hidden states: take the snapshot after one such run, so that only ours are compared
    tiny.run(image, QUESTION, MustDropConfig.baseline("fastervlm", 150), max_new_tokens=1)
    m = methods.register(cls)
    try:
        before = hook_snapshot(tiny.model)
        cfg = MustDropConfig.baseline(m.name, 150, layer=1)
        with pytest.raises(methods.MethodError, match=fault) as e:
            tiny.run(image, QUESTION, cfg, max_new_tokens=1)
        assert f"method {m.name!r}" in str(e.value) and isinstance(e.value, user_errors())
        assert count_hooks(tiny.model) == 0 and hook_snapshot(tiny.model) == before
    finally:
        methods.unregister(m.name)
    ok = tiny.run(image, QUESTION, MustDropConfig.baseline("fastv", 150, layer=1), max_new_tokens=1)
    assert ok.trace.meta["method"] == "fastv", "the next run works"


@pytest.mark.parametrize("requires", [{"square": "pools"}, {"square_grid": ""}, ["square_grid"]])
def test_a_requirement_outside_the_vocabulary_is_refused_at_registration(requires):
    """A method names what it relies on before the LLM by the names hosts know (methods.VISION_NEEDS);
    a typo would otherwise pass every host's check and fail deep inside a run."""
    cls = type("Needs", (VisionOutOfRange,), {"name": "bug_needs", "requires": requires})
    with pytest.raises(methods.MethodError, match="requires must map names of square_grid, vision_hidden"):
        methods.register(cls)
    assert "bug_needs" not in methods.names()


def test_a_name_that_clashes_with_a_builtin_is_refused(tmp_path):
    f = tmp_path / "clash.py"
    f.write_text(EXAMPLE.read_text().replace('name = "lasttok_max"', 'name = "fastv"'))
    with pytest.raises(methods.MethodError, match="'fastv' clashes with the built-in method"):
        methods.load_file(f)
    assert methods.get("fastv").label == "FastV"
    with pytest.raises(methods.MethodError, match="neither METHOD nor METHODS"):
        (tmp_path / "empty.py").write_text("x = 1\n")
        methods.load_file(tmp_path / "empty.py")
    with pytest.raises(methods.MethodError, match="importing it failed: ZeroDivisionError"):
        (tmp_path / "broken.py").write_text("1 / 0\n")
        methods.load_file(tmp_path / "broken.py")


def test_the_app_keeps_serving_after_a_buggy_plugin(tiny):
    from lens_app import engine

    m = methods.register(Raises)
    try:
        lens = engine.Lens(runner=tiny)
        with pytest.raises(ValueError, match="method 'bug_raises' failed"):
            lens.analyze(half_textured_image(), QUESTION, lens.config("64"), 1, compare="bug_raises")
        a = lens.analyze(half_textured_image(), QUESTION, lens.config("64"), 1, compare="fastv")
        assert a.compare.meta["method"] == "fastv"
    finally:
        methods.unregister(m.name)


def test_forged_method_words_in_a_trace_are_shown_as_text(plugin, tiny, image):
    """A trace's method_info is written by whoever wrote the file: every view shows it escaped."""
    from mustdrop import vis

    t = tiny.run(image, QUESTION, MustDropConfig.baseline("lasttok_max", 150, layer=1), max_new_tokens=1).trace
    evil = "<img src=x onerror=alert(1)>"
    info = dict(t.meta["method_info"], label=evil, legend=evil, dropped=evil + " [x](javascript:1)",
                statuses={"0": evil, "4": evil}, scores={"global_share": evil})
    forged = Trace(dict(t.meta, method_info=info), t.arrays)
    layer = forged.prune_layers[0]
    html_out = vis.legend_html("filter", forged) + vis.legend_html("global_share", forged, layer)
    assert "<img" not in html_out and "&lt;img" in html_out
    dropped = np.argwhere(forged.patch("dropped_after_layer") == layer)[0]
    md = vis.lifecycle_markdown(forged, int(dropped[0]), int(dropped[1]))
    assert "<img" not in md and "&lt;img" in md and "\\[x\\](javascript" in md, "no markup, no link"
    with pytest.raises(ValueError, match="unknown status code"):
        methods.Words.from_dict(dict(info, statuses={"9": "x"}))
    assert methods.words_of(Trace(dict(t.meta, method_info={"statuses": {"9": "x"}}), t.arrays)).label == \
        "last token, max head", "malformed words fall back to the registered method's"


def test_a_plugin_trace_replays_in_the_app_where_the_plugin_is_not_loaded(plugin_file, plugin, tiny, image, tmp_path):
    import gradio as gr

    from lens_app.session import Frame, Session, split_comparison
    from lens_app.views.filter import FilterView
    from mustdrop import vis

    path = tiny.run(image, QUESTION, MustDropConfig.baseline("lasttok_max", 150, layer=1),
                    max_new_tokens=1).trace.save(tmp_path / "p.safetensors")
    methods.unregister("lasttok_max")
    try:
        t = Trace.load(path)
        assert not t.is_vanilla
        runs, other = split_comparison([t])
        s = Session.of_run(runs[0], None, None)
        with gr.Blocks():
            v = FilterView()
            v.build()
        out = v.draw(s, Frame.of(s, t.start_layer, None, False))
        assert "no head of the last token attends to it much" in out[v.legend]
        assert out[v.global_share]["label"] == "2: last token's attention, max over heads"
        assert "method **last token, max head**" in vis.summary_markdown(t)
        vis.slide_figure(t, layer=t.start_layer)
    finally:
        methods.load_file(plugin_file)


def test_viz_app_loads_method_files_and_refuses_a_broken_one(plugin_file, tmp_path):
    from lens_app import cli as app_cli

    assert app_cli.parser().parse_args(["--method-file", str(plugin_file)]).method_file == [str(plugin_file)]
    broken = tmp_path / "broken_method.py"
    broken.write_text("raise RuntimeError('not ready')\n")
    with pytest.raises(SystemExit, match="method file broken_method.py: importing it failed: RuntimeError: not ready"):
        app_cli.main(["--method-file", str(broken)])
