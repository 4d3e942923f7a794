"""analysis.batch on every model family the library hosts, loaded as a user's command loads it
(analysis.common.load_runner, from a checkpoint folder): tiny copies of the published Qwen2.5-VL,
Qwen2-VL and LLaVA-OneVision checkpoints (tests/published). Before, load_runner built the LLaVA-1.5
runner for any folder, baselines asked Qwen for positions it refuses, OneVision's FastV traces could
not be saved (their plan counts newline tokens), and the scene world's 24 x 24 masks were refused on
OneVision's 27 x 27 base crop.

The scene's objects are scored on the trace's own grid, through its mapping."""

import numpy as np
import pytest

from analysis.batch import run_batch
from analysis.common import load_runner, scene_items
from mustdrop.dataset import TraceSet
from mustdrop.dataset.objects import scene_coverage

from test_published_new_families import MODELS, PUBLISHED

SPECS = ["off", "64", "fastv@64"]


@pytest.mark.parametrize("name", list(MODELS))
def test_a_batch_runs_and_opens_on_each_new_family(name, tmp_path):
    from mustdrop.testing import build_published_tiny_any

    folder = build_published_tiny_any(tmp_path / "model", PUBLISHED / name, text_layers=4)
    runner = load_runner(str(folder))
    assert runner.family == ("qwen_vl" if "Qwen" in name else "llava_onevision")
    items = scene_items("test", 2)
    rows, _ = run_batch(runner, items, SPECS, tmp_path / "run", max_new_tokens=2, progress=False)
    assert list(rows["status"]) == ["ok"] * 6, rows[["id", "config", "error"]].to_string()
    off = rows[rows["config"] == "off"]
    assert (off["recall_1a_enter"] == 1.0).all() and (off["recall_final_kv"] == 1.0).all()
    ts = TraceSet.open(tmp_path / "run")
    for item in items:
        for spec in SPECS:
            t = ts.trace(item.id, spec)
            assert t.meta["config"]["preset"] == spec
        fastv = ts.trace(item.id, "fastv@64")
        assert fastv.meta["config"]["positions"] == runner.defaults.positions
        assert fastv.meta["vision_tokens_per_layer"][-1] < fastv.meta["baseline"]["plan"]["n0"]
        # the asked objects on the trace's grid hold their pixels: coverage x each patch's share of
        # the original image adds up to the objects' pixel count (within the patch-edge rounding)
        cov = scene_coverage(fastv, item.scene, item.targets)
        rows_, cols = fastv.crop_grid(0)
        assert cov.shape == (rows_, cols)
        h, w = item.scene.image.shape[:2]
        pixels = np.logical_or.reduce([item.scene.objects[i].pixel_mask for i in item.targets]).sum()
        assert abs(cov.sum() * (h / rows_) * (w / cols) - pixels) <= 0.1 * pixels
