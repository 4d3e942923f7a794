"""The app's Dataset tab without a browser: a row opens that sample's traces in the per-image views
(pixels read back), runs are offered by name only, and hostile zipped runs are refused with a
message and leave nothing behind."""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import gradio as gr
import numpy as np
import pytest

from lens_app import app as lens_app_app, engine
from lens_app.session import CANVAS, Frame
from lens_app.views.compare import CompareView
from lens_app.views.dataset import DatasetTab, run_folders
from lens_app.views.filter import FilterView
from lens_app.workdir import Workdir
from mustdrop import vis
from mustdrop.dataset import RunError
from mustdrop.dataset import aggregate as A
from mustdrop.dataset.archive import MAX_MEMBERS, unpack_run
from mustdrop.trace import Trace
from mustdrop.vis import compare as vc
from mustdrop.vis.geometry import decode_categories, geometry


@pytest.fixture(scope="module")
def runs(dataset_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("runsdir")
    shutil.copytree(dataset_run, root / "toy6")
    (root / "not-a-run").mkdir()
    return root


@pytest.fixture()
def tab(runs, tmp_path):
    (tmp_path / "work").mkdir()
    t = DatasetTab(runs, Workdir(tmp_path / "work"))
    with gr.Blocks():
        t.build()
    return t


@pytest.fixture(scope="module")
def views():
    with gr.Blocks():
        f, c = FilterView(), CompareView()
        f.build()
        c.build()
    return f, c


def test_runs_are_offered_by_name_only(tab, runs):
    assert list(run_folders(runs)) == ["toy6"]
    tab.run_of("runs:toy6")
    for bad in ("runs:../toy6", "runs:/etc", "runs:not-a-run", "upload:../../etc", "file:/etc/passwd", None):
        with pytest.raises(RunError):
            tab.run_of(bad)


def test_filters_lost_and_disagreements(tab):
    key = "runs:toy6"
    ts = tab.run_of(key)
    lost = tab.rows(key, "all", "lost", "all", "", "64", "fastv@64", False)
    want = A.flips(ts)
    assert sorted(zip(lost["id"], lost["config"])) == sorted(zip(want["id"][want["lost"]], want["config"][want["lost"]]))
    assert len(lost) > 0 and lost["lost"].all()
    d = tab.rows(key, "all", "all", "all", "", "64", "fastv@64", True)
    preds = {(r.id, r.config): r.prediction for r in ts.rows.itertuples()}
    assert len(d) > 0 and set(d["config"]) <= {"64", "fastv@64"}
    assert all(preds[(i, "64")] != preds[(i, "fastv@64")] for i in d["id"])
    out = tab.show_run(key)
    assert out[tab.maps] is not None and out[tab.maps].ndim == 3 and out[tab.survival].ndim == 3


def test_a_row_opens_its_traces_in_the_per_image_views(tab, views, runs):
    """Clicking a FastV row with methods 64 / fastv@64: the 2 filter tab draws the MustDrop trace of that
    sample on its image, the Compare tab the FastV trace; read back from the pixels."""
    fview, cview = views
    key = "runs:toy6"
    ts = tab.run_of(key)
    sid = tab.rows(key, "fastv@64", "lost", "all", "", "64", "fastv@64", False)["id"].iloc[0]
    session, msg = tab.sample_session(key, [sid, "fastv@64"], "64", "fastv@64")
    md, other = Trace.load(ts.trace_path(sid, "64")), Trace.load(ts.trace_path(sid, "fastv@64"))
    assert session.trace.meta["input"]["input_hash"] == md.meta["input"]["input_hash"]
    assert session.trace.meta["config"]["preset"] == "64" and session.compare.meta["config"]["method"] == "fastv"
    assert session.vanilla is not None and session.vanilla.is_vanilla and session.views is not None
    assert session.gt is not None and "sample's image" in msg
    geom = geometry(md, CANVAS)
    for layer in md.prune_layers:
        out = fview.draw(session, Frame.of(session, layer, None, False))
        codes = decode_categories(out[fview.status], geom, {**vis.STATUS_COLOURS, vis.NO_TOKEN_CODE: vis.NO_TOKEN})
        np.testing.assert_array_equal(codes, vis.status_map(md, layer))
        cmp = cview.draw(session, Frame.of(session, layer, None, False))
        got = decode_categories(cmp[cview.other], geom, vc.kept_colours("other"))
        np.testing.assert_array_equal(got == vc.KEPT, other.alive_after(layer))
    # the image under the overlays is the sample's: the scene world regenerates it, its hash matches
    from analysis.toyworld import make_sample
    img = make_sample("test", int(sid.split("-")[1])).image
    np.testing.assert_array_equal(session.views[0], vis.model_view(img, md, crop=0))


def test_the_app_wires_a_row_click_to_every_view(runs):
    demo = lens_app_app.build_app(engine.Lens(runner=None), examples=[], runs_dir=runs)
    fview = next(v for v in demo.views if isinstance(v, FilterView))
    fn = next(f for f in demo.fns.values() if any(e == "select" and getattr(t, "elem_id", None) == "ds_table"
                                                   for t, e in [(demo.blocks.get(i), ev) for i, ev in f.targets]))
    assert fview.status._id in [o._id for o in fn.outputs]


def _zip(tmp_path, name, members: dict, **kw) -> str:
    p = tmp_path / f"{name}.zip"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n, data in members.items():
            z.writestr(n, data, **kw)
    return str(p)


def _run_members(run):
    return {f"toy6/{p.relative_to(run)}": p.read_bytes() for p in run.rglob("*")
            if p.is_file() and not p.name.startswith(".lens-index")}


def test_a_zipped_run_uploads(tab, runs, tmp_path):
    key = tab.upload(_zip(tmp_path, "ok", _run_members(runs / "toy6")))
    ts = tab.run_of(key)
    assert ts.root.is_relative_to(tab.workdir.root) and len(ts.index.traces) == 24


def _forged(run):
    members = _run_members(run)
    name = next(n for n in members if n.endswith(".safetensors"))
    t = Trace.load(run / name.split("/", 1)[1])
    buf = io.BytesIO()
    from safetensors.numpy import save

    arrays = dict(t.arrays)
    meta = dict(t.meta, stage1b=dict(t.meta["stage1b"], key_tokens=[10 ** 9]))
    buf.write(save(arrays, metadata={"mustdrop_trace": json.dumps(meta)}))
    members[name] = buf.getvalue()
    return members


@pytest.mark.parametrize("name,msg", [
    ("traversal", "outside the run folder"), ("absolute", "outside the run folder"),
    ("members", "members"), ("bomb", "zip bomb"), ("forged", "do not validate"),
    ("kind", "not a run file"), ("notzip", "not a zip"), ("link", "link or special file")])
def test_hostile_zips_are_refused_and_leave_nothing(tab, runs, tmp_path, name, msg):
    good = _run_members(runs / "toy6")
    if name == "traversal":
        path = _zip(tmp_path, name, {**good, "toy6/../../escaped.json": b"{}"})
    elif name == "absolute":
        path = _zip(tmp_path, name, {"/tmp/escaped.json": b"{}"})
    elif name == "members":
        path = _zip(tmp_path, name, {f"toy6/m{i}.json": b"" for i in range(MAX_MEMBERS + 1)})
    elif name == "bomb":
        path = _zip(tmp_path, name, {"toy6/summary.jsonl": b"\n" * (200 << 20)})
    elif name == "forged":
        path = _zip(tmp_path, name, _forged(runs / "toy6"))
    elif name == "kind":
        path = _zip(tmp_path, name, {**good, "toy6/run.sh": b"rm -rf /"})
    elif name == "link":
        p = tmp_path / "link.zip"
        with zipfile.ZipFile(p, "w") as z:
            info = zipfile.ZipInfo("toy6/run.json")
            info.external_attr = (0o120777 << 16)
            z.writestr(info, "/etc/passwd")
        path = str(p)
    else:
        (tmp_path / "x.zip").write_bytes(b"PK not really")
        path = str(tmp_path / "x.zip")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RunError, match=msg):
        tab.upload(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before           # nothing written beside
    assert not any(tab.workdir.root.glob("dataset-*")) if tab.workdir.root.exists() else True
    assert not (tmp_path.parent / "escaped.json").exists()
