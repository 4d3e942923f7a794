"""Asked objects given by a run's rows (object_boxes, object_mask; mustdrop.dataset.objects): the
failure attribution and recall work beyond the scene world, and a hostile row is ignored with a note.

The fixture run's samples are renamed and stripped of their scene reference, so that the scene world
cannot supply masks: only the rows' fields can. Their boxes and masks come from the scene world's
own objects, so each path is checked against the masks path of the original run.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mustdrop.dataset import TraceSet
from mustdrop.dataset import aggregate as A

CONFIGS = ["64", "fastv@64", "fastervlm@64"]


def _rows(folder):
    return [json.loads(line) for line in (folder / "summary.jsonl").read_text().splitlines() if line.strip()]


def _targets(sid):
    from analysis.toyworld import make_sample

    s = make_sample("test", int(sid.split("-")[1]))
    return s, [s.scene.objects[i].pixel_mask for i in s.targets]


def _bbox(pix):
    ys, xs = np.nonzero(pix)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _copy(run, dst, extra):
    """The run under new ids ("photo-<id>", no image reference) with extra(row, old id) merged in."""
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns(".lens-index*"))
    out = []
    for r in _rows(run):
        sid = r["id"]
        r = dict(r, id=f"photo-{sid}", image=None)
        r.update(extra(sid, dst))
        out.append(json.dumps(r))
    (dst / "summary.jsonl").write_text("\n".join(out) + "\n")
    return dst


def _by_old_id(table):
    table = table.copy()
    table["id"] = [i.removeprefix("photo-") for i in table["id"]]
    return table.set_index(["id", "config"]) if "config" in table else table.set_index("id")


def test_a_mask_file_gives_exactly_the_scene_masks_path(dataset_run, tmp_path):
    def mask(sid, dst):
        _, pix = _targets(sid)
        rel = f"masks/{sid}.png"
        (dst / "masks").mkdir(exist_ok=True)
        Image.fromarray((np.any(pix, axis=0) * 255).astype(np.uint8)).save(dst / rel)
        return {"object_mask": rel}

    scene = TraceSet.open(dataset_run, cache=False)
    rows = TraceSet.open(_copy(dataset_run, tmp_path / "m", mask), cache=False)
    assert rows.problems == []
    for i, t in enumerate(rows.index.traces):
        j = scene.index.lookup[(t["id"].removeprefix("photo-"), t["config"])]
        assert t["has_mask"] and scene.index.traces[j]["has_mask"]
        np.testing.assert_array_equal(rows.index.patch(i, "target"), scene.index.patch(j, "target"))
    a, b = _by_old_id(A.sample_table(rows)), _by_old_id(A.sample_table(scene))
    np.testing.assert_array_equal(a.loc[b.index, "recall"].to_numpy(), b["recall"].to_numpy())
    for cfg in CONFIGS:
        fa, fb = _by_old_id(A.failure_attribution(rows, cfg)), _by_old_id(A.failure_attribution(scene, cfg))
        assert sorted(fa.index) == sorted(fb.index)
        assert (fa.loc[fb.index, "category"] == fb["category"]).all()


def test_boxes_give_box_coverage_through_the_trace_mapping(dataset_run, tmp_path):
    from analysis.toyworld.scene import patch_fractions

    boxes = {}

    def box(sid, dst):
        boxes[sid] = [_bbox(p) for p in _targets(sid)[1]]
        return {"object_boxes": boxes[sid]}

    scene = TraceSet.open(dataset_run, cache=False)
    ts = TraceSet.open(_copy(dataset_run, tmp_path / "b", box), cache=False)
    assert ts.problems == []
    for i, t in enumerate(ts.index.traces):
        sid = t["id"].removeprefix("photo-")
        s, pix = _targets(sid)
        # Independently: the boxes drawn as a pixel mask of the 336-pixel image, averaged per patch.
        drawn = np.zeros(s.scene.image.shape[:2], bool)
        for x0, y0, x1, y1 in boxes[sid]:
            drawn[y0:y1, x0:x1] = True
        want = patch_fractions(drawn)
        got = ts.index.patch(i, "target")
        np.testing.assert_array_equal(got, want)
        # A box holds its object: every patch the object touches is covered at least as much.
        mask_cov = scene.index.patch(scene.index.lookup[(sid, t["config"])], "target")
        assert (got >= mask_cov - 1e-6).all() and got[mask_cov > 0].all()
    recall = _by_old_id(A.sample_table(ts))["recall"]
    assert recall.notna().all() and ((recall >= 0) & (recall <= 1)).all()
    for cfg in CONFIGS:
        fa, fb = _by_old_id(A.failure_attribution(ts, cfg)), _by_old_id(A.failure_attribution(scene, cfg))
        assert sorted(fa.index) == sorted(fb.index)            # the same lost answers are attributed


@pytest.mark.parametrize("field,value,words", [
    ("object_boxes", [[float("nan"), 0, 10, 10]], "object_boxes[0]: "),      # pandas reads NaN as null
    ("object_boxes", [[0, 0, 10, 10]] * 100_000, "object_boxes: 100000 boxes"),
    ("object_boxes", [[-5, -5, -10, -10]], "object_boxes[0]: needs x0 < x1"),
    ("object_boxes", [[0, 0, "10", 10]], "object_boxes[0]: expected four numbers"),
    ("object_boxes", {"x": 1}, "object_boxes: expected a list"),
    ("object_mask", "../../etc/passwd", "object_mask: not a file inside the run folder"),
    ("object_mask", "masks/small.png", "object_mask: 10 x 10 pixels; the image is 336 x 336"),
])
def test_a_hostile_row_is_ignored_with_a_note_naming_the_field(dataset_run, tmp_path, field, value, words):
    victim = _rows(dataset_run)[0]["id"]

    def hostile(sid, dst):
        (dst / "masks").mkdir(exist_ok=True)
        Image.new("L", (10, 10), 255).save(dst / "masks" / "small.png")
        return {field: value} if sid == victim else {"object_boxes": [_bbox(p) for p in _targets(sid)[1]]}

    ts = TraceSet.open(_copy(dataset_run, tmp_path / "h", hostile), cache=False)
    assert any(p.startswith(f"photo-{victim}: {words}") for p in ts.problems), ts.problems
    assert len(ts.problems) == 1
    for t in ts.index.traces:
        assert t["has_mask"] == (t["id"] != f"photo-{victim}")
    table = A.sample_table(ts)
    assert table[table["id"] == f"photo-{victim}"]["recall"].isna().all()
    assert table[table["id"] != f"photo-{victim}"]["recall"].notna().all()


def test_negative_and_outside_coordinates_are_clipped(dataset_run, tmp_path):
    from mustdrop.dataset.objects import ObjectsError, parse_boxes

    assert parse_boxes([[-20, -3.5, 14.2, 10]], 336, 336) == [(0, 0, 15, 10)]
    assert parse_boxes("[[300, 300, 1e9, 1e9], [400, 400, 500, 500]]", 336, 336) == [(300, 300, 336, 336)]
    assert parse_boxes([], 336, 336) == []
    for bad in ([[float("nan"), 0, 1, 1]], [[0, 0, float("inf"), 1]], "[[0, 0, 1e999, 1]]"):
        with pytest.raises(ObjectsError, match=r"object_boxes\[0\]: not a finite number"):
            parse_boxes(bad, 336, 336)


def test_a_changed_mask_file_rebuilds_the_index(dataset_run, tmp_path):
    def mask(sid, dst):
        (dst / "masks").mkdir(exist_ok=True)
        Image.fromarray((np.any(_targets(sid)[1], axis=0) * 255).astype(np.uint8)).save(dst / f"masks/{sid}.png")
        return {"object_mask": f"masks/{sid}.png"}

    run = _copy(dataset_run, tmp_path / "c", mask)
    before = TraceSet.open(run).index.patch(0, "target").copy()
    sid = TraceSet.open(run).index.traces[0]["id"].removeprefix("photo-")
    Image.fromarray(np.full((336, 336), 255, np.uint8)).save(run / f"masks/{sid}.png")     # the whole image
    after = TraceSet.open(run).index.patch(0, "target")
    assert (after == 1).all() and not (before == 1).all()
