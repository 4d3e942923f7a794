"""One definition per fact (issue 25, section 3): the image pixel hash, reading a config from text,
vision tokens per layer and the pairing of traces each live in one place that every user calls, and
the app finds no view by its class name. Static checks (they fail on the code before the split) and
behaviour checks of the shared definitions."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("mustdrop", "lens_app", "analysis") for p in (ROOT / d).rglob("*.py"))


def grep(pattern: str, exclude=()) -> list[str]:
    rx = re.compile(pattern)
    return [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES if str(p.relative_to(ROOT)) not in exclude
            for i, line in enumerate(p.read_text().splitlines(), 1) if rx.search(line)]


def test_the_pixel_hash_is_computed_in_one_place():
    assert grep(r"sha256\(.*(tobytes|asarray)", exclude=("mustdrop/images.py",)) == []


def test_per_layer_vision_counts_are_counted_in_one_place():
    """Nobody but mustdrop/vision_tokens.py walks the layers to count vision tokens, or averages the
    recorded counts by hand."""
    assert grep(r"sum\(.*vision_tokens_per_layer|sum\(per_layer\)|vision_per_layer\.append|out\.append\(n\)",
                exclude=("mustdrop/vision_tokens.py",)) == []


def test_config_text_is_parsed_in_one_place():
    """No caller coerces config fields by hand: analysis specs, lmms-eval args and the app's panel
    call mustdrop.config's parser."""
    assert grep(r"def _coerce|def _number|KNOBS\[key\]\(|bool\(merge\)|re\.fullmatch\(r\"\(off\|192",
                exclude=("mustdrop/config.py",)) == []


def test_no_view_is_found_by_its_class_name():
    found = grep(r"type\(\w+\)\.__name__ ==|__name__ == \"\w+View\"|of\(\"\w+\"\)", exclude=())
    tree_hits = []
    for p in (ROOT / "lens_app").rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "isinstance" and len(n.args) == 2 \
                    and re.search(r"View|Inspector|Tab\b", ast.unparse(n.args[1])):
                tree_hits.append(f"{p.relative_to(ROOT)}:{n.lineno}")
    assert found == [] and tree_hits == []


# ----------------------------------------------------------------------------- the shared definitions
def test_every_caller_reads_the_same_text_into_the_same_config(tiny):
    """The same knob text through analysis specs, lmms-eval model args, the app's panel and the CLI's
    path (config_from_text) gives the same config."""
    from analysis.common import build_config as spec_config, parse_spec
    from lens_app import inputs
    from mustdrop.config import KNOB_FIELDS, config_from_text
    from mustdrop.lmms import build_config as lmms_config

    text = {"global_thr": "0.02", "individual_thr": "0.015", "kv_trim": "false", "window": "2", "prune_layers": "1;3"}
    spec = spec_config(tiny, parse_spec("64+" + "+".join(f"{k}={v}" for k, v in text.items())))
    lmms = lmms_config(tiny, preset="64", prune_layers=text["prune_layers"],
                       knobs={k: v for k, v in text.items() if k != "prune_layers"})
    cli = config_from_text(tiny.config_for, "64", **text)
    panel = dict(zip(KNOB_FIELDS, inputs.knob_values(tiny.config_for("64"))), **text)
    app = tiny.config_for("64").replace(**inputs.custom_knobs(*(panel[k] for k in KNOB_FIELDS)))
    for cfg in (spec, lmms, cli, app):
        assert (cfg.global_thr, cfg.individual_thr, cfg.kv_trim, cfg.window, cfg.prune_layers) == \
            (0.02, 0.015, False, 2, (1, 3)), cfg


@pytest.mark.parametrize("key,value,message", [
    ("window", "2.5", "window must be a whole number"),      # lmms-eval truncated it to 2 before
    ("kv_trim", "maybe", "kv_trim must be true or false"),
    ("prune_layers", "1;x", "prune_layers must be whole numbers"),
    ("positions", "middle", "positions must be one of reference, original"),
    ("nonsense", "1", "unknown MustDrop config key 'nonsense'"),
])
def test_the_parser_names_the_field_and_the_value(key, value, message):
    from mustdrop.config import parse_field

    with pytest.raises(ValueError, match=re.escape(message)):
        parse_field(key, value)


