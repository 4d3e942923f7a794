"""One meaning per colour across every tab, colour-blind safe, and the opacity of the category tints.

Hues are OKLCH hue angles (perceptual). Every colour a view paints is checked: the status, KV and
compare categories, both shades of all 256 merge-group colours, every entry of the score ramp and
the key outline; the decisions are read back from the pixels at several opacities.
"""

import itertools
from pathlib import Path

import numpy as np
import pytest

from mustdrop import vis
from mustdrop.trace import DROPPED, Trace
from mustdrop.vis import palette as P

FIXTURES = Path(__file__).parent / "fixtures"
MIN_HUE_GAP = 30.0          # degrees of OKLCH hue between any two coloured meanings
MIN_GREY_GAP = 30           # grey levels between any two neutral meanings
CHROMA = 0.03               # below this chroma a colour is a neutral grey (its hue means nothing)


def hue_gap(a: float, b: float) -> float:
    d = abs(a - b) % 360
    return min(d, 360 - d)


def painted_colours() -> list[tuple[str, tuple[int, int, int]]]:
    """(meaning, colour) of every colour a view paints, by the meaning the palette gives it."""
    out = [(k, c) for k, (c, _) in P.MEANINGS.items() if not k.startswith(("merged", "score"))]
    out += [("merged", P.group_colour(t, s)) for s in (0, 1) for t in range(256)]
    out += [("score", tuple(int(x) for x in rgb)) for rgb in P.lut(P.SCORE_CMAP)]
    for _, cmap, _, _ in P.HEATMAPS.values():                   # every heatmap's colormap, its ends too
        out += [("score", tuple(int(x) for x in P.lut(cmap)[i])) for i in (0, 255)]
    return out


def test_every_colour_a_view_paints_has_a_meaning_in_the_table():
    table = {c for c, _ in P.MEANINGS.values()}
    cats = list(P.STATUS_COLOURS.values()) + list(P.KV_COLOURS.values()) + list(P.COMPARE_LABELS)
    cats += [P.KEY_OUTLINE, P.UNMERGED_DOT, P.NO_TOKEN, P.NAN_COLOUR, P.ANSWER_DIFFERS]
    assert set(cats) <= table, set(cats) - table
    assert len(table) == len(P.MEANINGS), "two meanings of the table share one colour"
    for name in ("COMPARE_BOTH", "COMPARE_ONLY_MUSTDROP", "COMPARE_ONLY_OTHER"):
        assert getattr(P, name) in P.COMPARE_LABELS


def test_no_two_meanings_share_a_hue():
    coloured = [(m, c, P.oklch(c)) for m, c in painted_colours() if P.oklch(c)[1] >= CHROMA]
    meanings = {m for m, _, _ in coloured}
    assert {"dropped", "trimmed", "key", "merged", "score", "kept_both", "compare_only_mustdrop"} <= meanings
    worst = min(((hue_gap(a[2][2], b[2][2]), a[0], b[0]) for a, b in itertools.combinations(coloured, 2)
                 if a[0] != b[0]), key=lambda x: x[0])
    assert worst[0] >= MIN_HUE_GAP, f"{worst[1]} and {worst[2]} are {worst[0]:.1f} degrees apart"


def test_the_issue_collisions_are_gone():
    """Dropped, trimmed, the 1a legend and differing answer tokens were all orange; the key token, the
    asked object and the top of the score maps were all yellow."""
    h = lambda c: P.oklch(c)[2]  # noqa: E731
    top = tuple(int(x) for x in P.lut(P.HEATMAPS["key_score"][1])[255])
    assert hue_gap(h(P.STATUS_COLOURS[DROPPED]), h(P.KV_COLOURS[P.KV_TRIMMED])) >= 60
    assert hue_gap(h(P.STATUS_COLOURS[DROPPED]), h(P.group_colour(7))) >= 60
    assert P.oklch(P.ANSWER_DIFFERS)[1] < CHROMA                    # a neutral: no overlay hue
    assert hue_gap(h(P.KEY_OUTLINE), h(top)) >= 60
    assert P.GT_TARGET != P.KEY_OUTLINE and P.oklch(P.GT_TARGET)[1] < CHROMA


def test_neutral_meanings_differ_in_lightness():
    greys = [(m, c) for m, (c, _) in P.MEANINGS.items() if P.oklch(c)[1] < CHROMA]
    assert len(greys) >= 5
    for (m1, c1), (m2, c2) in itertools.combinations(greys, 2):
        assert abs(int(c1[0]) - int(c2[0])) >= MIN_GREY_GAP, (m1, m2)


# Machado, Oliveira & Fernandes 2009, severity 1 (linear RGB)
CB = {"deuteranopia": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
      "protanopia": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
      "tritanopia": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]]}
VIEWS = {
    "2 filter": list(P.STATUS_COLOURS.values()) + [P.NO_TOKEN],
    "3 KV": list(P.KV_COLOURS.values()) + [P.NO_TOKEN],
    "1a merge": [P.group_colour(0, 0), P.group_colour(0, 1), P.UNMERGED_DOT, P.NO_TOKEN],
    "compare": list(P.COMPARE_LABELS) + [P.GONE, P.NO_TOKEN],
    "heatmap": [tuple(int(x) for x in P.lut(P.SCORE_CMAP)[i]) for i in (0, 255)] + [P.NAN_COLOUR, P.KEY_OUTLINE],
}


