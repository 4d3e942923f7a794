"""The dataset lens: a run folder read as a whole (mustdrop.dataset), checked against the traces.

One small real run of the shipped toy model (6 scene-world samples x vanilla, MustDrop 64 and two
same-budget baselines) is written by analysis.batch; every aggregate is then recomputed here
straight from the table and the trace files (Trace's own accessors, the scene's masks), not from
the lens's index, and compared.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mustdrop.dataset import RunError, TraceSet
from mustdrop.dataset import aggregate as A
from mustdrop.trace import Trace

CONFIGS = ["64", "fastv@64", "fastervlm@64"]


@pytest.fixture(scope="module")
def run_dir(dataset_run):
    return dataset_run


@pytest.fixture()
def run_copy(run_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns(".lens-index*"))
    return dst


def _rows(folder):
    return [json.loads(line) for line in (folder / "summary.jsonl").read_text().splitlines() if line.strip()]


def _traces(folder):
    """{(id, config): Trace} from the table's trace column."""
    return {(r["id"], r["config"]): Trace.load(folder / r["trace"]) for r in _rows(folder) if r["status"] == "ok"}


def test_run_folder_settings_and_rows(run_dir):
    doc = json.loads((run_dir / "run.json").read_text())
    assert doc["schema"] == "mustdrop-run/1" and doc["producer"] == "analysis.batch"
    assert [c["name"] for c in doc["configs"]] == ["off"] + CONFIGS and doc["vanilla"] == "off"
    assert doc["dataset"]["kind"] == "scene" and {"torch", "transformers", "python"} <= set(doc["versions"])
    for r in _rows(run_dir):
        ref = json.loads(r["image"])
        assert ref == {"kind": "scene", "split": "test", "index": int(r["id"].split("-")[1])}
        assert (run_dir / r["trace"]).is_file()


def test_lost_gained_match_rows(run_dir):
    ts = TraceSet.open(run_dir)
    rows = _rows(run_dir)
    van = {r["id"]: r["correct"] for r in rows if r["config"] == "off"}
    summary = A.config_summary(ts)
    total_lost = 0
    for cfg in CONFIGS:
        mine = [r for r in rows if r["config"] == cfg]
        lost = sum(van[r["id"]] == 1 and r["correct"] == 0 for r in mine)
        gained = sum(van[r["id"]] == 0 and r["correct"] == 1 for r in mine)
        assert (summary[cfg]["lost"], summary[cfg]["gained"]) == (lost, gained), cfg
        assert summary[cfg]["n_samples"] == len(mine)
        assert summary[cfg]["accuracy"] == pytest.approx(np.mean([r["correct"] for r in mine]))
        total_lost += lost
    assert total_lost > 0          # the fixture must exercise the lost path (FastV loses answers here)
    assert summary["off"]["lost"] == summary["off"]["gained"] == 0


def test_maps_survival_recall_match_traces(run_dir):
    ts = TraceSet.open(run_dir)
    traces = _traces(run_dir)
    for cfg in ["off"] + CONFIGS:
        mine = [t for (sid, c), t in traces.items() if c == cfg]
        L = mine[0].num_layers
        direct = {
            ("merged", None): [t.patch("merged").astype(bool) for t in mine],
            ("key", None): [t.patch("key").astype(bool) for t in mine],
        }
        for layer in range(L):
            direct[("kept", layer)] = [t.alive_after(layer) for t in mine]
            direct[("dropped", layer)] = [t.has_token() & ~t.alive_after(layer) for t in mine]
            direct[("trimmed", layer)] = [t.processed_at(layer) & ~t.kv_cached_at(layer) for t in mine]
        for (kind, layer), maps in direct.items():
            got, n = A.frequency_maps(ts, cfg, kind, layer)["image"]
            assert n == len(mine)
            np.testing.assert_allclose(got, np.mean(maps, axis=0), err_msg=f"{cfg} {kind} L{layer}")
        kept_rows = np.sum([t.alive_after(L - 1).sum(1) for t in mine], 0)
        tok_rows = np.sum([traces[(sid, "off")].has_token().sum(1) for (sid, c) in traces if c == cfg], 0)
        bias = A.positional_bias(ts, cfg, bands=4)
        for b, lo in enumerate(range(0, 24, 6)):
            assert bias["kept_share"][b] == pytest.approx(kept_rows[lo:lo + 6].sum() / kept_rows.sum())
            assert bias["uniform_share"][b] == pytest.approx(tok_rows[lo:lo + 6].sum() / tok_rows.sum())
        ids = sorted({sid for (sid, c) in traces if c == cfg})[:3]      # a subset of the samples
        sub = [traces[(i, cfg)] for i in ids]
        got, n = A.frequency_maps(ts, cfg, "kept", None, ids)["image"]
        assert n == 3
        np.testing.assert_allclose(got, np.mean([t.alive_after(L - 1) for t in sub], axis=0))
        curves = np.array([t.meta["vision_tokens_per_layer"] for t in mine], float)
        s = A.survival(ts, cfg)
        np.testing.assert_allclose(s["median"], np.median(curves, 0))
        np.testing.assert_allclose(s["q25"], np.percentile(curves, 25, 0))
    # recall of the asked objects' patches: analysis.evaluate's own metric, in the batch's rows
    table = A.sample_table(ts).set_index(["id", "config"])
    for r in _rows(run_dir):
        assert table.loc[(r["id"], r["config"]), "recall"] == pytest.approx(r["recall_final_tokens"])


