"""Every renderer of mustdrop.vis, checked against a stored trace (saved, loaded back, then drawn).

The overlays paint an exact category colour at the centre of every patch cell, so each test reads
the decisions back from the pixels (after a PNG round trip) and compares them with the trace's own
token-level records, not with the patch maps the renderer used.
"""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mustdrop import vis
from mustdrop.stages import DROPPED
from mustdrop.trace import Trace


@pytest.fixture(scope="session")
def traces(tiny, tmp_path_factory):
    """(MustDrop 64 trace, vanilla trace, the image), stored as files and loaded back."""
    from conftest import half_textured_image

    img = half_textured_image()
    folder = tmp_path_factory.mktemp("traces")
    q = "what color is the square?"
    md = tiny.run(img, q, tiny.config_for("64"), max_new_tokens=4).trace.save(folder / "md.safetensors")
    va = tiny.run(img, q, tiny.config_for("off"), max_new_tokens=4).trace.save(folder / "va.safetensors")
    return Trace.load(md), Trace.load(va), img


def png_roundtrip(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def kept_from_records(trace, layer):
    """Patches whose token survives ``layer``, computed from stage2 arrays + tokens.groups only."""
    toks = trace.arrays[f"stage2.L{layer}.tokens"]
    status = trace.arrays[f"stage2.L{layer}.status"]
    groups = trace.arrays["tokens.groups"]
    G = trace.grid
    kept = np.zeros(G * G, bool)
    for t in toks[status != DROPPED]:
        row = groups[t]
        kept[row[row >= 0]] = True
    return kept.reshape(G, G)


def test_trace_has_drops(traces):
    md, va, _ = traces
    assert md.prune_layers and any(s["dropped"] > 0 for s in md.meta["stage2"])
    assert md.meta["stage1a"]["merged_windows"], "the test image should merge some windows"
    assert not va.prune_layers


def test_filter_overlay_kept_mask_reads_back_from_pixels(traces):
    md, _, img = traces
    for layer in md.prune_layers:
        out = png_roundtrip(vis.filter_overlay(md, layer, img))
        geom = vis.geometry(md)
        assert out.shape == (geom.size, geom.size, 3)
        codes = vis.decode_categories(out, geom, vis.STATUS_COLOURS)
        assert (codes != -99).all(), "every cell carries an exact status colour"
        kept_pixels = np.isin(codes, [0, 1, 2, 3])
        assert np.array_equal(kept_pixels, kept_from_records(md, layer))
        assert np.array_equal(codes, vis.status_map(md, layer))


def test_merge_overlay_group_colours(traces):
    md, _, img = traces
    geom = vis.geometry(md)
    dots = vis.decode_dots(png_roundtrip(vis.merge_overlay(md, img)), geom)
    groups = md.arrays["tokens.groups"]
    G, w = md.grid, md.meta["stage1a"]["window"]
    n_merged, merged_colours = 0, set()
    for tok, row in enumerate(groups):
        members = row[row >= 0]
        rr, cc = np.divmod(members, G)
        shade = vis.window_shade(members[0], G, w)
        expected = vis.group_colour(tok, shade) if len(members) > 1 else vis.UNMERGED_DOT
        assert (dots[rr, cc] == expected).all(), f"token {tok}"
        if len(members) > 1:
            n_merged += 1
            merged_colours.add(expected)
            # neighbouring windows sit on the other shade of the checkerboard
            r0, c0 = rr.min(), cc.min()
            if c0 + w < G:
                assert vis.window_shade(r0 * G + c0 + w, G, w) != shade
    assert n_merged == len(md.meta["stage1a"]["merged_windows"])
    assert len(merged_colours) == n_merged, "every merge group has its own exact colour"


def test_key_overlay_outlines_key_tokens(traces):
    md, _, img = traces
    geom = vis.geometry(md)
    out = vis.key_overlay(md, img)
    G, c = md.grid, geom.cell
    corner = out[np.arange(G) * c][:, np.arange(G) * c]          # top-left pixel of every cell
    outlined = (corner == vis.KEY_OUTLINE).all(-1)
    key = np.zeros(G * G, bool)
    groups = md.arrays["tokens.groups"]
    for t in md.meta["stage1b"]["key_tokens"]:
        key[groups[t][groups[t] >= 0]] = True
    assert np.array_equal(outlined, key.reshape(G, G))
    assert key.sum() > 0


@pytest.mark.parametrize("name", ["similarity", "key_score", "global_share", "individual_max"])
def test_heatmap_dots_are_the_colormap(traces, name):
    md, _, img = traces
    layer = md.prune_layers[0]
    values = vis.heatmap_values(md, name, layer)
    assert values is not None
    _, cmap, log, _ = vis.HEATMAPS[name]
    dots = vis.decode_dots(png_roundtrip(vis.heatmap_overlay(md, name, img, layer=layer)), vis.geometry(md))
    v = np.log10(values.astype(np.float64)) if log else values.astype(np.float64)
    finite = np.isfinite(v)
    assert finite.any()
    lo, hi = v[finite].min(), v[finite].max()
    idx = np.clip(np.round((v[finite] - lo) / max(hi - lo, 1e-300) * 255), 0, 255).astype(int)
    assert (dots[finite] == vis.lut(cmap)[idx]).all()
    assert (dots[~finite] == vis.NAN_COLOUR).all()


def test_heatmap_absent_stage_is_grey(traces):
    _, va, img = traces
    assert vis.heatmap_values(va, "global_share", 0) is None
    dots = vis.decode_dots(vis.heatmap_overlay(va, "global_share", img, layer=0), vis.geometry(va))
    assert (dots == vis.NAN_COLOUR).all()


def test_kv_overlay_matches_cache_indices(traces):
    md, _, img = traces
    geom = vis.geometry(md)
    S, N0 = md.meta["sequence"]["S"], md.meta["sequence"]["N0"]
    groups = md.arrays["tokens.groups"]
    G = md.grid
    for layer in range(md.num_layers):
        codes = vis.decode_categories(png_roundtrip(vis.kv_overlay(md, layer, img)), geom, vis.KV_COLOURS)
        assert (codes != -99).all()
        idx = md.arrays[f"kv.L{layer}"]
        cached = np.zeros(G * G, bool)
        for t in idx[(idx >= S) & (idx < S + N0)] - S:
            cached[groups[t][groups[t] >= 0]] = True
        assert np.array_equal(codes == vis.KV_CACHED, cached.reshape(G, G)), f"layer {layer}"
        # trimmed = processed in prefill at this layer but no longer cached
        assert np.array_equal(codes == vis.KV_TRIMMED, md.processed_at(layer) & ~cached.reshape(G, G))


def test_vanilla_kv_caches_everything(traces):
    _, va, img = traces
    codes = vis.decode_categories(vis.kv_overlay(va, 0, img), vis.geometry(va), vis.KV_COLOURS)
    assert (codes == vis.KV_CACHED).all()


def test_selected_patch_and_ground_truth_outlines(traces):
    md, _, img = traces
    geom = vis.geometry(md)
    out = vis.filter_overlay(md, md.prune_layers[0], img, selected=(3, 5))
    y, x = 3 * geom.cell, 5 * geom.cell
    assert tuple(out[y, x + geom.cell // 2]) == vis.SELECT_OUTLINE
    assert tuple(out[y + geom.cell // 2, x]) == vis.SELECT_OUTLINE
    mask = np.zeros((1, md.grid, md.grid), np.float32)
    mask[0, 14:20, 15:21] = 1.0
    plain = vis.merge_overlay(md, img)
    with_gt = vis.merge_overlay(md, img, gt_masks=mask)
    changed = (plain != with_gt).any(-1)
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 0
    assert 13 * geom.cell <= ys.min() and ys.max() < 21 * geom.cell
    assert 14 * geom.cell <= xs.min() and xs.max() < 22 * geom.cell
    # the object the question asks about is outlined in its own colour
    two = np.concatenate([mask, np.roll(mask, -10, axis=1)])
    target = vis.merge_overlay(md, img, gt_masks=vis.GroundTruth(two, (0,)))
    ys, xs = np.nonzero((target == vis.GT_TARGET).all(-1) & ~(plain == vis.GT_TARGET).all(-1))
    assert len(ys) and ys.min() >= 13 * geom.cell and xs.min() >= 14 * geom.cell
    ys, xs = np.nonzero((target == vis.GT_OUTLINE).all(-1) & ~(plain == vis.GT_OUTLINE).all(-1))
    assert len(ys) and ys.max() < 11 * geom.cell


def test_model_view_follows_the_mapping(traces):
    md, _, _ = traces
    # a wide image: the processor resizes the short side to 336 and centre-crops
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 100:200] = 255                      # the middle third is white
    meta = dict(md.meta)
    meta["input"] = dict(md.meta["input"])
    meta["input"]["mapping"] = {"kind": "resize_center_crop", "scale": 3.36, "resized": [1008, 336],
                                "offset": [-336, 0], "processed": 336}
    meta["crops"] = [{"name": "image", "mapping": meta["input"]["mapping"]}]
    t = Trace(meta, md.arrays)
    view = vis.model_view(wide, t)
    assert view.shape == (336, 336, 3)
    assert view[5:-5, 5:-5].min() > 200         # only the white middle third is in view
    grey = vis.model_view(None, t)
    assert (grey == vis.BACKGROUND).all()
    # a squashing resize (SigLIP style): x and y scale differ
    meta["crops"] = [{"name": "image", "mapping": {"kind": "resize", "scale": 1.12, "scale_xy": [1.12, 3.36],
                                                   "offset": [0, 0], "resized": [336, 336], "processed": 336}}]
    view = vis.model_view(wide, Trace(meta, md.arrays))
    assert view[5:-5, 120:210].min() > 200 and view[5:-5, :100].max() < 50


def test_patch_at(traces):
    md, _, _ = traces
    geom = vis.geometry(md)
    assert geom.patch_at(geom.cell * 5 + 1, geom.cell * 2 + 1) == (2, 5)
    assert geom.patch_at(-1, 3) is None and geom.patch_at(geom.size, 0) is None


def test_lifecycle_of_a_dropped_patch(traces):
    md, _, _ = traces
    dropped = np.argwhere(md.patch("dropped_after_layer") >= 0)
    r, c = (int(v) for v in dropped[0])
    d = vis.patch_lifecycle(md, r, c)
    layer = d["dropped_after_layer"]
    assert layer in md.prune_layers
    row = next(s for s in d["stage2"] if s["layer"] == layer)
    assert row["status"] == DROPPED
    assert row["global_share"] < row["global_thr"] and row["individual_max"] < row["individual_thr"]
    text = vis.lifecycle_markdown(md, r, c)
    assert f"after LLM layer {layer}" in text and "Stage 1a" in text and "Stage 3" in text


def test_lifecycle_outside_the_grid_is_refused(traces):
    md, _, _ = traces
    with pytest.raises(ValueError, match="outside"):
        vis.patch_lifecycle(md, md.grid, 0)


def test_lifecycle_names_original_pixels_and_key_tokens(traces):
    md, _, _ = traces
    # 336 x 336 image, no resize: patch (2, 5) covers x 70-84, y 28-42
    assert vis.original_box(md, 2, 5) == (70.0, 28.0, 84.0, 42.0)
    assert "x 70–84, y 28–42" in vis.lifecycle_markdown(md, 2, 5)
    key = np.argwhere(md.patch("key") == 1)[0]
    assert "key token" in vis.lifecycle_markdown(md, int(key[0]), int(key[1]))


def test_token_curve_and_kv_bytes(traces):
    md, va, _ = traces
    fig = vis.token_curve(md, va)
    ys = {t.name: list(t.y) for t in fig.data}
    assert ys["vanilla: vision tokens"] == va.meta["vision_tokens_per_layer"]
    assert ys["MustDrop: vision tokens in prefill"] == md.meta["vision_tokens_per_layer"]
    bars = vis.kv_bytes_figure(md, va)
    assert list(bars.data[-1].y) == [n * md.meta["kv"]["bytes_per_entry"] for n in md.meta["kv"]["entries_per_layer"]]


def test_summary_names_both_conventions(traces):
    md, va, _ = traces
    text = vis.summary_markdown(md, va)
    assert "authors' convention" in text and "compute convention" in text
    assert "4 n d^2 + 2 n^2 d + 3 n d m" in text and "KV cache" in text and "decode" in text


def test_answer_diff(traces):
    md, va, _ = traces
    same = vis.answer_diff(va, va)
    assert same["first_divergence"] is None and all(lab is None for _, lab in same["mustdrop"])
    d = vis.answer_diff(va, md)
    if va.meta["generation"]["token_ids"] != md.meta["generation"]["token_ids"]:
        i = d["first_divergence"]
        assert va.meta["generation"]["token_ids"][:i] == md.meta["generation"]["token_ids"][:i]
        assert d["mustdrop"][i][1] == "differs"
    assert d["table"].count("\n") >= len(md.meta["generation"]["tokens"]) + 1


def test_legends_name_every_colour(traces):
    md, _, _ = traces
    for kind in ("merge", "similarity", "key_score", "global_share", "individual_max", "filter", "kv"):
        h = vis.legend_html(kind, md, md.prune_layers[0])
        assert h.startswith("<div")
    f = vis.legend_html("filter", md)
    for rgb in vis.STATUS_COLOURS.values():
        assert f"rgb{rgb}" in f


def test_slides_png_and_pdf(traces, tmp_path):
    md, va, img = traces
    png, pdf = vis.save_slides(md, tmp_path, image=img, vanilla=va)
    im = Image.open(png)
    assert im.size == (1920, 1080)
    assert pdf.read_bytes()[:5] == b"%PDF-"
    # replay without the image: still draws (grey background)
    png2, _ = vis.save_slides(md, tmp_path / "noimg", image=None, vanilla=None)
    assert png2.is_file()


@pytest.mark.parametrize("changes", [
    dict(merge=False),
    dict(key_set=False),
    dict(filter=False),
    dict(kv_trim=False, positions="original"),
    dict(prune_layers=(), filter=False),
])
def test_every_view_draws_for_partial_configs(tiny, changes, tmp_path):
    """Stages switched off leave their views grey / empty, never an error."""
    from conftest import half_textured_image

    cfg = tiny.config_for("64").replace(**changes)
    t = Trace.load(tiny.run(half_textured_image(), "what shape?", cfg, max_new_tokens=2).trace
                   .save(tmp_path / "t.safetensors"))
    img = half_textured_image()
    geom = vis.geometry(t)
    vis.merge_overlay(t, img)
    for name in vis.HEATMAPS:
        vis.heatmap_overlay(t, name, img, layer=(t.prune_layers or [None])[0])
    for layer in t.prune_layers:
        codes = vis.decode_categories(vis.filter_overlay(t, layer, img), geom, vis.STATUS_COLOURS)
        assert np.array_equal(np.isin(codes, [0, 1, 2, 3]), kept_from_records(t, layer))
    for layer in range(t.num_layers):
        vis.kv_overlay(t, layer, img)
    if not changes.get("key_set", True):
        assert "patch.key_score" not in t.arrays or np.isnan(t.patch("key_score")).all()
    vis.lifecycle_markdown(t, 0, 0)
    vis.summary_markdown(t)
    vis.token_curve(t)
    png, pdf = vis.save_slides(t, tmp_path, image=img)
    assert png.is_file() and pdf.is_file()


def test_slides_ignore_and_keep_global_rcparams(traces, tmp_path):
    """Other code may set rcParams (bbox 'tight', fonts); the slide stays 1920 x 1080 and leaves them alone."""
    import matplotlib

    md, va, img = traces
    with matplotlib.rc_context({"savefig.bbox": "tight", "font.size": 7}):
        png, _ = vis.save_slides(md, tmp_path, image=img, vanilla=va)
        assert matplotlib.rcParams["font.size"] == 7
    assert Image.open(png).size == (1920, 1080)


@pytest.fixture(scope="session")
def other_layouts(tmp_path_factory):
    """Traces of a tiny LLaVA-NeXT (base + 4 tiles, unpadding) and a tiny SigLIP LLaVA (27 x 27, no CLS)."""
    from mustdrop.adapters import load_llava, make_runner
    from mustdrop.testing import build_tiny_llava_next, build_tiny_siglip_llava

    wide = Image.fromarray(np.tile(np.linspace(0, 255, 600, dtype=np.uint8)[None, :, None], (400, 1, 3)))
    out = {}
    for name, build in (("next", build_tiny_llava_next), ("siglip", build_tiny_siglip_llava)):
        folder = build(tmp_path_factory.mktemp(name))
        runner = make_runner(*load_llava(str(folder)), str(folder))
        t = runner.run(wide, "what is in the image?", runner.config_for("64"), max_new_tokens=2).trace
        out[name] = (Trace.load(t.save(folder / "t.safetensors")), wide)
    return out


def kept_in_crop(trace, layer, crop):
    G = trace.grid
    toks = trace.arrays[f"stage2.L{layer}.tokens"]
    status = trace.arrays[f"stage2.L{layer}.status"]
    groups = trace.arrays["tokens.groups"]
    kept = np.zeros(G * G, bool)
    for t in toks[status != DROPPED]:
        ids = groups[t][groups[t] >= 0]
        ids = ids[ids // (G * G) == crop] % (G * G)
        kept[ids] = True
    return kept.reshape(G, G)


NEXT_STATUS = {**vis.STATUS_COLOURS, vis.NO_TOKEN_CODE: vis.NO_TOKEN}
NEXT_KV = {**vis.KV_COLOURS, vis.NO_TOKEN_CODE: vis.NO_TOKEN}


def test_llava_next_filter_overlay_of_every_crop_reads_back(other_layouts):
    t, img = other_layouts["next"]
    assert t.n_crops > 1
    geom = vis.geometry(t)
    layer = t.prune_layers[0]
    for c in range(t.n_crops):
        codes = vis.decode_categories(png_roundtrip(vis.filter_overlay(t, layer, img, crop=c)), geom, NEXT_STATUS)
        assert (codes != -99).all()
        assert np.array_equal(np.isin(codes, [0, 1, 2, 3]), kept_in_crop(t, layer, c)), f"crop {c}"
        assert np.array_equal(codes == vis.NO_TOKEN_CODE, t.patch("token", c) < 0)


def test_llava_next_kv_overlay_of_every_crop_reads_back(other_layouts):
    t, img = other_layouts["next"]
    geom = vis.geometry(t)
    layer = t.prune_layers[0]
    for c in range(t.n_crops):
        kv = vis.decode_categories(vis.kv_overlay(t, layer, img, crop=c), geom, NEXT_KV)
        assert np.array_equal(kv, vis.kv_map(t, layer, c))
        vis.merge_overlay(t, img, crop=c)
        vis.key_overlay(t, img, crop=c)


def test_llava_next_padding_patches_have_no_token(other_layouts):
    t, _ = other_layouts["next"]
    crops = [c for c in range(t.n_crops) if (t.patch("token", c) < 0).any()]
    assert crops, "the 600 x 400 image should leave padded patches in some tile"
    c = crops[0]
    r, col = (int(v) for v in np.argwhere(t.patch("token", c) < 0)[0])
    assert "No token" in vis.lifecycle_markdown(t, r, col, crop=c)
    assert "no token" in vis.legend_html("filter", t)
    assert t.crop_name(1).startswith("tile")


def test_llava_next_slides_of_a_tile(other_layouts, tmp_path):
    t, img = other_layouts["next"]
    png, pdf = vis.save_slides(t, tmp_path, image=img, crop=1)
    assert Image.open(png).size == (1920, 1080) and pdf.is_file()


def test_siglip_grid_27(other_layouts):
    t, img = other_layouts["siglip"]
    assert t.grid == 27
    geom = vis.geometry(t, 480)
    base = vis.base_canvas(img, t, geom)
    layer = t.prune_layers[0]
    codes = vis.decode_categories(vis.filter_overlay(t, layer, base=base), geom, vis.STATUS_COLOURS)
    assert np.array_equal(np.isin(codes, [0, 1, 2, 3]), kept_in_crop(t, layer, 0))
    assert "no CLS" in vis.legend_html("key_score", t)
    assert geom.patch_at(geom.size - 1, geom.size - 1) == (26, 26)


def test_display_pieces_restore_spaces():
    gen = {"tokens": ["The", "cat", "s", "is", "</s>"], "answer": "The cats is"}
    assert vis.display_pieces(gen) == ["The", " cat", "s", " is", "</s>"]
    assert vis.display_pieces({"tokens": ["red"], "answer": "red"}) == ["red"]


def test_object_coverage(traces):
    md, _, _ = traces
    masks = np.zeros((2, md.grid, md.grid), np.float32)
    masks[0, 14:20, 15:21] = 1.0
    masks[1, :3, :3] = 1.0
    layer = md.prune_layers[-1] + 1 if md.prune_layers[-1] + 1 < md.num_layers else md.num_layers - 1
    cov = vis.object_coverage(md, vis.GroundTruth(masks, (0,)), layer)
    obj = masks[0] > 0
    assert cov["patches"] == 36
    assert cov["processed"] == int((md.processed_at(layer) & obj).sum())
    assert cov["cached"] == int((md.patch("kv_cached")[layer].astype(bool) & obj).sum())
    assert vis.object_coverage(md, vis.GroundTruth(masks, ()), layer) is None
    assert vis.object_coverage(md, masks, layer) is None


def test_slides_command_line(traces, tmp_path, capsys):
    md, va, img = traces
    md.save(tmp_path / "md.safetensors")
    va.save(tmp_path / "va.safetensors")
    img.save(tmp_path / "img.png")
    assert vis.main([str(tmp_path / "md.safetensors"), "--vanilla", str(tmp_path / "va.safetensors"),
                     "--image", str(tmp_path / "img.png"), "--out", str(tmp_path / "out")]) == 0
    stem = vis.slide_stem(md, None, "img.png")
    assert stem.startswith("tiny-llava-64-img-") or "-64-img-" in stem
    assert (tmp_path / "out" / f"{stem}.pdf").is_file() and (tmp_path / "out" / f"{stem}.png").is_file()
    printed = capsys.readouterr().out
    assert f"{stem}.png" in printed
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    assert vis.main([str(tmp_path / "bad.safetensors")]) == 2
    assert "not a MustDrop trace" in capsys.readouterr().err


# ------------------------------------------------------------------------------ traces written before
FIXTURES = Path(__file__).parent / "fixtures"


def test_trace_written_before_the_key_score_rename_draws_its_key_score():
    """stage1b.cls_attention of an older file is drawn as the key score, dot for dot."""
    from safetensors.numpy import load_file

    t = Trace.load(FIXTURES / "v1-llava-64.safetensors")
    stored = load_file(str(FIXTURES / "v1-llava-64.safetensors"))["stage1b.cls_attention"]
    values = vis.heatmap_values(t, "key_score")
    groups = t.arrays["tokens.groups"]
    for tok in range(len(groups)):
        for p in groups[tok][groups[tok] >= 0]:
            assert values[p // t.grid, p % t.grid] == stored[tok]
    geom = vis.geometry(t)
    dots = vis.decode_dots(png_roundtrip(vis.key_overlay(t)), geom)
    colours, _, finite = vis.heat_colours(values, vis.HEATMAPS["key_score"][1], True)
    assert finite.all() and (dots == colours).all()


def test_trace_written_before_draws_every_stage_from_its_records():
    t = Trace.load(FIXTURES / "v1-llava-64.safetensors")
    geom = vis.geometry(t)
    for layer in t.prune_layers:
        codes = vis.decode_categories(png_roundtrip(vis.filter_overlay(t, layer)), geom, vis.STATUS_COLOURS)
        assert np.array_equal(np.isin(codes, vis.KEPT_STATUSES), kept_from_records(t, layer))
    assert "key score: CLS attention" in vis.legend_html("key_score", t)


def test_llava_next_trace_written_before_draws_every_crop():
    t = Trace.load(FIXTURES / "v1-llava-next-64.safetensors")
    geom = vis.geometry(t)
    layer = t.prune_layers[0]
    for c in range(t.n_crops):
        codes = vis.decode_categories(vis.filter_overlay(t, layer, crop=c), geom, NEXT_STATUS)
        assert np.array_equal(np.isin(codes, vis.KEPT_STATUSES), kept_in_crop(t, layer, c)), f"crop {c}"
        assert vis.heatmap_values(t, "key_score", crop=c) is not None


def test_slides_default_to_the_first_prune_layer(traces):
    """With no layer given, the slide's stage-2 panel shows the layer the app opens at."""
    import copy

    md, _, _ = traces
    meta = copy.deepcopy(md.meta)
    meta["stage2"][-1]["dropped"] = 10 ** 6       # a later layer said to drop most: still the first is shown
    t = Trace(meta, md.arrays)
    fig = vis.slide_figure(t)
    titles = [ax.get_title() for ax in fig.axes]
    first = md.prune_layers[0]
    assert any(t.startswith(f"2  filter after layer {first} (0-based):") for t in titles), titles
    assert f"3  KV cache of layer {md.start_layer} (0-based)" in titles


def test_bytes_are_decimal_megabytes_as_in_the_readme():
    """One convention everywhere (decimal MB, as the CLI and README): LLaVA-1.5-7B fp16 holds
    524,288 B of KV per token, which the README gives as 0.524 MB."""
    from analysis.flops import DTYPE_BYTES, kv_bytes_per_token, read_config

    cfg = read_config(Path(__file__).resolve().parents[1] / "analysis" / "configs" / "llava-1.5-7b.json")
    per_token = kv_bytes_per_token(cfg["layers"], cfg["kv_heads"], cfg["head_dim"], DTYPE_BYTES["float16"])
    assert per_token == 524_288 and vis.format_bytes(per_token) == "0.524 MB"
    assert vis.format_bytes(1_509_949_440) == "1509.949 MB"          # 2880 tokens of LLaVA-NeXT (README)


def test_summary_and_layer_caption_use_the_one_convention(traces):
    md, va, _ = traces
    text = vis.summary_markdown(md, va) + vis.layer_markdown(md, 0)
    assert "KB" not in text and "MiB" not in text
    kv_total = md.meta["kv"]["bytes_per_entry"] * sum(md.meta["kv"]["entries_per_layer"])
    assert f"{kv_total / 1e6:.3f} MB" in text
