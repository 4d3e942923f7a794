"""analysis/: batch (resume, shards, failures), same-budget baselines, sweeps, calibration, FLOPs
report, figures — each on a small sample with the tiny random model (machinery, not accuracy)."""

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import batch as B
from analysis import calibrate as C
from analysis import figures as F
from analysis import flops as FL
from analysis import sweep as SW
from analysis.common import load_runner, scene_items

CONFIGS = ["64", "fastv@64"]


@pytest.fixture(scope="module")
def model_dir(tiny_dir, tmp_path_factory):
    """The tiny model, defaults leaving the grid unmerged (random weights merge everything at 0.8)
    so that stage 2 and the baselines have tokens to decide about."""
    from mustdrop.config import ModelDefaults, scaled_prune_layers

    d = tmp_path_factory.mktemp("analysis-model") / "tiny"
    shutil.copytree(tiny_dir, d)
    (d / "mustdrop.json").write_text(json.dumps(
        ModelDefaults(merge_threshold=0.999, prune_layers=scaled_prune_layers(6)).to_json()))
    return d


@pytest.fixture(scope="module")
def runner(model_dir):
    return load_runner(str(model_dir))


class Counting:
    """Wraps the runner and counts model runs, to prove that a resumed batch repeats nothing."""

    def __init__(self, runner):
        self._r, self.calls = runner, 0

    def __getattr__(self, name):
        return getattr(self._r, name)

    def run(self, *a, **kw):
        self.calls += 1
        return self._r.run(*a, **kw)


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    """One un-sharded batch through the command line: 2 scene questions x (off, 64, fastv@64)."""
    out = tmp_path_factory.mktemp("batch-single")
    assert B.main(["--model", str(model_dir), "--out", str(out), "--split", "test", "--n", "2",
                   "--configs", *CONFIGS, "--max-new-tokens", "2"]) == 0
    return out


def test_batch_writes_traces_and_tables(single):
    from mustdrop.trace import Trace

    df = B.read_table(single / "summary.jsonl")
    assert list(df["config"]) == ["off", "64", "fastv@64"] * 2          # vanilla first, shared per sample
    assert (df["status"] == "ok").all()
    assert pd.read_csv(single / "summary.csv").shape[0] == 6
    for col in ("correct", "eq_tokens_authors", "eq_tokens_compute", "flops_ratio_image", "flops_ratio_full",
                "kv_bytes", "total_s", "wall_s", "recall_final_kv", "agrees_vanilla"):
        assert col in df, col
    for p in df["trace"]:
        Trace.load(single / p)
    cfgs = pd.read_csv(single / "configs.csv")
    assert list(cfgs["config"]) == ["off", "64", "fastv@64"]
    assert (single / "run.json").is_file()             # the run folder's settings (mustdrop/dataset/layout.py)
    allowed = {"traces", "summary.csv", "summary.jsonl", "configs.csv", "failed", "run.json"}
    if (single / "summary.parquet").exists():         # written when pyarrow is installed (the lmms extra brings it)
        allowed.add("summary.parquet")
        assert pd.read_parquet(single / "summary.parquet").shape[0] == 6
    assert {p.name for p in single.iterdir()} <= allowed


def test_resumed_batch_repeats_no_work(single, runner):
    counting = Counting(runner)
    before = {p: p.stat().st_mtime_ns for p in (single / "traces").rglob("*.safetensors")}
    df, stats = B.run_batch(counting, scene_items("test", 2), CONFIGS, single, max_new_tokens=2, progress=False)
    assert counting.calls == 0 and stats.ran == 0 and stats.resumed == 6
    assert {p: p.stat().st_mtime_ns for p in (single / "traces").rglob("*.safetensors")} == before
    ref = B.read_table(single / "summary.jsonl")
    assert len(df) == len(ref)