def test_failure_attribution_matches_masks(run_dir):
    from analysis.toyworld import make_sample

    ts = TraceSet.open(run_dir)
    rows = _rows(run_dir)
    van = {r["id"]: r["correct"] for r in rows if r["config"] == "off"}
    n_checked = 0
    for cfg in CONFIGS:
        got = A.failure_attribution(ts, cfg).set_index("id")
        lost = [r for r in rows if r["config"] == cfg and van[r["id"]] == 1 and r["correct"] == 0]
        assert sorted(got.index) == sorted(r["id"] for r in lost)
        for r in lost:
            s = make_sample("test", int(r["id"].split("-")[1]))
            cov = s.scene.union_patch_mask(list(s.targets)).astype(float)
            t = Trace.load(run_dir / r["trace"])
            before = cov[~t.has_token()].sum() / cov.sum()
            want_layer, gone = None, before
            if before < 0.5:
                for layer in t.prune_layers:
                    gone = before + cov[t.has_token() & ~t.alive_after(layer)].sum() / cov.sum()
                    if gone >= 0.5:
                        want_layer = layer
                        break
            row = got.loc[r["id"]]
            if before >= 0.5:
                assert row["category"] == "lost before the LLM"
            elif want_layer is not None:
                assert row["category"] == f"lost at layer {want_layer}" and row["layer"] == want_layer
            else:
                assert not row["category"].startswith("lost")
            total_gone = cov[t.has_token() & ~t.alive_after(t.num_layers - 1) | ~t.has_token()].sum() / cov.sum()
            assert row["gone"] == pytest.approx(total_gone)
            n_checked += 1
    assert n_checked > 0
    table = A.attribution_table(ts, "fastv@64")
    assert table["lost"].sum() == len(A.failure_attribution(ts, "fastv@64"))
    assert all(s.startswith("of ") and "fastv@64" in s for s in A.attribution_sentences(ts, "fastv@64"))


def test_drop_score_names_the_binding_threshold(run_dir):
    """A MustDrop drop is attributed to the score nearer its threshold (global share or individual max)."""
    ts = TraceSet.open(run_dir)
    for i, rec in enumerate(ts.index.traces):
        if rec["config"] != "64":
            continue
        t = Trace.load(run_dir / rec["path"])
        score = ts.index.patch(i, "drop_score")
        drop = t.patch("dropped_after_layer")
        for layer in t.prune_layers:
            at = drop == layer
            g = t.stage2_patch(layer, "global_share")[at] / rec["global_thr"]
            ind = t.stage2_patch(layer, "individual_max")[at] / rec["individual_thr"]
            assert (g < 1).all() and (ind < 1).all()          # both said drop
            np.testing.assert_array_equal(score[at], np.where(g >= ind, 1, 2))


def test_index_is_cached_and_rebuilt_when_a_trace_changes(run_copy, monkeypatch):
    first = TraceSet.open(run_copy)
    assert (run_copy / ".lens-index.safetensors").is_file()
    calls = []
    real = Trace.load.__func__

    def counting(cls, path):
        calls.append(path)
        return real(cls, path)

    monkeypatch.setattr(Trace, "load", classmethod(counting))
    second = TraceSet.open(run_copy)
    assert calls == []                         # lazy: the cached index, no trace read
    for k in first.index.arrays:
        np.testing.assert_array_equal(first.index.arrays[k], second.index.arrays[k])
    row = next(r for r in _rows(run_copy) if r["config"] == "64")
    (run_copy / row["trace"]).write_bytes(b"not a trace")
    third = TraceSet.open(run_copy)
    assert len(calls) == len(first.index.traces)          # rebuilt, every trace read (validated) again
    assert len(third.index.traces) == len(first.index.traces) - 1
    assert any(row["id"] in p and "not a MustDrop trace" in p for p in third.problems)


def test_forged_index_is_not_trusted(run_copy):
    from safetensors.numpy import save_file

    TraceSet.open(run_copy)
    idx = run_copy / ".lens-index.safetensors"
    save_file({"fate": np.zeros(3, np.int8)}, str(idx), metadata={"index": json.dumps({"schema": "x"})})
    ts = TraceSet.open(run_copy)
    assert ts.index.arrays["fate"].size == 6 * 4 * 24 * 24


