"""Scene and object records, with lossless saving to a single .npz (no pickle).

A scene carries its own ground truth: every object's pixel mask and its 24 x 24 patch mask (the
fraction of each 14 x 14 patch it covers). Those patch masks are what pruning decisions are scored
against, so they are stored with the image rather than recomputed by each consumer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .palette import GRID, PATCH_SIZE


def patch_fractions(pixel_mask: np.ndarray) -> np.ndarray:
    """Fraction of each PATCH_SIZE x PATCH_SIZE patch covered by a boolean (H, W) mask -> (GRID, GRID)."""
    h, w = pixel_mask.shape
    blocks = pixel_mask.reshape(h // PATCH_SIZE, PATCH_SIZE, w // PATCH_SIZE, PATCH_SIZE)
    return blocks.mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


@dataclass
class SceneObject:
    """One drawn object. `center` is (x, y) in pixels; `radius` its circumradius in pixels."""

    id: int
    shape: str
    color: str
    rgb: tuple[int, int, int]
    size: str
    center: tuple[float, float]
    radius: float
    angle: float
    pixel_mask: np.ndarray = field(repr=False)  # bool (H, W): exactly the pixels painted with rgb
    patch_mask: np.ndarray = field(repr=False)  # float32 (GRID, GRID): covered fraction per patch

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def meta(self) -> dict:
        return {
            "id": self.id, "shape": self.shape, "color": self.color, "rgb": list(self.rgb),
            "size": self.size, "center": [float(c) for c in self.center],
            "radius": float(self.radius), "angle": float(self.angle),
        }


@dataclass
class Scene:
    """A rendered scene: RGB image (H, W, 3) uint8, its background description and its objects."""

    seed: int
    image: np.ndarray = field(repr=False)
    background: dict
    objects: list[SceneObject]

    def union_patch_mask(self, ids: list[int] | None = None) -> np.ndarray:
        """Patch coverage of the union of the given objects (all objects when ids is None)."""
        chosen = self.objects if ids is None else [self.objects[i] for i in ids]
        if not chosen:
            return np.zeros((GRID, GRID), np.float32)
        pix = np.zeros(self.image.shape[:2], bool)
        for o in chosen:
            pix |= o.pixel_mask
        return patch_fractions(pix)

    def to_npz(self, path: str | Path) -> None:
        """Save image, masks and metadata; reload with Scene.from_npz (allow_pickle stays False)."""
        n = len(self.objects)
        h, w = self.image.shape[:2]
        pixel = np.stack([o.pixel_mask for o in self.objects]) if n else np.zeros((0, h, w), bool)
        patch = np.stack([o.patch_mask for o in self.objects]) if n else np.zeros((0, GRID, GRID), np.float32)
        meta = {"seed": self.seed, "background": self.background, "objects": [o.meta() for o in self.objects]}
        np.savez_compressed(path, image=self.image, pixel_masks=np.packbits(pixel, axis=-1),
                            patch_masks=patch, meta=np.array(json.dumps(meta)))

    @classmethod
    def from_npz(cls, path: str | Path) -> "Scene":
        with np.load(path, allow_pickle=False) as z:
            image = z["image"]
            pixel = np.unpackbits(z["pixel_masks"], axis=-1, count=image.shape[1]).astype(bool)
            patch = z["patch_masks"]
            meta = json.loads(str(z["meta"]))
        objects = []
        for i, m in enumerate(meta["objects"]):
            objects.append(SceneObject(
                id=m["id"], shape=m["shape"], color=m["color"], rgb=tuple(m["rgb"]), size=m["size"],
                center=tuple(m["center"]), radius=m["radius"], angle=m["angle"],
                pixel_mask=pixel[i], patch_mask=patch[i]))
        return cls(seed=meta["seed"], image=image, background=meta["background"], objects=objects)
