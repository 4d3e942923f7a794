"""analysis.evaluate on the scene world with the tiny random model: the machinery, not the accuracy
(random weights answer nonsense; what is checked is that every number is there and consistent)."""

import json
import shutil

import numpy as np
import pytest

from analysis import evaluate as E
from analysis.common import is_correct, normalise_answer, parse_spec, scene_items


@pytest.fixture(scope="module")
def model_dir(tiny_dir, tmp_path_factory):
    """The tiny model with defaults that leave the grid unmerged (random weights merge everything at
    0.8), so that stage 2 has tokens to decide about."""
    from mustdrop.config import ModelDefaults, scaled_prune_layers

    d = tmp_path_factory.mktemp("eval-model") / "tiny"
    shutil.copytree(tiny_dir, d)
    (d / "mustdrop.json").write_text(json.dumps(
        ModelDefaults(merge_threshold=0.999, prune_layers=scaled_prune_layers(6)).to_json()))
    return d


def test_answer_matching_normalises_case_space_punctuation():
    assert normalise_answer("  Red. ") == "red"
    assert is_correct("Yes!", "yes") == 1.0 and is_correct("no", "yes") == 0.0
    assert np.isnan(is_correct("red", None))


def test_specs_parse():
    assert parse_spec("64-no-merge").off_stage == "merge"
    assert parse_spec("fastv@64").match == "64"
    assert parse_spec("pool=100").budget == 100
    assert parse_spec("64+global_thr=0.02").overrides == (("global_thr", "0.02"),)
    with pytest.raises(ValueError, match="unknown config spec"):
        parse_spec("65")


def test_scene_items_are_prefixes_across_n():
    a, b = scene_items("test", 3, seed=1), scene_items("test", 5, seed=1)
    assert [i.id for i in a] == [i.id for i in b[:3]]
    assert a[0].question == b[0].question and a[0].targets == b[0].targets


def test_evaluate_cli_writes_every_metric(model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert E.main(["--model", str(model_dir), "--split", "test", "--n", "3", "--seed", "0", "--preset", "64",
                   "--max-new-tokens", "2", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "authors' convention" in printed and "compute convention" in printed
    s = json.loads(out.read_text())
    assert s["n"] == 3 and s["preset"] == "64" and s["n_failed"] == 0
    assert set(s["accuracy"]) >= {"all", "color", "shape", "exists"}     # indices 0..2 cycle the types
    assert 0 <= s["accuracy"]["all"] <= 1
    eq = s["equivalent_tokens"]
    assert 0 < eq["authors"] < 576 and 0 < eq["compute"] < 576
    assert 0 < s["flops_ratio"]["image_only"] < 1 and 0 < s["kv_bytes"]["ratio"] < 1
    d = s["decision"]
    assert d["recall_1a_enter"] == pytest.approx(1.0)                    # merging never loses a patch
    layers = [k for k in d if k.startswith("recall_after_L")]
    assert layers == [f"recall_after_L{l}" for l in (0, 1, 2, 3)]
    rec = [d[k] for k in layers]
    assert all(a >= b - 1e-12 for a, b in zip(rec, rec[1:])), "a dropped token never comes back"
    assert d["recall_final_kv"] == pytest.approx(rec[-1])                # last layer caches the survivors
    assert 0 <= d["kept_object_share"] <= 1 and 0 < d["object_area_share"] < 1
    assert 0 <= d["key_on_object"] <= 1
    by_type = s["recall_final_by_type"]                                  # one question of each type here
    assert set(by_type) == {"color", "shape", "exists"}
    assert sum(by_type.values()) / 3 == pytest.approx(d["recall_final_tokens"])
    assert "recall_final_tokens by question type" in printed


def test_unpruned_run_keeps_every_asked_patch(model_dir):
    from analysis.common import load_runner

    runner = load_runner(str(model_dir))
    summary, rows = E.evaluate(runner, "val", 2, 0, "off", max_new_tokens=1, progress=False)
    d = summary["decision"]
    assert d["recall_final_tokens"] == 1.0 and d["recall_final_kv"] == 1.0
    assert d["kept_object_share"] == pytest.approx(d["object_area_share"])
    assert summary["equivalent_tokens"] == {"authors": 576.0, "compute": 576.0}
    assert summary["flops_ratio"]["image_only"] == 1.0
    assert all(r["status"] == "ok" for r in rows)


def test_markdown_table_relates_presets_to_unpruned():
    def summary(acc, eq):
        return {"model": "m", "split": "test", "n": 4, "seed": 0, "max_new_tokens": 2, "recall_note": "r",
                "accuracy": {"all": acc, "color": acc}, "equivalent_tokens": {"authors": eq, "compute": eq},
                "flops_ratio": {"image_only": eq / 576}, "kv_bytes": {"ratio": eq / 576},
                "decision": {"recall_final_tokens": 1.0, "object_area_share": 0.1}, "seconds": {"total_s": 0.1}}
    md = E.markdown_table({"off": summary(0.8, 576.0), "64": summary(0.72, 64.0)})
    assert "| 64 | 0.720 | 90.0% | 0.720 | 64.0 | 64.0 |" in md
    assert "authors' convention" in md
