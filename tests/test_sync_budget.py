"""The MustDrop hot path's budget of device work, counted (not timed) on CPU so that it cannot creep
back: a run reads back from the device once per prune layer (the kept count) plus once for stage
1a's merged count, and dispatches few aten ops beyond the vanilla run's (benchmarks/bench_core.py
prints the same figures)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_core", ROOT / "benchmarks" / "bench_core.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()
N_PRUNE = len(bench.COUNTED_PRUNE_LAYERS)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return bench.build_counted_runner(tmp_path_factory.mktemp("counted") / "tiny32")


@pytest.fixture(scope="module")
def one_token(runner):
    return bench.count_runs(runner, max_new_tokens=1)


def test_counted_run_drops_at_every_prune_layer(one_token):
    drops = one_token["mustdrop"]["stage2"]
    assert [layer for layer, _, _ in drops] == list(bench.COUNTED_PRUNE_LAYERS)
    assert all(kept < entering for _, entering, kept in drops)
    assert one_token["mustdrop"]["merged_windows"] > 0


def test_one_read_back_per_prune_layer_plus_the_merged_count(one_token):
    van, md = one_token["vanilla"], one_token["mustdrop"]
    assert md["syncs"] <= van["syncs"] + N_PRUNE + 1, (van["sync_ops"], md["sync_ops"])
    assert md["sync_ops"].get("nonzero", 0) <= N_PRUNE


def test_stages_2_and_3_read_back_only_the_kept_counts(runner):
    """Without stage 1a (whose merged count is a dynamic shape of its own) a MustDrop run reads
    back exactly one value per prune layer more than the vanilla run."""
    r = bench.count_runs(runner, max_new_tokens=1, merge=False, warm_up=False)
    assert r["extra_syncs"] <= N_PRUNE, (r["vanilla"]["sync_ops"], r["mustdrop"]["sync_ops"])


def test_aten_ops_budget(runner, one_token):
    # prefill only: the 4 drops, the scoring, the filter and the KV trim on top of 32 layers
    assert one_token["ops_ratio"] <= 1.14, one_token["ops_ratio"]
    # a decode step costs the same as vanilla's but for a few slices of precomputed positions
    four = bench.count_runs(runner, max_new_tokens=4, warm_up=False)
    assert four["ops_ratio"] <= 1.05, four["ops_ratio"]
    assert four["extra_syncs"] == one_token["extra_syncs"]
    per_step = (four["mustdrop"]["ops"] - one_token["mustdrop"]["ops"]) / 3
    vanilla_step = (four["vanilla"]["ops"] - one_token["vanilla"]["ops"]) / 3
    assert per_step <= vanilla_step + 8, (per_step, vanilla_step)


def test_one_transfer_packing_gives_the_arrays_back():
    """The trace's one device-to-host transfer packs tensors of every dtype as bytes; forced on
    CPU here, it must give each array back exactly, shared tensors once."""
    from mustdrop.adapters.llava import _to_host
    shared = torch.arange(7)
    tensors = {"f": torch.rand(3, 5), "i8": torch.tensor([1, -2, 3], dtype=torch.int8), "b": torch.rand(4) > 0.5,
               "i64": shared, "again": shared, "scalar": torch.tensor(0.25), "empty": torch.zeros(0, dtype=torch.long),
               "half": torch.rand(2, 3).half(), "strided": torch.rand(4, 6)[:, ::2]}
    packed, direct = _to_host(tensors, pack=True), _to_host(tensors, pack=False)
    for name, t in tensors.items():
        assert packed[name].dtype == direct[name].dtype, name
        np.testing.assert_array_equal(packed[name], direct[name], err_msg=name)
        np.testing.assert_array_equal(packed[name], t.numpy(), err_msg=name)
