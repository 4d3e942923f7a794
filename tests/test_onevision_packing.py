"""LLaVA-OneVision's packing as cells and weights (mustdrop.hosts.llava_onevision.onevision_packing), pure:

- the 1-D bilinear taps are what F.interpolate (bilinear, align_corners=False) computes: one-hot inputs
  come out as our weights in float64 (to 1e-15: bit for bit where PyTorch's kernels use fused multiply-add);
- the whole packing (base first, tiles joined, unpadded, interpolated, a newline closing every row) equals
  transformers' own ``pack_image_features`` on random features, and on one-hot features cell by cell for
  an image that needs the anyres_max_9 interpolation;
- every crop's mapping and each cell's region on the original image hit the pixels the published image
  processor really placed there (a non-square image; one that needs several tiles).
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mustdrop.hosts.llava_onevision import bilinear_taps, cell_box, onevision_packing

PUBLISHED = Path(__file__).parent / "published" / "llava-onevision-qwen2-0.5b-ov-hf"
CONFIG = json.loads((PUBLISHED / "config.json").read_text())
PINPOINTS = CONFIG["image_grid_pinpoints"]
TILE, PATCH = CONFIG["vision_config"]["image_size"], CONFIG["vision_config"]["patch_size"]
G = TILE // PATCH
# (height, width): non-square without interpolation, the two figures of the unhooked tests, tall, tiny, strip
SIZES = [(300, 500), (1200, 1200), (1700, 300), (40, 50), (300, 2000), (900, 1200), (385, 384)]


def packing(h, w):
    return onevision_packing(h, w, PINPOINTS, TILE, PATCH, max_tiles=9)


def transformers_pack(features, h, w, newline):
    """transformers' pack_image_features of an image of h x w pixels, without building a model."""
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
    cfg = SimpleNamespace(vision_config=SimpleNamespace(image_size=TILE, patch_size=PATCH),
                          image_grid_pinpoints=PINPOINTS)
    packed, _ = LlavaOnevisionModel.pack_image_features(SimpleNamespace(config=cfg), [features],
                                                        torch.tensor([[h, w]]), image_newline=newline,
                                                        vision_aspect_ratio="anyres_max_9")
    return packed[0]


def dense(p, columns):
    """(N, len(columns)) the packing's weights as a matrix over the cells ``columns``."""
    out = np.zeros((len(p.groups), len(columns)))
    where = {c: k for k, c in enumerate(columns)}
    for t, (ids, wts) in enumerate(zip(p.groups, p.weights)):
        for c, wt in zip(ids, wts):
            if c in where:
                out[t, where[c]] += wt
    return out


