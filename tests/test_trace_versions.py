"""Every trace schema version keeps replaying: one fixture file per version (tests/fixtures/), each
read into the explicit geometry of the current version (each crop's (rows, cols) grid; the patches
each token covers, with weights), and drawn pixel for pixel as the version before drew it."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mustdrop import vis
from mustdrop.trace import READABLE_VERSIONS, RENAMED_ARRAYS, SCHEMA_VERSION, Trace, TraceError, equal_weights

FIXTURES = Path(__file__).parent / "fixtures"
TWINS = ["llava-64", "llava-off", "llava-next-64"]       # the same run, written by v1 code and by v2 code


def version_of(schema: str) -> str:
    return "v" + schema.rsplit("/", 1)[1]


def test_every_readable_version_has_fixtures():
    for schema in READABLE_VERSIONS:
        files = sorted(FIXTURES.glob(f"{version_of(schema)}-*.safetensors"))
        assert files, f"no fixture of {schema}"
        for f in files:
            assert json.loads(_header(f))["schema"] == schema, f.name


def _header(path):
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
        return f.metadata()["mustdrop_trace"]


@pytest.mark.parametrize("name", TWINS)
def test_v1_files_read_into_the_explicit_geometry(name):
    t = Trace.load(FIXTURES / f"v1-{name}.safetensors")
    assert t.meta["schema"] == SCHEMA_VERSION and t.meta["upgraded_from"] == "mustdrop-trace/1"
    G = t.meta["model"]["vision"]["grid"]
    assert [t.crop_grid(c) for c in range(t.n_crops)] == [(G, G)] * t.n_crops
    np.testing.assert_array_equal(t.arrays["tokens.weights"], equal_weights(t.arrays["tokens.groups"]))


@pytest.mark.parametrize("name", TWINS)
def test_v1_patch_maps_rebuilt_from_the_geometry_equal_those_the_v1_code_wrote(name):
    """The maps every view draws from, rebuilt on load through crop grids and offsets, equal the
    ones stored in the file by the code that wrote it (which assumed square G x G crops)."""
    stored = load_file(str(FIXTURES / f"v1-{name}.safetensors"))
    t = Trace.load(FIXTURES / f"v1-{name}.safetensors")
    maps = {k: v for k, v in stored.items() if k.startswith("patch.")}
    assert maps
    for k, v in maps.items():
        for old, new in RENAMED_ARRAYS.items():
            k = k.replace(old.split(".", 1)[1], new.split(".", 1)[1])
        np.testing.assert_array_equal(t.arrays[k], v, err_msg=k)


@pytest.mark.parametrize("name", TWINS)
def test_v2_twin_records_the_same_decisions_and_its_geometry(name):
    old = Trace.load(FIXTURES / f"v1-{name}.safetensors")
    new = Trace.load(FIXTURES / f"v2-{name}.safetensors")
    assert "upgraded_from" not in new.meta
    for k in ("stage2", "vision_tokens_per_layer", "sequence", "stage1b"):
        assert new.meta[k] == old.meta[k], k
    assert [c["grid"] for c in new.meta["crops"]] == [c["grid"] for c in old.meta["crops"]]
    for k in old.arrays:     # decisions exactly; scores to float32 rounding (the scoring kernels were
        if old.arrays[k].dtype.kind == "f":      # rewritten between the two writers, same decisions)
            np.testing.assert_allclose(new.arrays[k], old.arrays[k], rtol=1e-5, err_msg=k)
        else:
            np.testing.assert_array_equal(new.arrays[k], old.arrays[k], err_msg=k)
    w, g = new.arrays["tokens.weights"], new.arrays["tokens.groups"]
    covers = (g >= 0).any(1)
    np.testing.assert_allclose(w[covers].sum(1), 1, rtol=1e-6)


def _overlays(t):
    out = {}
    for c in range(t.n_crops):
        geom = vis.geometry(t, target=240, crop=c)
        base = vis.base_canvas(None, t, geom, crop=c)
        out[f"merge{c}"] = vis.merge_overlay(t, base=base, crop=c, selected=(1, 2))
        if t.has_patch("key_score", c):
            out[f"key{c}"] = vis.key_overlay(t, base=base, crop=c)
        for layer in t.prune_layers:
            out[f"filter{c}.{layer}"] = vis.filter_overlay(t, layer, base=base, crop=c)
        for layer in range(t.num_layers):
            out[f"kv{c}.{layer}"] = vis.kv_overlay(t, layer, base=base, crop=c)
        out[f"blank{c}"] = vis.blank_overlay(t, base, crop=c)
    return out


@pytest.mark.parametrize("name", TWINS)
def test_v1_and_v2_twins_draw_the_same_pixels(name):
    a = _overlays(Trace.load(FIXTURES / f"v1-{name}.safetensors"))
    b = _overlays(Trace.load(FIXTURES / f"v2-{name}.safetensors"))
    assert a.keys() == b.keys() and len(a) > 3
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _forged(tmp_path, meta_change=None, array_change=None):
    t = Trace.load(FIXTURES / "v2-llava-next-64.safetensors")
    meta, arrays = json.loads(json.dumps(t.meta)), dict(t.arrays)
    if meta_change:
        meta_change(meta)
    if array_change:
        array_change(arrays)
    return Trace(meta, arrays).save(tmp_path / "forged.safetensors")


@pytest.mark.parametrize("change, message", [
    (lambda m: m["crops"][1].__setitem__("grid", [24, 25]), "does not match"),
    (lambda m: m["crops"][0].__setitem__("grid", [24]), r"crops\[0\].grid must list 2 entries"),
    (lambda m: m["crops"][0].pop("grid"), r"lacks the required field crops\[0\].grid"),
    (lambda m: m["crops"][0].__setitem__("grid", [0, 24]), "out of range"),
    (lambda m: m["crops"][0].__setitem__("grid", [24, True]), "must be an integer"),
    (lambda m: m["crops"][0].__setitem__("grid", [5000, 24]), "out of range"),
    (lambda m: m.__setitem__("crops", m["crops"] * 20), "crops lists 100 crops"),
])
def test_bad_geometry_is_refused(tmp_path, change, message):
    with pytest.raises(TraceError, match=message):
        Trace.load(_forged(tmp_path, meta_change=change))


@pytest.mark.parametrize("change, message", [
    (lambda w, g: w.__setitem__((0, 0), 1.5), r"shares in \[0, 1\]"),
    (lambda w, g: w.__setitem__((0, 0), np.nan), r"shares in \[0, 1\]"),
    (lambda w, g: w.__setitem__(np.nonzero(g < 0)[0][0:1], 0.5), "padding"),
])
def test_bad_weights_are_refused(tmp_path, change, message):
    def forge(a):
        w = a["tokens.weights"].copy()
        g = a["tokens.groups"]
        if message == "padding":
            r, c = np.nonzero(g < 0)
            w[r[0], c[0]] = 0.5
        else:
            change(w, g)
        a["tokens.weights"] = w
    with pytest.raises(TraceError, match=message):
        Trace.load(_forged(tmp_path, array_change=forge))


def test_weights_of_another_shape_are_refused(tmp_path):
    with pytest.raises(TraceError, match="tokens.weights must be a float"):
        Trace.load(_forged(tmp_path, array_change=lambda a: a.__setitem__("tokens.weights", a["tokens.weights"][:, :1])))


def test_a_non_square_crop_is_drawn_rows_by_cols(tmp_path):
    """A v2 trace whose only crop is 2 x 3 patches (as a Qwen-style host writes): the maps and the
    canvas follow (rows, cols), each token's region is where its patches are."""
    t = Trace.load(FIXTURES / "v2-llava-off.safetensors")
    meta, arrays = _tiny_non_square(t)
    back = Trace.load(Trace.build(meta, arrays).save(tmp_path / "ns.safetensors"))
    assert back.crop_grid(0) == (2, 3) and back.patch("token").shape == (2, 3)
    np.testing.assert_array_equal(back.patch("token"), [[0, 0, 1], [2, 3, 4]])
    geom = vis.geometry(back, target=60)
    img = vis.filter_overlay(back, back.prune_layers[0], base=vis.base_canvas(None, back, geom))
    assert img.shape[:2] == (2 * geom.cell, 3 * geom.cell)
    codes = vis.decode_categories(img, geom, vis.STATUS_COLOURS)
    assert codes.shape == (2, 3)
    assert vis.original_box(back, 1, 2) is not None