def test_shards_merge_into_the_single_run_table(single, runner, tmp_path):
    for i in range(2):
        B.run_batch(runner, scene_items("test", 2), CONFIGS, tmp_path, max_new_tokens=2, shard_spec=f"{i}/2",
                    progress=False)
    assert not (tmp_path / "summary.jsonl").exists()
    B.main(["merge", "--out", str(tmp_path)])
    merged = B.comparable(B.read_table(tmp_path / "summary.jsonl"))
    one = B.comparable(B.read_table(single / "summary.jsonl"))
    pd.testing.assert_frame_equal(merged, one, check_like=True)


def test_merge_refuses_missing_shards(runner, tmp_path):
    B.run_batch(runner, scene_items("test", 2)[:1], ["off"], tmp_path, max_new_tokens=1, shard_spec="0/2",
                progress=False)
    with pytest.raises(SystemExit, match="missing"):
        B.merge_shards(tmp_path)


def test_failed_sample_is_recorded_and_the_batch_goes_on(runner, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.full((64, 80, 3), 120, np.uint8)).save(imgs / "grey.png")
    (imgs / "broken.png").write_bytes(b"not an image")
    q = tmp_path / "q.jsonl"
    q.write_text("\n".join(json.dumps(r) for r in [
        {"image": "broken.png", "question": "what color is it ?", "answer": "grey"},
        {"image": "grey.png", "question": "what color is it ?", "answer": "Grey."}]) + "\n")
    out = tmp_path / "out"
    assert B.main(["--model", str(runner.model_id), "--out", str(out), "--images", str(imgs), "--questions", str(q),
                   "--configs", "off", "--max-new-tokens", "1"]) == 0
    df = B.read_table(out / "summary.jsonl")
    assert list(df["status"]) == ["failed", "ok"]
    assert "broken.png" in df["error"].iloc[0] or "image" in df["error"].iloc[0].lower()
    assert df["correct"].iloc[1] in (0.0, 1.0) and len(list((out / "failed").rglob("*.json"))) == 1


def test_hf_dataset_input_needs_datasets_clearly(tmp_path):
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed")
    except ImportError:
        pass
    from analysis.common import hf_items
    with pytest.raises(SystemExit, match="pip install datasets"):
        hf_items(tmp_path)


def test_baselines_and_ablations_at_the_same_budget(model_dir, tmp_path):
    from mustdrop.trace import Trace

    assert SW.main(["compare", "--model", str(model_dir), "--out", str(tmp_path), "--preset", "64", "--n", "2",
                    "--max-new-tokens", "1", "--no-figures"]) == 0
    df = B.read_table(tmp_path / "summary.jsonl")
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"][["config", "error"]]
    L, K = 6, 0                                                  # tiny: 6 layers, first prune layer 0
    for _, r in df.iterrows():
        t = Trace.load(tmp_path / r["trace"])
        if r["config"] in ("fastv@64", "random@64"):
            mine = df[(df["id"] == r["id"]) & (df["config"] == "64")]["eq_tokens_compute"].item()
            assert r["budget"] == pytest.approx(mine)            # the MustDrop run's own budget
            assert abs(r["eq_tokens_compute"] - mine) <= 0.5 * (L - K - 1) / L + 1e-9   # whole tokens only
            assert t.meta["stage2"][0]["layer"] == K
        if r["config"] == "pool@64":
            assert t.meta["sequence"]["N0"] == round(math.sqrt(r["budget"])) ** 2
        if r["config"] == "64-no-key_set":
            assert t.meta["stage1b"]["key_tokens"] == []
        if r["config"] == "64-no-filter":
            assert t.meta["vision_tokens_per_layer"] == [t.meta["sequence"]["N0"]] * L
    md = (tmp_path / "compare.md").read_text()
    for word in ("FastV", "random drop", "spatial pooling", "FasterVLM-style", "VisionZip-style", "PyramidDrop-style",
                 "bootstrap", "without merge", "without kv_trim", "accuracy",
                 "recall_final_tokens", "eq_tokens_authors", "flops_ratio_image", "compute convention"):
        assert word in md, word
    ct = pd.read_csv(tmp_path / "compare.csv", dtype={"preset": str})
    assert ct.loc[ct["method"] == "FastV", "budget_gap_max"].item() <= 0.5
    assert list(ct["preset"]) == ["–"] + ["64"] * 11
    assert (ct["failed"] == 0).all(), "no baseline refuses a budget"
    exact = ct[ct["config"].str.contains("@") & ~ct["config"].str.startswith("pool@")]
    assert len(exact) == 5 and (exact["budget_gap_max"] <= 0.5 + 1e-9).all()
    assert (ct["acc_ci95_low"] <= ct["accuracy"]).all() and (ct["accuracy"] <= ct["acc_ci95_high"]).all()
    paths = F.baseline_bars(ct, tmp_path / "bars", model="tiny", preset="64")
    assert [p.suffix for p in paths] == [".png", ".pdf", ".svg"]
    assert "preset 64" in paths[-1].read_text()