@pytest.mark.parametrize("n_in, n_out", [(108, 81), (46, 40), (162, 81), (81, 80), (7, 3), (5, 1), (3, 7)])
def test_bilinear_taps_are_what_interpolate_computes(n_in, n_out):
    eye = torch.eye(n_in, dtype=torch.float64).view(1, n_in, 1, n_in)        # channel k: one-hot at input k
    got = torch.nn.functional.interpolate(eye, [1, n_out], mode="bilinear")[0, :, 0].numpy()   # (in, out)
    i0, i1, w0, w1 = bilinear_taps(n_in, n_out)
    want = np.zeros((n_in, n_out))
    np.add.at(want, (i0, np.arange(n_out)), w0)
    np.add.at(want, (i1, np.arange(n_out)), w1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("h, w", SIZES)
def test_packing_equals_transformers_on_random_features(h, w):
    p = packing(h, w)
    n_crops = 1 + p.tiles[0] * p.tiles[1]
    assert len(p.crops) == n_crops and all(c["grid"] == [G, G] for c in p.crops)
    feats = torch.randn(n_crops, G * G, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(h * w))
    newline = torch.arange(5, dtype=torch.float64) - 7.0
    packed = transformers_pack(feats, h, w, newline).numpy()
    assert packed.shape[0] == len(p.groups)
    flat = feats.reshape(-1, 5).numpy()
    mine = (flat[np.maximum(p.groups, 0)] * p.weights[..., None]).sum(1)
    np.testing.assert_allclose(packed[~p.newline], mine[~p.newline], rtol=0, atol=1e-12)
    assert (packed[p.newline] == newline.numpy()).all()
    assert (p.groups[p.newline] == -1).all() and (p.weights[p.newline] == 0).all()
    np.testing.assert_allclose(p.weights[~p.newline].sum(1), 1.0, rtol=0, atol=1e-12)
    assert (p.weights[p.groups < 0] == 0).all() and (p.weights[p.groups >= 0] > 0).all()
    assert p.newline.sum() == p.out[0] and len(p.groups) == G * G + p.out[0] * (p.out[1] + 1)


def test_the_unhooked_token_counts():
    """The figures tests/test_published_new_families.py measured on the unhooked model."""
    small, large = packing(300, 500), packing(1200, 1200)
    assert (len(small.groups), small.interpolated, small.out) == (1998, False, (27, 46))
    assert (len(large.groups), large.interpolated, large.tiles, large.out) == (7371, True, (4, 4), (81, 81))
    assert (large.groups >= 0).sum(1).max() == 4, "an interpolated token mixes up to 2 x 2 cells"


@pytest.mark.parametrize("h, w", [(1200, 1200), (900, 1200)])
def test_packing_equals_transformers_on_one_hot_cells(h, w):
    """Each cell alone (one-hot features over the cells, in chunks): transformers' packed value of every token
    is exactly our weight of that cell in it."""
    p = packing(h, w)
    n_crops = 1 + p.tiles[0] * p.tiles[1]
    cells = np.arange(G * G, n_crops * G * G)                     # the tile cells (the base is one-to-one)
    for chunk in np.array_split(cells, int(np.ceil(len(cells) / 768))):
        feats = torch.zeros(n_crops * G * G, len(chunk), dtype=torch.float64)
        feats[torch.from_numpy(chunk), torch.arange(len(chunk))] = 1.0
        packed = transformers_pack(feats.view(n_crops, G * G, -1), h, w,
                                   torch.zeros(len(chunk), dtype=torch.float64)).numpy()
        np.testing.assert_allclose(packed, dense(p, chunk.tolist()), rtol=0, atol=1e-15)


def marker_image(w, h, x0, y0, size):
    from PIL import Image
    a = np.full((h, w, 3), 30, np.uint8)
    a[y0:y0 + size, x0:x0 + size] = (255, 0, 0)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def image_processor():
    from transformers import AutoImageProcessor
    return AutoImageProcessor.from_pretrained(PUBLISHED)


@pytest.mark.parametrize("w, h, x0, y0, size", [(500, 300, 380, 200, 60), (1200, 900, 700, 130, 160),
                                                (300, 1700, 40, 1200, 120)])
def test_cell_regions_hit_the_pixels_the_processor_placed(image_processor, w, h, x0, y0, size):
    """A red square in the original image: every cell whose region on the original lies inside it (a pixel
    of margin for the resampling) holds red pixels in the crop the processor made, and every cell whose region
    lies clear of it does not; red cells are found in the base image and in the tiles the square crosses."""
    img = marker_image(w, h, x0, y0, size)
    p = packing(h, w)
    pixels = image_processor(images=img, return_tensors="pt")["pixel_values"][0]
    assert pixels.shape[0] == len(p.crops)
    inside_crops, checked = set(), 0
    for c, crop in enumerate(p.crops):
        m = crop["mapping"]
        sx, sy = m["scale_xy"]
        margin = 2.0 / min(sx, sy) + 1.0        # bicubic reaches 2 resized pixels out: in original pixels, plus one
        for row in range(G):
            for col in range(G):
                box = cell_box(m, row, col, PATCH, w, h)
                cell = pixels[c, :, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH]
                if box is None:
                    assert cell.abs().max() == 1.0 or (cell == -1).all() or cell.std() == 0
                    continue
                bx0, by0, bx1, by1 = box
                full = (bx1 - bx0) * sx >= PATCH - 1e-6 and (by1 - by0) * sy >= PATCH - 1e-6   # not cut by the edge
                inside = bx0 >= x0 + margin and by0 >= y0 + margin and bx1 <= x0 + size - margin \
                    and by1 <= y0 + size - margin
                clear = bx1 <= x0 - margin or by1 <= y0 - margin or bx0 >= x0 + size + margin \
                    or by0 >= y0 + size + margin
                mean = cell.mean(dim=(1, 2))
                if inside and full:
                    assert mean[0] > 0.9 and mean[1] < -0.6 and mean[2] < -0.6, (crop["name"], row, col, mean)
                    inside_crops.add(c)
                    checked += 1
                elif clear and full:
                    assert mean[0] < 0.0, (crop["name"], row, col, mean)
                    checked += 1
    assert 0 in inside_crops and len(inside_crops) >= 2
    assert checked > 0.5 * G * G


@pytest.mark.parametrize("h, w", SIZES)
def test_unpadding_keeps_the_cells_that_show_the_image(h, w):
    """The cells transformers' unpadding cuts off show no whole cell of the image (it truncates on the patch
    grid: a 1700 x 300 image loses the two edge columns, which show 6 and 11 of their 14 pixel columns), the
    rest only the tiles' zero padding; nearly all it keeps show some of the image (through each tile's mapping)."""
    p = packing(h, w)
    top, left, rows, cols = p.unpadded
    kept_cells = shown = 0
    for c, crop in enumerate(p.crops[1:], start=1):
        i, j = crop["tile"]
        for row in range(G):
            for col in range(G):
                y, x = i * G + row, j * G + col
                kept = top <= y < top + rows and left <= x < left + cols
                box = cell_box(crop["mapping"], row, col, PATCH, w, h)
                if not kept and box is not None:
                    (sx, sy) = crop["mapping"]["scale_xy"]
                    shown_area = (box[2] - box[0]) * sx * (box[3] - box[1]) * sy
                    assert shown_area < PATCH * PATCH - 1e-6, (crop["name"], row, col, box)
                kept_cells += kept
                shown += kept and box is not None
    assert kept_cells == rows * cols
    assert shown >= (rows - 2) * (cols - 2)