def _tiny_non_square(t):
    meta = json.loads(json.dumps(t.meta))
    meta["crops"] = [dict(meta["crops"][0], grid=[2, 3], merged_windows=[])]
    meta["crops"][0]["mapping"] = dict(meta["crops"][0]["mapping"], processed=[42, 28])
    meta["sequence"].update(N=6, N0=5)
    meta["stage1a"].update(window=1, merged_windows=[])
    meta["stage1b"]["key_tokens"] = [1]
    S, T, L = meta["sequence"]["S"], meta["sequence"]["T"], meta["model"]["llm"]["num_layers"]
    meta["stage2"] = [{"layer": 1, "entering": 5, "kept": 3, "dropped": 2}]
    meta["vision_tokens_per_layer"] = [5, 5] + [3] * (L - 2)
    arrays = {"tokens.groups": np.array([[0, 1], [2, -1], [3, -1], [4, -1], [5, -1]], np.int64),
              "tokens.weights": np.array([[0.5, 0.5], [1, 0], [1, 0], [1, 0], [1, 0]], np.float32),
              "stage2.L1.tokens": np.arange(5, dtype=np.int64),
              "stage2.L1.global_share": np.linspace(0, 1, 5).astype(np.float32),
              "stage2.L1.individual_max": np.linspace(0, 1, 5).astype(np.float32),
              "stage2.L1.status": np.array([4, 3, 4, 0, 1], np.int8)}
    kept = np.concatenate([np.arange(S), S + np.array([1, 3, 4]), S + 5 + np.arange(T)])
    entries = []
    for layer in range(L):
        arrays[f"kv.L{layer}"] = np.arange(S + 5 + T, dtype=np.int64) if layer < 1 else kept.astype(np.int64)
        entries.append(int(arrays[f"kv.L{layer}"].size))
    meta["kv"].update(entries_per_layer=entries, vision_entries_per_layer=[5] + [3] * (L - 1))
    return meta, arrays
