"""The app's same-budget comparison on the tiny model: what the Compare view draws is each trace's kept
set (read back from the pixels), its counts are set arithmetic on the two traces, the compared run
gets the MustDrop run's budget (mustdrop.matched, as analysis.sweep compare gives it), and /analyze
takes a method (or refuses a bad one with a message)."""


import gradio as gr
import numpy as np
import pytest

from conftest import half_textured_image, serving
from lens_app import app as lens_app_app, engine
from lens_app.session import CANVAS, Frame, Session, split_comparison
from lens_app.views.compare import CompareView
from mustdrop import matched
from mustdrop.accounting import summarize
from mustdrop.trace import DROPPED, Trace, TraceError
from mustdrop.vis import compare as vc
from mustdrop.vis.geometry import decode_categories, geometry

QUESTION = "what color is the square?"
METHODS = engine.compare_methods()[1:]


@pytest.fixture(scope="module")
def runs(tiny):
    """One MustDrop 64 run (and its vanilla run) and every method at its budget, through Lens.analyze."""
    lens = engine.Lens(runner=tiny)
    img = half_textured_image()
    out = {}
    for m in METHODS:
        a = lens.analyze(img, QUESTION, lens.config("64"), 1, compare=m)
        out[m] = a.compare
    out["md"], out["vanilla"], out["image"] = a.trace, a.vanilla, img
    assert lens.vanilla_hits == len(METHODS) - 1, "the vanilla run is cached across comparisons"
    return out


@pytest.fixture(scope="module")
def compare_view():
    with gr.Blocks():
        v = CompareView()
        v.build()
    return v


def kept_from_records(trace, layer):
    """The patches covered by a token still in the sequence after ``layer``, from the token-level
    records alone (tokens.groups and the stage-2 statuses), not from the patch maps the view reads."""
    groups = trace.arrays["tokens.groups"]
    alive = np.ones(len(groups), bool)
    for s in trace.meta["stage2"]:
        if s["layer"] <= layer:
            toks = trace.arrays[f"stage2.L{s['layer']}.tokens"]
            alive[toks[trace.arrays[f"stage2.L{s['layer']}.status"] == DROPPED]] = False
    kept = np.zeros(trace.grid * trace.grid, bool)
    for row in groups[alive]:
        kept[row[row >= 0]] = True
    return kept.reshape(trace.grid, trace.grid)


def tokens_per_layer_from_records(trace, after):
    """Vision tokens per LLM layer counted from the stage-2 token records: a token dropped at prune
    layer p is still processed by layer p (compute convention, after=False); the authors' printed
    convention counts it gone from layer p on (after=True)."""
    n0 = len(trace.arrays["tokens.groups"])
    drops = {s["layer"]: int((trace.arrays[f"stage2.L{s['layer']}.status"] == DROPPED).sum())
             for s in trace.meta["stage2"]}
    return np.array([n0 - sum(k for p, k in drops.items() if (p <= l if after else p < l))
                     for l in range(trace.num_layers)], float)


def drawn(view, session, layer):
    return view.draw(session, Frame.of(session, layer, None, False))


