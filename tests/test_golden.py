"""The stage functions reproduce every golden vector computed by the authors' own functions.

The folder is MUSTDROP_GOLDEN_DIR (default ../shared/golden). Every merge_*, keyset_*, filter_* and
kv_* file found there is checked, whatever their number; an empty folder is a failure, not a skip.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mustdrop import stages

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("MUSTDROP_GOLDEN_DIR", ROOT.parent / "shared" / "golden"))
PREFIXES = ("merge", "keyset", "filter", "kv")


def golden_files():
    if not GOLDEN_DIR.is_dir():
        return []
    return sorted(p for p in GOLDEN_DIR.glob("*.npz") if p.name.split("_")[0] in PREFIXES)


def test_golden_folder_is_not_empty():
    files = golden_files()
    assert files, f"no golden files (merge_*/keyset_*/filter_*/kv_*.npz) in {GOLDEN_DIR}"
    assert {p.name.split("_")[0] for p in files} == set(PREFIXES), "every stage needs golden files"


def _ints(a):
    return np.asarray(a, dtype=np.int64)


def check_merge(d):
    res = stages.local_spatial_merge(torch.from_numpy(d["tokens"]), int(d["grid"]), int(d["window"]),
                                     float(d["threshold"]))
    np.testing.assert_allclose(res.similarity.numpy(), d["similarity"], atol=1e-5, rtol=0)
    assert res.merged_windows.numel() == int(d["num_merged_windows"])
    np.testing.assert_array_equal(_ints(res.merged_windows), _ints(d["merged_windows"]))
    assert res.tokens.shape == d["out_tokens"].shape
    np.testing.assert_allclose(res.tokens.numpy(), d["out_tokens"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(_ints(res.groups), _ints(d["out_groups"]))


def check_keyset(d):
    key = stages.key_token_set(torch.from_numpy(d["cls_attn"]), float(d["keep_rate"]))
    np.testing.assert_array_equal(_ints(key), _ints(d["key_tokens"]))


def check_filter(d):
    res = stages.dual_attention_filter(torch.from_numpy(d["attn"]), float(d["global_thr"]),
                                       float(d["individual_thr"]), torch.from_numpy(d["key_tokens"]))
    np.testing.assert_array_equal(_ints(res.kept), _ints(d["kept"]))
    np.testing.assert_array_equal(_ints(res.key_after), _ints(d["key_after"]))
    assert res.dropped_by_filter_only == int(d["dropped_by_filter_only"])


def check_kv(d):
    prune = [int(x) for x in d["prune_layers"]]
    kept = [d[f"kept_{i}"] for i in range(len(prune))]
    out = stages.kv_keep_indices(int(d["num_layers"]), prune, int(d["S"]), int(d["T"]), int(d["N0"]), kept)
    assert len(out) == int(d["num_layers"])
    for layer, idx in enumerate(out):
        np.testing.assert_array_equal(_ints(idx), _ints(d[f"kv_{layer}"]), err_msg=f"layer {layer}")


CHECKS = {"merge": check_merge, "keyset": check_keyset, "filter": check_filter, "kv": check_kv}


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.name)
def test_golden(path):
    with np.load(path, allow_pickle=False) as d:
        CHECKS[path.name.split("_")[0]](d)