def test_paths_stay_inside_the_run(run_copy, tmp_path):
    outside = tmp_path / "secret.safetensors"
    rows = _rows(run_copy)
    shutil.copy(run_copy / rows[1]["trace"], outside)
    rows[1]["trace"] = "../secret.safetensors"
    rows[2]["image"] = json.dumps({"kind": "stored", "path": "../../etc/passwd"})
    (run_copy / "summary.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ts = TraceSet.open(run_copy)
    assert (rows[1]["id"], rows[1]["config"]) not in ts.index.lookup
    assert ts.path_of("../secret.safetensors") is None
    with pytest.raises(Exception, match="no trace"):
        ts.trace(rows[1]["id"], rows[1]["config"])
    big = run_copy / "run.json"
    big.write_text(json.dumps({"schema": "mustdrop-run/1", "pad": "x" * (2 << 20)}))
    with pytest.raises(RunError, match="settings file"):
        TraceSet.open(run_copy)


def test_images_reopen_and_match_the_trace(run_dir):
    ts = TraceSet.open(run_dir)
    t = ts.trace("test-0000002", "64")
    img = ts.image("test-0000002", t)
    assert img is not None and img.size == (336, 336)
    assert ts.image("test-0000003", t) is None        # another sample's pixels: refused by the hash


def test_older_batch_folder_opens(run_copy):
    (run_copy / "run.json").unlink()
    rows = _rows(run_copy)
    for r in rows:
        r.pop("image")
    (run_copy / "summary.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ts = TraceSet.open(run_copy)
    assert ts.kind.startswith("analysis.batch") and ts.vanilla == "off"
    assert set(ts.configs) == {"off", *CONFIGS}
    assert ts.image_ref("test-0000004") == {"kind": "scene", "split": "test", "index": 4}
    assert A.config_summary(ts)["fastv@64"]["lost"] == A.config_summary(TraceSet.open(run_copy))["fastv@64"]["lost"]
    assert A.sample_table(ts)["recall"].notna().all()


def test_lmms_eval_output_folder_opens(run_dir, tmp_path):
    """An lmms-eval output folder (OUTPUT/mustdrop: samples.rank*.jsonl, traces/<task>/...) as
    mustdrop/lmms.py wrote it before the run layout: one config, no reference answers."""
    out = tmp_path / "lmms" / "mustdrop"
    rows = []
    for k, r in enumerate(r for r in _rows(run_dir) if r["config"] == "64"):
        dst = out / "traces" / "pope" / f"{k}.rank0.safetensors"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run_dir / r["trace"], dst)
        rows.append({"task": "pope", "doc_id": k, "rank": 0, "response": r["prediction"], "answer": r["prediction"],
                     "trace": f"traces/pope/{k}.rank0.safetensors", "eq_tokens_authors": r["eq_tokens_authors"]})
    (out / "samples.rank0.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(RunError, match="open its 'mustdrop' subfolder"):
        TraceSet.open(out.parent)
    ts = TraceSet.open(out)
    assert ts.configs == ["64"] and ts.vanilla is None and len(ts.index.traces) == 6
    s = A.config_summary(ts)["64"]
    assert s["n_samples"] == 6 and s["accuracy"] is None and s["lost"] == 0
    assert A.frequency_maps(ts, "64", "kept")["image"][1] == 6


def test_report_is_self_contained_escaped_and_counts(run_copy, tmp_path):
    import re

    from mustdrop.cli import main

    rows = _rows(run_copy)
    for r in rows:
        if r["id"] == "test-0000001":
            r["question"] = "<script>alert(1)</script> what shape?"
    (run_copy / "summary.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out, js = tmp_path / "rep" / "report.html", tmp_path / "rep" / "summary.json"
    assert main(["report", str(run_copy), "--out", str(out), "--json", str(js)]) == 0
    text = out.read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)      # nothing fetched
    assert text.count("data:image/png;base64,") >= 4
    figs = sorted(p.name for p in (tmp_path / "rep" / "report-figures").iterdir())
    assert "survival.png" in figs and "survival.pdf" in figs and "maps-64.png" in figs
    summary = json.loads(js.read_text())["configs"]
    van = {r["id"]: r["correct"] for r in rows if r["config"] == "off"}
    for cfg in CONFIGS:
        mine = [r for r in rows if r["config"] == cfg]
        assert summary[cfg]["n_samples"] == len(mine)
        assert summary[cfg]["lost"] == sum(van[r["id"]] == 1 and r["correct"] == 0 for r in mine)
        assert summary[cfg]["gained"] == sum(van[r["id"]] == 0 and r["correct"] == 1 for r in mine)
        assert summary[cfg]["accuracy"] == pytest.approx(np.mean([r["correct"] for r in mine]))


def test_report_refuses_a_non_run_with_a_message(tmp_path, capsys):
    from mustdrop.cli import main

    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "not a run folder" in capsys.readouterr().err
