"""The scene world: deterministic per seed, masks that agree with the drawn pixels, unambiguous
questions whose targets are right, disjoint splits, lossless saving, processor-equal pixels."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from analysis.toyworld import (BACKGROUNDS, COLORS, GRID, IMAGE_SIZE, MAX_OBJECTS, NUMBER_WORDS,
                               PATCH_SIZE, QUESTION_TYPES, SHAPES, Scene, generate_scene, make_sample,
                               relation, scene_seed)


def test_generator_is_deterministic_per_seed():
    a, b = generate_scene(1234), generate_scene(1234)
    assert np.array_equal(a.image, b.image)
    assert [o.meta() for o in a.objects] == [o.meta() for o in b.objects]
    assert not np.array_equal(a.image, generate_scene(1235).image)


def test_make_sample_regenerates_identically():
    for i in range(10):
        s, t = make_sample("test", i), make_sample("test", i)
        assert (s.question, s.answer, s.targets, s.qtype) == (t.question, t.answer, t.targets, t.qtype)
        assert np.array_equal(np.asarray(s.image), np.asarray(t.image))


@pytest.mark.parametrize("seed", range(12))
def test_masks_agree_with_pixels(seed):
    sc = generate_scene(seed)
    assert sc.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and sc.image.dtype == np.uint8
    assert 1 <= len(sc.objects) <= MAX_OBJECTS
    union = np.zeros((IMAGE_SIZE, IMAGE_SIZE), int)
    for o in sc.objects:
        assert o.pixel_mask.shape == (IMAGE_SIZE, IMAGE_SIZE) and o.pixel_mask.any()
        assert np.all(sc.image[o.pixel_mask] == np.array(COLORS[o.color]))
        # patch mask is the mean of the pixel mask over each 14 x 14 patch
        expect = o.pixel_mask.reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).mean(axis=(1, 3))
        assert o.patch_mask.shape == (GRID, GRID)
        np.testing.assert_allclose(o.patch_mask, expect, atol=1e-6)
        union += o.pixel_mask
    assert union.max() == 1, "objects must not overlap"


def test_every_background_kind_and_shape_occurs():
    kinds, shapes = set(), set()
    for s in range(60):
        sc = generate_scene(s)
        kinds.add(sc.background["kind"])
        shapes |= {o.shape for o in sc.objects}
    assert kinds == set(BACKGROUNDS) and shapes == set(SHAPES)


def test_backgrounds_differ_in_local_texture():
    """Flat backgrounds are uniform inside patches; noise ones are not (merging has work to do)."""
    flat = generate_scene(7, n_objects=1, background_kind="flat").image.astype(float)
    noise = generate_scene(7, n_objects=1, background_kind="noise").image.astype(float)
    assert flat[:14, :14].std(axis=(0, 1)).max() == 0 or flat[-14:, -14:].std(axis=(0, 1)).max() == 0
    assert noise.std(axis=(0, 1)).mean() > 5


def _check_question(s):
    objs = s.scene.objects
    assert s.qtype in QUESTION_TYPES
    assert all(0 <= t < len(objs) for t in s.targets) and s.targets
    words = s.question.split()
    if s.qtype == "color":
        shape = words[-2]
        match = [o for o in objs if o.shape == shape]
        assert len(match) == 1 and match[0].color == s.answer and s.targets == (match[0].id,)
    elif s.qtype == "shape":
        color = words[-3]
        match = [o for o in objs if o.color == color]
        assert len(match) == 1 and match[0].shape == s.answer and s.targets == (match[0].id,)
    elif s.qtype == "exists":
        color, shape = words[-3], words[-2]
        present = any(o.color == color and o.shape == shape for o in objs)
        assert s.answer == ("yes" if present else "no")
    elif s.qtype == "count":
        assert s.answer == NUMBER_WORDS[len(objs)] and s.targets == tuple(range(len(objs)))
    else:
        a, b = (objs[i] for i in s.targets)
        assert sum(o.name == a.name for o in objs) == 1 and sum(o.name == b.name for o in objs) == 1
        assert f"the {a.name} relative to the {b.name}" in s.question
        assert relation(a, b) == s.answer


def test_questions_are_unambiguous_and_correct():
    for i in range(100):
        _check_question(make_sample("val", i))


def test_question_types_cycle_with_index():
    assert [make_sample("test", i).qtype for i in range(5)] == list(QUESTION_TYPES)


def test_splits_use_disjoint_seeds():
    seeds = {split: {scene_seed(split, i) for i in range(0, 100_000, 997)} for split in ("train", "val", "test")}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["val"] & seeds["test"])
    assert not (seeds["train"] & seeds["test"])


def test_scene_npz_roundtrip(tmp_path):
    sc = generate_scene(42)
    sc.to_npz(tmp_path / "s.npz")
    back = Scene.from_npz(tmp_path / "s.npz")
    assert np.array_equal(back.image, sc.image) and back.background == sc.background
    for a, b in zip(sc.objects, back.objects):
        assert a.meta() == b.meta()
        assert np.array_equal(a.pixel_mask, b.pixel_mask)
        assert np.array_equal(a.patch_mask, b.patch_mask)


def test_training_pixels_equal_processor_pixels():
    from analysis.toy_model import build_processor, pixel_values
    s = make_sample("test", 3)
    proc = build_processor()
    ref = proc.image_processor(images=s.image, return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(pixel_values(s.scene.image[None]).numpy(), ref.numpy(), atol=1e-5)