def test_threshold_sweep_table_and_tradeoff_figure(runner, tmp_path):
    specs = SW.sweep_specs("thresholds", "64", global_values=[0.001, 0.05], individual_values=[0.01])
    _, table, _ = SW.run_sweep(runner, scene_items("val", 2), specs, tmp_path, max_new_tokens=1, progress=False)
    assert list(table["config"]) == ["off"] + specs
    assert set(table["global_thr"]) == {1.0, 0.001, 0.05}
    lo, hi = table.set_index("global_thr").loc[[0.001, 0.05], "eq_tokens_authors"]
    assert hi <= lo, "a larger global threshold never keeps more tokens"
    for ext in F.FORMATS:
        assert (tmp_path / "figures" / f"tradeoff.{ext}").stat().st_size > 1000
    assert "tiny" in (tmp_path / "figures" / "tradeoff.svg").read_text()


def test_other_sweeps_name_their_configs():
    assert SW.sweep_specs("merge", "64", ["0.7", "0.9"]) == ["64+merge_threshold=0.7", "64+merge_threshold=0.9"]
    assert SW.sweep_specs("layers", "128", ["1,3"]) == ["128+prune_layers=1,3"]
    assert SW.sweep_specs("keep", "64", ["0.2"]) == ["64+key_keep_rate=0.2"]


def test_calibrated_thresholds_reach_the_budget(runner, model_dir, tmp_path):
    from mustdrop.accounting import summarize
    from mustdrop.config import ModelDefaults

    items = scene_items("val", 3)
    res = C.calibrate(runner, items, 200, preset="64", tol=0.04, progress=False)
    assert res["within_tol"], res["history"]
    assert res["global_thr"] / res["individual_thr"] == pytest.approx(0.011 / 0.01)   # ratio kept
    cfg = runner.config_for("64").replace(global_thr=res["global_thr"], individual_thr=res["individual_thr"])
    got = np.mean([summarize(runner.run(i.load_image(), i.question, cfg, max_new_tokens=1).trace)
                   ["equivalent_tokens"]["authors"] for i in items])
    assert abs(got - 200) <= 0.10 * 200
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    path = C.write_defaults(folder, "64", res, "val", runner.num_layers)
    d = ModelDefaults.load(str(folder))
    assert d.presets["64"] == (res["global_thr"], res["individual_thr"])
    assert d.merge_threshold == 0.999 and json.loads(path.read_text())["calibration"]["64"]["target"] == 200
    assert "note" not in json.loads(path.read_text())["calibration"]["64"]
    # --write-nearest: an unreachable budget stores the nearest pair and says so in its record.
    near = dict(res, budget=900.0, within_tol=False, note="unreachable: even the largest thresholds keep more")
    rec = json.loads(C.write_defaults(folder, "192", near, "val", runner.num_layers).read_text())["calibration"]
    assert rec["192"]["note"].startswith("unreachable") and rec["192"]["reached"] == res["reached"]
    assert ModelDefaults.load(str(folder)).presets["192"] == (res["global_thr"], res["individual_thr"])