def _oklab(rgb):
    return P._M2 @ np.cbrt(P._M1 @ P._linear(rgb))


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_colours_shown_together_stay_apart_for_colour_blind_viewers(view):
    for name, m in [("normal vision", np.eye(3))] + list(CB.items()):
        seen = [_oklab(P._encode(np.asarray(m) @ P._linear(c))) for c in VIEWS[view]]
        d = min(np.linalg.norm(a - b) for a, b in itertools.combinations(seen, 2))
        assert d >= 0.07, f"{view} under {name}: two colours only {d:.3f} apart (OKLab)"


def test_merge_group_colours_are_distinct_per_shade():
    for s in (0, 1):
        assert len({P.group_colour(t, s) for t in range(256)}) == 256
    assert not {P.group_colour(t, 0) for t in range(256)} & {P.group_colour(t, 1) for t in range(256)}


# ----------------------------------------------------------------------------- legends and dots
@pytest.fixture(scope="module")
def stored():
    return Trace.load(FIXTURES / "v1-llava-64.safetensors")


@pytest.mark.parametrize("kind", ["merge", "similarity", "key_score", "global_share", "individual_max",
                                  "filter", "kv", "compare"])
def test_every_overlay_legend_explains_the_centre_dots(stored, kind):
    h = vis.legend_html(kind, stored, stored.prune_layers[0])
    assert "centre dots" in h
    assert "magenta" not in h and "white outline" not in h        # the old names of moved colours


def test_legends_name_the_new_marks(stored):
    assert "yellow outline: key token" in vis.legend_html("key_score", stored)
    h = vis.legend_html("filter", stored, gt=True)
    assert "thick white contour" in h and "inspected patch" in h
    assert "rgb(255, 255, 255)" in vis.legend_html("kv", stored)  # cached: the untouched white


# ----------------------------------------------------------------------------- opacity
def kept_from_records(trace, layer):
    toks, status = trace.arrays[f"stage2.L{layer}.tokens"], trace.arrays[f"stage2.L{layer}.status"]
    groups, G = trace.arrays["tokens.groups"], trace.grid
    kept = np.zeros(G * G, bool)
    for t in toks[status != DROPPED]:
        kept[groups[t][groups[t] >= 0]] = True
    return kept.reshape(G, G)


def tint_pixels(geom):
    """(G*cell, G*cell) mask of pixels that are neither grid line nor centre dot."""
    from mustdrop.vis.geometry import _dot_mask

    c = geom.cell
    m = ~_dot_mask(geom)
    m[::c] = False
    m[:, ::c] = False
    return m


@pytest.mark.parametrize("opacity", [0.0, 0.2, vis.DEFAULT_OPACITY, 1.0])
def test_opacity_blends_as_documented_and_the_pixels_still_decode(stored, opacity):
    from mustdrop.vis.geometry import upscale

    t = stored
    geom = vis.geometry(t)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (geom.size, geom.size, 3)).astype(np.uint8)
    layer = t.prune_layers[0]
    out = vis.filter_overlay(t, layer, base=base, opacity=opacity)
    # the mask drawn is the mask the forward pass recorded, at every opacity
    codes = vis.decode_categories(out, geom, vis.STATUS_COLOURS)
    assert np.array_equal(np.isin(codes, vis.KEPT_STATUSES), kept_from_records(t, layer))
    assert np.array_equal(codes, vis.status_map(t, layer))
    # tint = base + (colour - base) * opacity * weight (kept: half)
    colour = upscale(np.array([[P.STATUS_COLOURS[k] for k in row] for row in codes], np.uint8), geom).astype(float)
    weight = upscale(np.where(np.isin(codes, vis.KEPT_STATUSES), P.WEIGHT_KEPT, P.WEIGHT_REMOVED)
                     .astype(np.float32), geom)[:, :, None]
    want = base + (colour - base) * opacity * weight
    m = tint_pixels(geom)
    assert np.abs(out[m].astype(float) - want[m]).max() <= 1.0
    if opacity == 0.0:
        assert np.array_equal(out[m], base[m]), "opacity 0 leaves the image untouched around the dots"


def test_kv_and_merge_opacity_keep_untouched_patches_clear(stored):
    from mustdrop.vis.geometry import upscale

    t = stored
    geom = vis.geometry(t)
    base = np.full((geom.size, geom.size, 3), 77, np.uint8)
    m = tint_pixels(geom)
    for o in (0.3, 1.0):
        kv = vis.kv_overlay(t, t.num_layers - 1, base=base, opacity=o)
        codes = vis.decode_categories(kv, geom, vis.KV_COLOURS)
        assert np.array_equal(codes, vis.kv_map(t, t.num_layers - 1))
        cached = upscale((codes == vis.KV_CACHED).astype(np.uint8), geom).astype(bool) & m
        assert cached.any() and (kv[cached] == 77).all()
        merged = vis.merge_overlay(t, base=base, opacity=o)
        unmerged = upscale((t.patch("merged") == 0).astype(np.uint8), geom).astype(bool) & m
        assert (merged[unmerged] == 77).all()


def test_bad_opacity_is_refused_with_its_value(stored):
    with pytest.raises(ValueError, match="opacity must be between 0 and 1, got 1.5"):
        vis.filter_overlay(stored, stored.prune_layers[0], opacity=1.5)
    with pytest.raises(ValueError, match="a number"):
        vis.kv_overlay(stored, 0, opacity="lots")