def test_the_knob_panel_is_the_config_fields():
    """The app's panel has one input per knob field, labelled and grouped by the field's metadata."""
    import gradio as gr

    from lens_app.knobs import KnobPanel
    from mustdrop.config import KNOB_FIELDS, MustDropConfig, knob_info

    with gr.Blocks():
        panel = KnobPanel(MustDropConfig())
        panel.build()
    assert [c.label for c in panel.inputs] == [knob_info(k)["label"] for k in KNOB_FIELDS]
    assert isinstance(panel.inputs[KNOB_FIELDS.index("positions")], gr.Radio)
    assert all(isinstance(panel.inputs[KNOB_FIELDS.index(k)], gr.Checkbox) for k in ("merge", "key_set", "filter", "kv_trim"))


def test_pixel_hash_and_per_layer_counts_match_what_a_run_records(tiny, image):
    from lens_app.examples import image_sha
    from mustdrop import vision_tokens
    from mustdrop.images import load_image, pixel_sha256
    from mustdrop.matched import run_budget

    trace = tiny.run(image, "what is shown?", tiny.config_for("64"), max_new_tokens=2).trace
    assert trace.meta["input"]["image"]["sha256"] == pixel_sha256(load_image(image)) == image_sha(image)
    m = trace.meta
    drops = [(s["layer"], s["kept"]) for s in m["stage2"]]
    assert m["vision_tokens_per_layer"] == vision_tokens.per_layer(m["sequence"]["N0"], drops, trace.num_layers)
    assert run_budget(trace) == vision_tokens.layer_average(m["vision_tokens_per_layer"])


def test_traces_pair_by_one_rule(tiny, image):
    """A vanilla trace pairs with its MustDrop trace by the rule a comparison trace does
    (vis.compare.same_input): same input, grid, crops and depth."""
    from lens_app.session import pair_traces
    from mustdrop.trace import TraceError
    from mustdrop.vis import compare as vc

    md = tiny.run(image, "what is shown?", tiny.config_for("64"), max_new_tokens=2).trace
    va = tiny.run(image, "what is shown?", tiny.config_for("off"), max_new_tokens=2).trace
    other = tiny.run(image, "what else?", tiny.config_for("off"), max_new_tokens=2).trace
    assert vc.same_input(md, va) and pair_traces([va, md]) == (md, va)
    assert not vc.same_input(md, other)
    with pytest.raises(TraceError, match="another image, question or model"):
        pair_traces([md, other])
    deeper = copy.copy(va)                  # the same input on a deeper model: the old vanilla pairing let it pass
    deeper.meta = copy.deepcopy(va.meta)
    deeper.meta["model"]["llm"]["num_layers"] += 1
    assert not vc.same_input(md, deeper)
    with pytest.raises(TraceError, match="another image, question or model"):
        pair_traces([md, deeper])


def test_run_keeps_its_parameters_while_the_panel_is_generated():
    """/run's parameters are generated from the knob fields' short names: the same names, in the same
    order, as when they were written out in app.py (the API contract), and the page's knobs are the
    panel's inputs in KNOB_FIELDS order."""
    from lens_app import app, engine

    demo = app.build_app(engine.Lens("/nonexistent-model-folder"), examples=[])
    info = demo.get_api_info(all_endpoints=True)["named_endpoints"]
    assert [p["parameter_name"] for p in info["/run"]["parameters"]] == [
        "image", "question", "preset", "window", "merge_thr", "key_rate", "prune", "gthr", "ithr", "positions",
        "m1a", "m1b", "m2", "m3", "max_new", "mode", "temperature", "top_p", "seed", "show_gt"]
    labels = [b.label for b in demo.blocks.values() if getattr(b, "label", None) in
              ("window (w x w)", "merge threshold (cosine)", "prune layers (0-based)", "3 KV trim")]
    assert labels == ["window (w x w)", "merge threshold (cosine)", "prune layers (0-based)", "3 KV trim"]