@pytest.mark.parametrize("method", METHODS)
def test_drawn_kept_masks_and_overlap_are_the_traces_kept_sets(runs, compare_view, method):
    md, other = runs["md"], runs[method]
    s = Session.of_run(md, runs["vanilla"], runs["image"], compare=other)
    geom = geometry(md, CANVAS)
    for layer in range(md.num_layers):
        out = drawn(compare_view, s, layer)
        a, b = kept_from_records(md, layer), kept_from_records(other, layer)
        got_other = decode_categories(out[compare_view.other], geom, vc.kept_colours("other"))
        got_md = decode_categories(out[compare_view.mustdrop], geom, vc.kept_colours("mustdrop"))
        assert np.array_equal(got_other == vc.KEPT, b) and (got_other >= 0).all(), (method, layer)
        assert np.array_equal(got_md == vc.KEPT, a) and (got_md >= 0).all(), (method, layer)
        codes = decode_categories(out[compare_view.overlap], geom, vc.OVERLAP_COLOURS)
        assert np.array_equal(codes == vc.BOTH, a & b) and np.array_equal(codes == vc.ONLY_MUSTDROP, a & ~b)
        assert np.array_equal(codes == vc.ONLY_OTHER, ~a & b) and np.array_equal(codes == vc.NEITHER, ~a & ~b)
        counts = {"both": int((a & b).sum()), "only_mustdrop": int((a & ~b).sum()),
                  "only_other": int((~a & b).sum()), "neither": int((~a & ~b).sum())}
        assert vc.overlap_counts(md, other, layer) == counts
        text = out[compare_view.text]
        assert f"| {counts['both']} | {counts['only_mustdrop']} | {counts['only_other']} | {counts['neither']} |" in text
        assert all(" ".join(t.answer.split()) in text for t in (md, other, runs["vanilla"]))


@pytest.mark.parametrize("method", METHODS)
def test_compared_run_gets_the_mustdrop_runs_budget(runs, method):
    """Budget = MustDrop's layer-averaged vision tokens (compute convention), met within half a token
    (pooling: round(sqrt(budget))^2 tokens in every layer), as MustDropConfig.baseline documents."""
    md, other = runs["md"], runs[method]
    budget = summarize(md)["equivalent_tokens"]["compute"]
    assert matched.run_budget(md) == pytest.approx(tokens_per_layer_from_records(md, after=False).mean())
    assert other.meta["baseline"]["plan"]["budget"] == pytest.approx(budget)
    assert other.meta["config"]["method"] == method and other.meta["config"]["preset"] == f"{method}@64"
    eq = summarize(other)["equivalent_tokens"]["compute"]
    if method == "pool":
        assert eq == round(budget ** 0.5) ** 2
    else:
        assert abs(eq - budget) <= 0.5 + 1e-9, (method, budget, eq)
    b = vc.budgets(md, other)
    assert b["mustdrop"]["compute"] == pytest.approx(tokens_per_layer_from_records(md, after=False).mean())
    assert b["mustdrop"]["authors"] == pytest.approx(tokens_per_layer_from_records(md, after=True).mean())
    assert b["other"]["compute"] == pytest.approx(eq) and b["given"] == pytest.approx(budget)


def test_the_app_and_the_sweep_use_one_budget_rule(runs, tiny):
    """analysis.sweep compare builds a matched baseline the way the app does (mustdrop.matched)."""
    from analysis.common import build_config, parse_spec

    md = runs["md"]
    sweep = build_config(tiny, parse_spec("fastv@64"), budget=matched.run_budget(md))
    app = matched.matched_config(tiny, "fastv", md)
    assert (sweep.budget, sweep.prune_layers) == (app.budget, app.prune_layers)


def test_no_comparison_says_so(runs, compare_view):
    s = Session.of_run(runs["md"], runs["vanilla"], runs["image"])
    out = drawn(compare_view, s, 1)
    assert out[compare_view.other] is None and "No comparison" in out[compare_view.text]


def test_bad_choices_get_a_message(tiny):
    lens = engine.Lens(runner=tiny)
    with pytest.raises(ValueError, match="unknown comparison method 'fastvv'; choose one of none, fastv"):
        lens.analyze(half_textured_image(), QUESTION, lens.config("64"), 1, compare="fastvv")
    with pytest.raises(ValueError, match="needs a MustDrop run that prunes"):
        lens.analyze(half_textured_image(), QUESTION, lens.config("off"), 1, compare="fastv")


