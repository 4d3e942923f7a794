"""The stage functions reproduce every golden vector computed by the authors' own functions.

The folder is MUSTDROP_GOLDEN_DIR (default ../shared/golden). Every merge_*, keyset_*, filter_* and
kv_* file found there is checked, whatever their number. With MUSTDROP_GOLDEN_DIR set (as CI sets
it), a missing or empty folder is a failure, not a skip. Without it, a clone that has no
../shared/golden skips with a message saying how to point the tests at the vectors.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mustdrop import stages

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR_GIVEN = bool(os.environ.get("MUSTDROP_GOLDEN_DIR"))
GOLDEN_DIR = Path(os.environ.get("MUSTDROP_GOLDEN_DIR") or ROOT.parent / "shared" / "golden")
PREFIXES = ("merge", "keyset", "filter", "kv")


def golden_files():
    if not GOLDEN_DIR.is_dir():
        return []
    return sorted(p for p in GOLDEN_DIR.glob("*.npz") if p.name.split("_")[0] in PREFIXES)


def test_golden_folder_is_not_empty():
    if not GOLDEN_DIR_GIVEN and not GOLDEN_DIR.exists():
        pytest.skip(f"no golden vectors: {GOLDEN_DIR} does not exist; set MUSTDROP_GOLDEN_DIR to the folder "
                    "of the authors' golden vectors (merge_*/keyset_*/filter_*/kv_*.npz) to check them")
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


def _run_folder_check(test_file: Path, env_dir: str | None, tmp_path: Path):
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "MUSTDROP_GOLDEN_DIR"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if env_dir is not None:
        env["MUSTDROP_GOLDEN_DIR"] = env_dir
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           f"{test_file}::test_golden_folder_is_not_empty"],
                          cwd=test_file.parent.parent, env=env, capture_output=True, text=True, timeout=120)


def _clone_without_shared(tmp_path: Path) -> Path:
    """A copy of this test file in a checkout that has no ../shared beside it, as a fresh clone."""
    tests = tmp_path / "clone" / "tests"
    tests.mkdir(parents=True)
    target = tests / "test_golden.py"
    target.write_text(Path(__file__).read_text())
    return target


def test_fresh_clone_without_shared_skips_naming_the_variable(tmp_path):
    out = _run_folder_check(_clone_without_shared(tmp_path), None, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 skipped" in out.stdout and "MUSTDROP_GOLDEN_DIR" in out.stdout, out.stdout


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_given_golden_dir_missing_or_empty_fails(tmp_path, kind):
    folder = tmp_path / "golden"
    if kind == "empty":
        folder.mkdir()
    out = _run_folder_check(_clone_without_shared(tmp_path), str(folder), tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "no golden files" in out.stdout, out.stdout
