"""Config validation, model-folder defaults, and trace save / load / validation."""

import json
import math

import numpy as np
import pytest

from mustdrop import stages
from mustdrop.config import MustDropConfig, ModelDefaults, scaled_prune_layers
from mustdrop.trace import Trace, TraceError


def test_reference_defaults_and_presets():
    c = MustDropConfig()
    assert (c.window, c.merge_threshold, c.key_keep_rate, c.prune_layers) == (3, 0.8, 0.08, (2, 6, 10, 14))
    assert c.positions == "reference"
    for name, th in {"192": (0.001, 0.001), "128": (0.0012, 0.001), "64": (0.011, 0.01)}.items():
        p = MustDropConfig.preset_for(name)
        assert (p.global_thr, p.individual_thr) == th and p.preset == name
    off = MustDropConfig.preset_for("off")
    assert not off.enabled


@pytest.mark.parametrize("kw, msg", [
    ({"global_thr": math.nan}, "global threshold"), ({"individual_thr": -0.1}, "individual threshold"),
    ({"global_thr": 1.5}, "global threshold"), ({"key_keep_rate": math.inf}, "key keep rate"),
    ({"window": 0}, "window"), ({"prune_layers": (6, 2)}, "ascending"), ({"prune_layers": (2, 2)}, "ascending"),
    ({"positions": "sideways"}, "positions"), ({"merge_threshold": math.nan}, "merge_threshold"),
])
def test_bad_knobs_are_refused_with_their_name(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MustDropConfig(**kw)


@pytest.mark.parametrize("grid, window, msg", [(24, 5, "does not divide"), (24, 48, "larger than"), (24, 1, ">= 2")])
def test_bad_grid_window(grid, window, msg):
    with pytest.raises(ValueError, match=msg):
        stages.check_grid(grid, window)


def test_prune_layers_beyond_depth():
    with pytest.raises(ValueError, match="prune layer 8"):
        MustDropConfig(prune_layers=(2, 8)).validate_for(24, 8)


def test_model_folder_defaults_are_read(tmp_path):
    (tmp_path / "mustdrop.json").write_text(json.dumps({
        "schema": "mustdrop-defaults/1", "window": 3, "merge_threshold": 0.8, "key_keep_rate": 0.08,
        "prune_layers": [1, 2, 3, 4], "presets": {"64": {"global_thr": 0.02, "individual_thr": 0.03}}}))
    c = MustDropConfig.for_model(str(tmp_path), "64")
    assert c.prune_layers == (1, 2, 3, 4) and (c.global_thr, c.individual_thr) == (0.02, 0.03)
    assert MustDropConfig.for_model(str(tmp_path), "192").global_thr == 0.001
    (tmp_path / "mustdrop.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        ModelDefaults.load(str(tmp_path))


def test_scaled_prune_layers():
    assert scaled_prune_layers(32) == (2, 6, 10, 14)
    assert all(0 <= x < 8 for x in scaled_prune_layers(8))


@pytest.fixture(scope="module")
def trace(tiny):
    from conftest import half_textured_image
    return tiny.run(half_textured_image(), "what colour is the square?", tiny.config_for("64"), max_new_tokens=3).trace


def test_trace_roundtrip(trace, tmp_path):
    path = trace.save(tmp_path / "t.safetensors")
    back = Trace.load(path)
    assert back.meta == json.loads(json.dumps(trace.meta))
    for k, v in trace.arrays.items():
        np.testing.assert_array_equal(back.arrays[k], v, err_msg=k)
    assert not list(tmp_path.glob(".trace-*")), "no temporary file left behind"


def test_trace_readable_without_our_code(trace, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file
    path = trace.save(tmp_path / "t.safetensors")
    with safe_open(str(path), "np") as f:
        meta = json.loads(f.metadata()["mustdrop_trace"])
    assert meta["schema"] == "mustdrop-trace/2"
    assert load_file(str(path))["patch.kv_cached"].shape == (trace.num_layers, 24, 24)


def test_patch_maps_agree_with_token_decisions(trace):
    G = trace.grid
    groups = trace.arrays["tokens.groups"]
    token = trace.patch("token")
    for tok, row in enumerate(groups):
        for p in row[row >= 0]:
            assert token[p // G, p % G] == tok
    key = trace.patch("key")
    assert key.sum() >= len(trace.meta["stage1b"]["key_tokens"])
    first = trace.prune_layers[0]
    status = trace.patch(f"stage2.L{first}.status")
    dropped_tokens = trace.arrays[f"stage2.L{first}.tokens"][trace.arrays[f"stage2.L{first}.status"] == stages.DROPPED]
    assert set(np.unique(token[status == stages.DROPPED])) == set(dropped_tokens.tolist())
    assert not (key.astype(bool) & (status == stages.DROPPED)).any(), "key tokens are never dropped"
    # the last layer's cache holds exactly the patches of the surviving tokens
    final_tokens = trace.arrays[f"kv.L{trace.num_layers - 1}"] - trace.meta["sequence"]["S"]
    final_tokens = final_tokens[(final_tokens >= 0) & (final_tokens < trace.meta["sequence"]["N0"])]
    assert set(np.unique(token[trace.patch("kv_cached")[-1] == 1])) == set(final_tokens.tolist())


def corrupt(trace, tmp_path, meta_change=None, array_change=None):
    meta = json.loads(json.dumps(trace.meta))
    arrays = dict(trace.arrays)
    if meta_change:
        meta_change(meta)
    if array_change:
        array_change(arrays)
    t = Trace(meta, arrays)
    path = tmp_path / "bad.safetensors"
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path),
              metadata={"mustdrop_trace": json.dumps(t.meta)})
    return path


@pytest.mark.parametrize("meta_change, array_change, msg", [
    (lambda m: m.__setitem__("schema", "mustdrop-trace/99"), None, "unknown trace schema"),
    (lambda m: m["stage1b"].__setitem__("key_tokens", [10**6]), None, "outside"),
    (lambda m: m.pop("generation"), None, "required field"),
    (None, lambda a: a.__setitem__("kv.L0", np.array([10**7], np.int64)), "kv.L0"),
    (None, lambda a: a.__setitem__("tokens.groups", np.zeros((3, 9), np.int64)), "tokens.groups"),
    (None, lambda a: a.__setitem__("patch.key", np.zeros((5, 5), np.uint8)), "patch.key"),
])
def test_bad_traces_are_refused(trace, tmp_path, meta_change, array_change, msg):
    with pytest.raises(TraceError, match=msg):
        Trace.load(corrupt(trace, tmp_path, meta_change, array_change))


def test_non_trace_files_are_refused(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(TraceError, match="not a MustDrop trace"):
        Trace.load(junk)
    with pytest.raises(TraceError, match="not found"):
        Trace.load(tmp_path / "missing.safetensors")


def test_trace_write_is_atomic(trace, tmp_path, monkeypatch):
    """A crash while writing leaves neither a half-written trace nor a temporary file."""
    import safetensors.numpy as stnp
    path = tmp_path / "t.safetensors"
    trace.save(path)
    good = path.read_bytes()

    def crash(arrays, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(stnp, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        trace.save(path)
    assert path.read_bytes() == good, "the previous trace is untouched"
    with pytest.raises(OSError):
        trace.save(tmp_path / "new.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_filter_without_prune_layers_is_refused():
    with pytest.raises(ValueError, match="no prune layer"):
        MustDropConfig(prune_layers=()).validate_for(24, 8)


def test_forged_patch_maps_are_rebuilt_on_load(trace, tmp_path):
    forged = Trace(json.loads(json.dumps(trace.meta)), dict(trace.arrays))
    forged.arrays["patch.key"] = np.ones_like(trace.arrays["patch.key"])
    back = Trace.load(forged.save(tmp_path / "forged.safetensors"))
    np.testing.assert_array_equal(back.arrays["patch.key"], trace.arrays["patch.key"])


def test_token_pieces_concatenate_to_the_text(trace, tiny):
    gen = trace.meta["generation"]
    assert "".join(gen["tokens"]) == tiny.processor.tokenizer.decode(gen["token_ids"])


# ------------------------------------------------------------------------------ schema and queries
FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def mixed_trace(tiny, trace):
    """A run whose thresholds are the median scores at the first prune layer (read off ``trace``: the
    same image and question, so the same scores there), so that every reason occurs."""
    first = trace.meta["stage2"][0]["layer"]
    g = float(np.median(trace.arrays[f"stage2.L{first}.global_share"]))
    i = float(np.median(trace.arrays[f"stage2.L{first}.individual_max"]))
    from conftest import half_textured_image
    cfg = tiny.config_for("64").replace(global_thr=g, individual_thr=i)
    return tiny.run(half_textured_image(), "what colour is the square?", cfg, max_new_tokens=3).trace


def test_each_status_name_says_why_by_the_scores_beside_it(mixed_trace):
    """What the inspector tells a user about a token (the name of its stage-2 status) agrees with the
    two scores stored beside it, the run's thresholds and the key set; and a token named dropped is
    gone at the next prune layer, a kept one is there."""
    from mustdrop.trace import STATUS_NAMES

    trace = mixed_trace
    cfg, keys = trace.meta["config"], set(trace.meta["stage1b"]["key_tokens"])
    layers = [s["layer"] for s in trace.meta["stage2"]]
    seen = set()
    for i, l in enumerate(layers):
        a = trace.arrays
        toks, status = a[f"stage2.L{l}.tokens"], a[f"stage2.L{l}.status"]
        low_g = a[f"stage2.L{l}.global_share"] < np.float32(cfg["global_thr"])
        low_i = a[f"stage2.L{l}.individual_max"] < np.float32(cfg["individual_thr"])
        for t, code, g, ind in zip(toks.tolist(), status.tolist(), low_g, low_i):
            name = STATUS_NAMES[code]
            want = ("kept: both" if not g and not ind else "kept: global" if not g else
                    "kept: individual" if not ind else "kept: key" if t in keys else "dropped")
            assert name.startswith(want), (l, t, name, want)
            seen.add(want)
        if i + 1 < len(layers):
            kept = toks[np.array([not STATUS_NAMES[c].startswith("dropped") for c in status.tolist()], bool)]
            assert a[f"stage2.L{layers[i + 1]}.tokens"].tolist() == kept.tolist()
    assert seen == {"dropped", "kept: both", "kept: global", "kept: individual", "kept: key"}, seen


@pytest.mark.parametrize("name", ["v1-llava-64", "v1-llava-off", "v1-llava-next-64"])
def test_traces_written_before_the_rename_load(name):
    t = Trace.load(FIXTURES / f"{name}.safetensors")
    assert "stage1b.cls_attention" not in t.arrays and not any("cls_attention" in k for k in t.arrays)
    assert ("stage1b.key_score" in t.arrays) == t.meta["stage1b"]["enabled"]


def test_old_key_score_is_read_under_its_new_name():
    from safetensors.numpy import load_file

    stored = load_file(str(FIXTURES / "v1-llava-64.safetensors"))
    t = Trace.load(FIXTURES / "v1-llava-64.safetensors")
    np.testing.assert_array_equal(t.arrays["stage1b.key_score"], stored["stage1b.cls_attention"])
    np.testing.assert_array_equal(t.patch("key_score"), stored["patch.cls_attention"])


def test_old_trace_saved_again_uses_the_new_name(tmp_path):
    t = Trace.load(FIXTURES / "v1-llava-64.safetensors")
    back = Trace.load(t.save(tmp_path / "again.safetensors"))
    from safetensors.numpy import load_file
    assert "stage1b.key_score" in load_file(str(tmp_path / "again.safetensors"))
    assert back.meta == t.meta


def test_new_runs_record_the_key_score(trace):
    assert "stage1b.key_score" in trace.arrays and "stage1b.cls_attention" not in trace.arrays


def test_inconsistent_records_are_a_trace_error(trace, tmp_path):
    """Records the patch maps need (here: the stage-1a window) are checked before the maps are built:
    a message naming the field, not a KeyError."""
    path = corrupt(trace, tmp_path, meta_change=lambda m: m["stage1a"].pop("window"))
    with pytest.raises(TraceError, match="stage1a.window"):
        Trace.load(path)


def test_derived_maps_not_rebuilt_are_dropped_on_load(trace, tmp_path):
    path = corrupt(trace, tmp_path, array_change=lambda a: a.__setitem__("patch.stale", np.zeros((24, 24), np.uint8)))
    assert "patch.stale" not in Trace.load(path).arrays


def test_stage2_layer_rule(trace):
    prune = trace.prune_layers
    assert trace.stage2_layer_for(None) == prune[0] == trace.start_layer
    assert trace.stage2_layer_for(prune[1]) == prune[1]
    assert trace.stage2_layer_for(trace.num_layers - 1) == prune[-1]


def test_stage2_layer_rule_before_the_first_prune_layer():
    t = Trace.load(FIXTURES / "v1-llava-64.safetensors")
    meta = json.loads(json.dumps(t.meta))
    meta["stage2"] = meta["stage2"][2:]                # prune layers 2, 3 only
    late = Trace(meta, t.arrays)
    assert late.stage2_layer_for(0) == 2 and late.stage2_layer_for(3) == 3
    meta["stage2"] = []
    none = Trace(meta, t.arrays)
    assert none.stage2_layer_for(4) is None and none.start_layer == 0


def test_processed_and_alive_follow_the_drop_layer(trace):
    first = trace.prune_layers[0]
    dropped_here = trace.stage2_patch(first, "status") == stages.DROPPED
    assert dropped_here.any()
    assert trace.processed_at(first)[dropped_here].all(), "a token dropped after layer l is processed at l"
    assert not trace.alive_after(first)[dropped_here].any()
    assert not trace.processed_at(first + 1)[dropped_here].any()
    np.testing.assert_array_equal(trace.alive_after(first), trace.processed_at(first + 1))


def test_kv_cached_at_is_the_cache_record(trace):
    S, N0, G = trace.meta["sequence"]["S"], trace.meta["sequence"]["N0"], trace.grid
    groups = trace.arrays["tokens.groups"]
    last = trace.num_layers - 1
    idx = trace.arrays[f"kv.L{last}"]
    cached = np.zeros(G * G, bool)
    for t in idx[(idx >= S) & (idx < S + N0)] - S:
        cached[groups[t][groups[t] >= 0]] = True
    np.testing.assert_array_equal(trace.kv_cached_at(last), cached.reshape(G, G))


@pytest.mark.parametrize("changes, vanilla", [
    (dict(merge=False, key_set=False, filter=False, kv_trim=False), True),
    (dict(merge=False, key_set=False, filter=True, kv_trim=False), False),
    (dict(merge=False, key_set=False, filter=False, kv_trim=False, method="pool", budget=36.0), False),
])
def test_vanilla_is_what_the_config_enables(trace, changes, vanilla):
    """The pooling baseline switches every MustDrop stage off and still is not the vanilla run."""
    t = Trace(dict(trace.meta, config=dict(trace.meta["config"], **changes)), trace.arrays)
    assert t.is_vanilla is vanilla