def test_uploaded_traces_split_into_run_and_comparison(runs):
    md, va, fv, pool = runs["md"], runs["vanilla"], runs["fastv"], runs["pool"]
    assert split_comparison([fv, md, va]) == ([md, va], fv)
    assert split_comparison([pool, va]) == ([pool, va], None), "a baseline alone is replayed as the run"
    with pytest.raises(TraceError, match="at most one comparison"):
        split_comparison([md, fv, pool])
    other_input = Trace(dict(fv.meta, input=dict(fv.meta["input"], input_hash="x")), fv.arrays)
    with pytest.raises(TraceError, match="another image"):
        Session.of_run(md, va, None, compare=other_input)


def test_slide_has_the_comparison_panel(runs):
    from mustdrop.vis import slide_figure

    md = runs["md"]
    fig = slide_figure(md, vanilla=runs["vanilla"], layer=md.start_layer, compare=runs["fastv"])
    plain = slide_figure(md, vanilla=runs["vanilla"], layer=md.start_layer)
    assert len(fig.axes) == len(plain.axes) + 2, "the slide and the comparison's overlap and numbers"
    titles = [ax.get_title() for ax in fig.axes]
    assert f"vs FastV, after layer {md.start_layer} (0-based)" in titles
    o = vc.overlap_counts(md, runs["fastv"], md.start_layer)
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert f"both: {o['both']}" in labels and f"only FastV: {o['only_other']}" in labels


# ----------------------------------------------------------------------------- the API
@pytest.fixture(scope="module")
def client(tiny, tmp_path_factory):
    from gradio_client import Client

    path = tmp_path_factory.mktemp("img") / "scene.png"
    half_textured_image().save(path)
    with serving(lens_app_app.build_app(engine.Lens(runner=tiny), examples=[])) as url:
        yield Client(url, verbose=False), path


def test_analyze_with_a_method_returns_the_comparison(client):
    from gradio_client import handle_file

    c, path = client
    md_path, vanilla, md_answer, cmp_path, cmp_answer, summary = c.predict(
        handle_file(str(path)), QUESTION, "64", "visionzip", api_name="/analyze")
    md, other = Trace.load(md_path), Trace.load(cmp_path)
    assert md.answer == md_answer and other.answer == cmp_answer and vanilla
    assert other.meta["config"]["method"] == "visionzip"
    assert other.meta["baseline"]["plan"]["budget"] == pytest.approx(matched.run_budget(md))
    assert summary["overlap"] == vc.overlap_counts(md, other, md.start_layer)
    assert summary["overlap_per_layer"] == [vc.overlap_counts(md, other, k) for k in range(md.num_layers)]
    assert summary["equivalent_tokens"]["other"]["compute"] == pytest.approx(summarize(other)["equivalent_tokens"]["compute"])
    plain = c.predict(handle_file(str(path)), QUESTION, "64", api_name="/analyze")      # no method: as before
    assert plain[3] is None and plain[5] is None and plain[2] == md_answer


def test_analyze_refuses_a_bad_method_with_a_message(client):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    c, path = client
    with pytest.raises(AppError, match="unknown comparison method 'FastV!'; choose one of none, fastv, visionzip"):
        c.predict(handle_file(str(path)), QUESTION, "64", "FastV!", api_name="/analyze")


def test_replay_with_a_comparison_trace(client, runs, tmp_path):
    from gradio_client import handle_file

    c, _ = client
    paths = [runs[k].save(tmp_path / f"{k}.safetensors") for k in ("md", "vanilla", "pdrop")]
    res = c.predict([handle_file(str(p)) for p in paths], None, True, api_name="/replay")
    status = next(x for x in res if isinstance(x, str) and x.startswith("**Replaying**"))
    assert "with vanilla" in status and "compared with pdrop@64" in status
    text = next(x for x in res if isinstance(x, str) and "at the same budget" in x)
    o = vc.overlap_counts(runs["md"], runs["pdrop"], runs["md"].start_layer)
    assert f"| {o['both']} | {o['only_mustdrop']} | {o['only_other']} | {o['neither']} |" in text