def test_flops_report_reproduces_published_figures(capsys):
    r7 = FL.report(FL.read_config("analysis/configs/llava-1.5-7b.json"))
    assert round(r7["vanilla"]["flops"]["image_only"] / 1e12, 2) == 3.82            # PDrop: 3.82 TFLOPs
    assert r7["kv_bytes_per_token"] == 524_288 and round(r7["kv_mb_per_token"], 3) == 0.524   # DART
    nx = FL.report(FL.read_config("analysis/configs/llava-next-7b.json"), preset="64")
    assert nx["tokens"] == 2880
    assert nx["vanilla"]["kv_vision_bytes"] / 1e6 == pytest.approx(1509.9, abs=0.1)  # 2880 x 0.524288 MB
    assert 2880 * 0.525 == pytest.approx(1512)                                       # DART's rounding
    assert nx["pruned"]["kv_vision_bytes"] / 1e6 == pytest.approx(167.8, abs=0.1)    # published 168 MB
    r13 = FL.report(FL.read_config("analysis/configs/llava-1.5-13b.json"))
    assert r13["config"]["layers"] == 40 and r13["kv_bytes_per_token"] == 2 * 40 * 40 * 128 * 2
    ex = FL.report(FL.read_config("analysis/configs/llava-1.5-7b.json"), counts=[576, 300, 200, 100, 64],
                   prune_layers=[2, 6, 10, 14])["pruned"]
    assert ex["eq_tokens_authors"] == 147 and ex["eq_tokens_compute"] == 163
    assert FL.main(["--config", "analysis/configs/llava-1.5-7b.json", "--preset", "64"]) == 0
    out = capsys.readouterr().out
    assert "3.82 TFLOPs" in out and "0.524 MB" in out and "estimate" in out


def test_figures_for_a_batch(single, tmp_path):
    paths = F.figures_for_batch(single, tmp_path, samples=1)
    names = {p.name for p in paths}
    for stem in ("tradeoff", "layer_counts", "overlays-64", "overlays-fastv@64"):
        for ext in F.FORMATS:
            assert f"{stem}.{ext}" in names
    svg = (tmp_path / "overlays-64.svg").read_text()
    assert "preset 64" in svg and "tiny" in svg
    assert "convention" in (tmp_path / "layer_counts.svg").read_text()


def test_auto_baseline_layer_moves_earlier_only_when_the_budget_needs_it():
    from types import SimpleNamespace

    from analysis.common import auto_baseline_layer
    from mustdrop import stages

    r = SimpleNamespace(defaults=SimpleNamespace(prune_layers=(1, 2, 3, 4)), grid=24, num_layers=8)
    assert auto_baseline_layer(r, 400) == 1                 # the first prune layer, as FastV's K
    assert auto_baseline_layer(r, 100) == 0                 # 2 x 576 / 8 = 144 > 100: drop after layer 0
    assert auto_baseline_layer(r, 50) == 0                  # unreachable: the adapter will refuse it
    for b in (100, 144, 300):
        k = auto_baseline_layer(r, b)
        stages.keep_count_for_budget(b, 576, k, 8)          # reachable at the K chosen


def test_tables_without_traces(runner, tmp_path):
    df, stats = B.run_batch(runner, scene_items("test", 1), ["off"], tmp_path, max_new_tokens=1, progress=False,
                            save_traces=False)
    assert stats.ran == 1 and not (tmp_path / "traces").exists()
    assert B.read_table(tmp_path / "summary.jsonl")["status"].tolist() == ["ok"]


def test_shard_auto_reads_launcher_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(k, raising=False)
    assert B.resolve_shard("1/3") == ("1/3", None)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert B.resolve_shard("auto")[0] == "2/4"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert B.resolve_shard("auto")[0] == "1/2"
    from analysis.common import shard
    items = scene_items("test", 5)
    parts = [shard(items, f"{i}/2") for i in range(2)]
    assert sorted(it.order for p in parts for it in p) == list(range(5))
    with pytest.raises(ValueError):
        shard(items, "2/2")
