"""LLaVA-OneVision (transformers' LlavaOnevisionForConditionalGeneration): SigLIP tiles, anyres_max_9 packing.

The processor cuts the image as LLaVA-NeXT does (a 384 x 384 base image, then the image resized into the
best pinpoint canvas, centred, zero-padded and cut into 384 x 384 tiles), and the tower (SigLIP, no CLS,
features of its last layer) gives each crop a 27 x 27 patch grid. ``pack_image_features`` then lays the
tiles out as one grid, cuts the padding off (``unpad_image``) and, when that grid holds more than about
9 tiles' worth of patches (sqrt(rows * cols / (9 * 27^2)) > 1.1), shrinks it with bilinear interpolation
(align_corners=False) to int(rows // ratio) x int(cols // ratio): one LLM token then mixes up to 2 x 2
neighbouring cells. One ``image_newline`` token closes every row; the base image's 729 tokens come first.
Unpadding truncates on the cell grid, so it may also cut an edge row or column of cells that shows part of
the image (a 1700 x 300 image loses 6 and 11 of 14 pixel columns at its sides); those pixels reach the LLM
through the base image only.

So the geometry is weighted: :func:`onevision_packing` says, for every LLM token, which tile-grid cells it
covers and with which bilinear weights (derived as PyTorch computes them), which tokens are newlines, and
how each crop maps to the original image's pixels (:func:`cell_box`). It is pure and tested against
transformers' own packing and against ``F.interpolate``.

The host (:class:`LlavaOnevisionHost`, on the LLaVA-1.5 host's SigLIP hooks) runs MustDrop on transformers'
own packing, as the LLaVA-NeXT stock layout does, on the packed features (shortening inside the tower would break the packing):

- stage 1a: window similarity where the authors measure it (after vision layer 0, 3 x 3 windows of each
  crop's 27 x 27 grid); the tokens whose heaviest cell lies in a similar window are averaged into one
  token at the place of the first (its cells and weights are their mean: the weights still sum to 1).
  Without interpolation each token has one cell, and this is exactly NeXT's stock stage 1a.
- stage 1b: the tower has no CLS token, so each patch is scored by the documented substitute (mean
  attention received in the last vision layer, all queries, head mean); a token's score is its cells'
  scores through its bilinear weights (a merged token: the sum over the tokens it replaced, as NeXT sums a
  window), and each crop (the crop of a token's heaviest cell) keeps ceil(rate * n) key tokens.
- the newline tokens are protected: never dropped, never drawn as patches.
- stages 2 and 3, decoding and positions (Qwen2, 1-D rotary) are the shared machinery's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from .. import stages
from ..loading import ModelLoadError
from .base import VisionResult
from .llava import LlavaHost

# Largest cells a token can mix: 2 x 2 under bilinear interpolation.
TAPS = 4


def bilinear_taps(in_size: int, out_size: int):
    """For each output index of a 1-D bilinear resize (align_corners=False, a size and no scale factor,
    as ``pack_image_features`` calls ``F.interpolate``): the two input indices it reads and their weights,
    ``(i0, i1, w0, w1)`` as numpy arrays of length ``out_size``.

    The arithmetic is PyTorch's (``area_pixel_compute_scale`` / ``area_pixel_compute_source_index`` /
    ``guard_index_and_lambda``) in float64: scale = in / out, src = scale * (o + 0.5) - 0.5 clamped at 0,
    i0 = floor(src) (at most in - 1), i1 = i0 + 1 unless i0 is the last index, w1 = src - i0, w0 = 1 - w1.
    src is rounded once (a fused multiply-add, as PyTorch's vectorised CPU kernels and CUDA compute it), so
    the weights are PyTorch's bit for bit in float64 there; a build without FMA differs in the last bit."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = Fraction(in_size / out_size)
    i0 = np.zeros(out_size, np.int64)
    i1 = np.zeros(out_size, np.int64)
    w1 = np.zeros(out_size, np.float64)
    for o in range(out_size):
        src = max(float(scale * Fraction(2 * o + 1, 2) - Fraction(1, 2)), 0.0)
        lo = min(int(math.floor(src)), in_size - 1)
        i0[o] = lo
        i1[o] = lo + (1 if lo < in_size - 1 else 0)
        w1[o] = min(max(src - lo, 0.0), 1.0)
    return i0, i1, 1.0 - w1, w1


def anyres_max(vision_aspect_ratio: str) -> int:
    """The tile budget of an ``anyres_max_N`` aspect-ratio setting (what transformers parses)."""
    if not (isinstance(vision_aspect_ratio, str) and vision_aspect_ratio.startswith("anyres_max_")
            and vision_aspect_ratio[len("anyres_max_"):].isdigit()):
        raise ValueError(f"vision_aspect_ratio must be 'anyres_max_N', got {vision_aspect_ratio!r}")
    return int(vision_aspect_ratio[len("anyres_max_"):])


@dataclass(frozen=True)
class OnevisionPacking:
    """Where every LLM token of one image comes from. Crop 0 is the base image, crop 1 + i * cols + j the
    tile (i, j); global cell id = crop * G * G + row * G + col (G = the grid side of one crop)."""

    tiles: tuple            # (rows, cols) of tiles
    grid: int               # G: each crop's grid is G x G
    unpadded: tuple         # (top, left, rows, cols): the part of the tiles' joint grid unpadding keeps
    out: tuple              # (rows, cols) of tile tokens after interpolation (= unpadded size when none)
    interpolated: bool
    groups: np.ndarray      # (N, 4) int64 global cell ids, -1 padded; a newline row is all -1
    weights: np.ndarray     # (N, 4) float64 bilinear weight of each cell, 0 on padding (sums to 1 per token)
    newline: np.ndarray     # (N,) bool
    crops: list             # per crop: name, grid [G, G], (tile), mapping original pixel -> crop pixel

    @property
    def crop_of(self) -> np.ndarray:
        """(N,) the crop of each token's heaviest cell; -1 for newlines."""
        first = np.argmax(self.weights, axis=1)
        heaviest = self.groups[np.arange(len(self.groups)), first]
        return np.where(heaviest >= 0, heaviest // (self.grid * self.grid), -1)


def onevision_packing(height: int, width: int, pinpoints, tile_size: int, patch_size: int,
                      max_tiles: int = 9) -> OnevisionPacking:
    """The packing ``pack_image_features`` applies to an image of ``height`` x ``width`` pixels (its
    ``image_sizes`` entry), as cells and weights instead of features (see the module docstring)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (get_anyres_image_grid_shape,
                                                                              unpad_image)

    G = tile_size // patch_size
    rows_t, cols_t = get_anyres_image_grid_shape((height, width), pinpoints, tile_size)
    R, C = rows_t * G, cols_t * G
    # the joint grid of the tiles, cell by cell: tile (i, j), cell (r, c) -> crop 1 + i * cols_t + j
    Y, X = np.meshgrid(np.arange(R), np.arange(C), indexing="ij")
    joint = (1 + (Y // G) * cols_t + X // G) * G * G + (Y % G) * G + X % G
    coords = torch.from_numpy(np.stack([Y, X]))
    kept = unpad_image(coords, (height, width)).numpy()            # the library's own unpadding, on coordinates
    h, w = kept.shape[1:]
    top, left = int(kept[0, 0, 0]), int(kept[1, 0, 0])
    cells = joint[top:top + h, left:left + w]
    ratio = math.sqrt(h * w / (max_tiles * G ** 2))
    interpolated = ratio > 1.1
    if interpolated:
        oh, ow = int(h // ratio), int(w // ratio)
        ry0, ry1, wy0, wy1 = bilinear_taps(h, oh)
        rx0, rx1, wx0, wx1 = bilinear_taps(w, ow)
        ids = np.stack([cells[ry0][:, rx0], cells[ry0][:, rx1], cells[ry1][:, rx0], cells[ry1][:, rx1]], -1)
        wts = np.stack([np.outer(wy0, wx0), np.outer(wy0, wx1), np.outer(wy1, wx0), np.outer(wy1, wx1)], -1)
    else:
        oh, ow = h, w
        ids = np.full((h, w, TAPS), -1, np.int64)
        ids[..., 0] = cells
        wts = np.zeros((h, w, TAPS))
        wts[..., 0] = 1.0
    ids, wts = _merge_repeats(ids.reshape(-1, TAPS), wts.reshape(-1, TAPS))
    tile_groups = np.full((oh, ow + 1, TAPS), -1, np.int64)           # one newline column closes each row
    tile_weights = np.zeros((oh, ow + 1, TAPS))
    tile_groups[:, :ow] = ids.reshape(oh, ow, TAPS)
    tile_weights[:, :ow] = wts.reshape(oh, ow, TAPS)
    base = np.full((G * G, TAPS), -1, np.int64)
    base[:, 0] = np.arange(G * G)
    base_w = np.zeros((G * G, TAPS))
    base_w[:, 0] = 1.0
    groups = np.concatenate([base, tile_groups.reshape(-1, TAPS)])
    weights = np.concatenate([base_w, tile_weights.reshape(-1, TAPS)])
    newline = np.zeros(len(groups), bool)
    newline[G * G:] = np.tile(np.arange(ow + 1) == ow, oh)
    return OnevisionPacking((rows_t, cols_t), G, (top, left, h, w), (oh, ow), interpolated, groups, weights,
                            newline, tile_crops(height, width, pinpoints, tile_size, patch_size, rows_t * cols_t))


def _merge_repeats(ids: np.ndarray, wts: np.ndarray):
    """Each token's cells once, heaviest first: a repeated cell (the last row or column reads the same
    index twice) gets the sum of its weights, and cells of weight 0 are left out (-1, weight 0)."""
    out_ids = np.full_like(ids, -1)
    out_w = np.zeros_like(wts)
    for t in range(len(ids)):
        acc: dict[int, float] = {}
        for cell, wt in zip(ids[t].tolist(), wts[t].tolist()):
            if wt > 0:
                acc[cell] = acc.get(cell, 0.0) + wt
        for k, (cell, wt) in enumerate(sorted(acc.items(), key=lambda cw: (-cw[1], cw[0]))):
            out_ids[t, k], out_w[t, k] = cell, wt
    return out_ids, out_w


def tile_crops(height: int, width: int, pinpoints, tile_size: int, patch_size: int, n_tiles: int) -> list:
    """Each crop's name, grid and mapping, crop pixel (u, v) = (x * sx + ox, y * sy + oy) for original pixel
    (x, y): the base image is resized to tile_size x tile_size (aspect not kept); the tiles cut the image
    resized into the best pinpoint canvas (aspect kept, ``get_patch_output_size``) and centred on it."""
    from transformers.image_processing_utils import select_best_resolution

    G = tile_size // patch_size
    crops = [{"name": "base", "grid": [G, G],
              "mapping": {"kind": "resize", "scale": tile_size / width, "scale_xy": [tile_size / width,
                          tile_size / height], "offset": [0, 0], "resized": [tile_size, tile_size],
                          "processed": tile_size}}]
    bh, bw = select_best_resolution((height, width), pinpoints)
    scale_w, scale_h = bw / width, bh / height
    if scale_w < scale_h:
        new_w, new_h = bw, min(math.ceil(height * scale_w), bh)
    else:
        new_h, new_w = bh, min(math.ceil(width * scale_h), bw)
    paste_x, paste_y = (bw - new_w) // 2, (bh - new_h) // 2
    cols = bw // tile_size
    for t in range(n_tiles):
        i, j = divmod(t, cols)
        crops.append({"name": f"tile {i},{j}", "tile": [i, j], "grid": [G, G],
                      "mapping": {"kind": "anyres_tile", "scale": new_w / width, "scale_xy": [new_w / width,
                                  new_h / height], "offset": [paste_x - j * tile_size, paste_y - i * tile_size],
                                  "resized": [new_w, new_h], "canvas": [bw, bh], "processed": tile_size}})
    return crops


def cell_box(mapping: dict, row: int, col: int, patch_size: int, width: int, height: int):
    """The region (x0, y0, x1, y1) of the original W x H image that cell (row, col) of a crop shows, through
    the crop's mapping, clipped to the image; None when the cell shows only padding."""
    (sx, sy), (ox, oy) = mapping["scale_xy"], mapping["offset"]
    x0, x1 = (col * patch_size - ox) / sx, ((col + 1) * patch_size - ox) / sx
    y0, y1 = (row * patch_size - oy) / sy, ((row + 1) * patch_size - oy) / sy
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, y0, x1, y1


class LlavaOnevisionHost(LlavaHost):
    """LLaVA-OneVision: NeXT's any-res crops on a SigLIP tower (no CLS), packed with anyres_max_N interpolation.
    The tower's hooks, inputs and key score are LLaVA-1.5's (SigLIP); the crops and packing are this module's.

    Only the stock layout exists: the authors' flat concatenation ('reference') is LLaVA-NeXT's."""

    family = "llava_onevision"
    layout = "stock"

    def __init__(self, model, processor, layout: str = "stock"):
        if layout != "stock":
            raise ValueError(f"LLaVA-OneVision runs transformers' own packing (layout 'stock') only; the authors' "
                             f"flat layout is defined for LLaVA-NeXT, got layout {layout!r}")
        super().__init__(model, processor)
        if self.has_cls:
            raise ModelLoadError("LLaVA-OneVision with a CLS tower is not supported (the published ones are SigLIP)")
        cfg = model.config
        self.pinpoints = cfg.image_grid_pinpoints
        self.max_tiles = anyres_max(getattr(cfg, "vision_aspect_ratio", "anyres_max_9"))

    def method_refusal(self, method) -> str | None:
        if method.selects_before_llm:
            return (f"the {method.name} baseline is defined on one square grid of one crop; LLaVA-OneVision "
                    "packs a base image and interpolated tiles: use LLaVA-1.5 layouts for it")
        return super().method_refusal(method)

    def packing(self, inputs) -> OnevisionPacking:
        """The packing of the image the processor saw (its ``image_sizes`` entry)."""
        height, width = (int(v) for v in inputs["image_sizes"][0].tolist())
        vc = self.vision_config
        return onevision_packing(height, width, self.pinpoints, vc.image_size, vc.patch_size, self.max_tiles)

    def encode(self, inputs, img, config) -> VisionResult:
        G = self.grid
        features, layer0, qk = self.packed_features(inputs, config)
        pack = self.packing(inputs)
        if features.shape[0] != len(pack.groups):
            raise RuntimeError(f"the model packed {features.shape[0]} rows, the OneVision geometry says "
                               f"{len(pack.groups)}: transformers' packing has changed")
        n_crops = len(pack.crops)
        cells = [{int(c): float(w) for c, w in zip(g, wt) if c >= 0} for g, wt in zip(pack.groups, pack.weights)]
        crop_of = pack.crop_of
        score = None
        if config.key_set:
            patch_score = self.key_scores(qk).mean(1).flatten().double().cpu().numpy()   # (n_crops * G2,)
            score = [sum(w * patch_score[c] for c, w in cw.items()) for cw in cells]
        keep = np.ones(len(cells), bool)
        built = np.zeros(len(cells), bool)             # by stage 1a (an interpolated token covers 4 cells unmerged)
        similarity, merged_windows = [None] * n_crops, [[] for _ in range(n_crops)]
        if config.merge:
            features = features.clone()
            members = _window_members(pack, G, config.window)
            for c in range(n_crops):
                sim = stages.window_similarity(layer0["h"][c], G, config.window)
                similarity[c] = sim
                for wdx in stages.windows_to_merge(sim, config.merge_threshold).tolist():
                    pos = members.get((c, wdx), [])
                    if len(pos) < 2:
                        continue                       # unpadded away (or one token left): nothing to merge
                    at = torch.tensor(pos, device=features.device)
                    features[pos[0]] = features[at].float().mean(0).to(features.dtype)
                    merged: dict[int, float] = {}
                    for p in pos:
                        for cell, w in cells[p].items():
                            merged[cell] = merged.get(cell, 0.0) + w / len(pos)
                    cells[pos[0]] = merged
                    if score is not None:
                        score[pos[0]] = sum(score[p] for p in pos)
                    keep[pos[1:]] = False
                    built[pos[0]] = True
                    merged_windows[c].append(wdx)
        positions = np.flatnonzero(keep)
        features = features[torch.from_numpy(positions).to(features.device)]
        groups, weights = _pad_cells([cells[p] for p in positions], features.device)
        newline = torch.from_numpy(np.flatnonzero(pack.newline[positions]))
        key_score, key_tokens = None, torch.zeros(0, dtype=torch.long, device=features.device)
        if score is not None:
            key_score = torch.tensor([score[p] for p in positions], dtype=torch.float32, device=features.device)
            key_tokens = stages.key_token_set_per_crop(key_score, torch.from_numpy(crop_of[positions]).to(
                features.device), config.key_keep_rate)
        crops = [{**crop, "merged_windows": merged_windows[c]} for c, crop in enumerate(pack.crops)]
        return VisionResult(features, groups, key_tokens, key_score, newline.to(features.device), crops, similarity,
                            weights=weights, merged=torch.from_numpy(built[positions]).to(features.device))


def _window_members(pack: OnevisionPacking, grid: int, window: int) -> dict:
    """(crop, window index) -> the packed positions, ascending, of the tokens whose heaviest cell lies in that
    window of that crop (window index in ``stages.window_patch_ids`` order: row-major over the windows)."""
    heaviest = pack.groups[np.arange(len(pack.groups)), np.argmax(pack.weights, axis=1)]
    g2, per_row = grid * grid, grid // window
    out: dict = {}
    for pos in np.flatnonzero(heaviest >= 0).tolist():
        crop, patch = divmod(int(heaviest[pos]), g2)
        row, col = divmod(patch, grid)
        out.setdefault((crop, (row // window) * per_row + col // window), []).append(pos)
    return out


def _pad_cells(cells: list, device):
    """(N, k) cell ids (-1 padded) and float32 weights (0 on padding), heaviest first, from per-token dicts."""
    width = max(1, max(len(cw) for cw in cells))
    groups = np.full((len(cells), width), -1, np.int64)
    weights = np.zeros((len(cells), width), np.float32)
    for t, cw in enumerate(cells):
        for k, (cell, w) in enumerate(sorted(cw.items(), key=lambda item: (-item[1], item[0]))):
            groups[t, k], weights[t, k] = cell, w
    return torch.from_numpy(groups).to(device), torch.from_numpy(weights).to(device)
