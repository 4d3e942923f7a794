"""Seeded scene generator: one integer seed -> one fully determined Scene.

Objects never overlap (their circumscribed circles are kept apart), so every object is fully
visible and its mask is exactly its drawn pixels; the number of objects (1..MAX_OBJECTS) is drawn
uniformly so that count answers are balanced.
"""

from __future__ import annotations

import numpy as np

from .draw import background, shape_mask
from .palette import BACKGROUNDS, COLORS, COLOR_NAMES, IMAGE_SIZE, MAX_OBJECTS, SHAPES, SIZES
from .scene import Scene, SceneObject, patch_fractions

_GAP = 6.0      # minimum free pixels between two objects' circumscribed circles
_MARGIN = 4.0   # minimum free pixels between an object and the image border


def generate_scene(seed: int, n_objects: int | None = None, background_kind: str | None = None) -> Scene:
    """Render the scene of `seed`. Optional overrides fix the object count or background kind."""
    rng = np.random.default_rng(seed)
    kind = background_kind or str(rng.choice(BACKGROUNDS))
    image, bg = background(kind, rng)
    n = int(n_objects if n_objects is not None else rng.integers(1, MAX_OBJECTS + 1))

    placed: list[tuple[float, float, float]] = []
    objects: list[SceneObject] = []
    attempts = 0
    while len(objects) < n:
        attempts += 1
        if attempts > 2000:  # practically unreachable with 5 objects on 336 px; restart deterministically
            return generate_scene(seed * 7919 + 1, n_objects=n, background_kind=kind)
        size = str(rng.choice(list(SIZES)))
        radius = SIZES[size] * rng.uniform(0.9, 1.1)
        lo, hi = radius + _MARGIN, IMAGE_SIZE - radius - _MARGIN
        cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
        if any((cx - x) ** 2 + (cy - y) ** 2 < (radius + r + _GAP) ** 2 for x, y, r in placed):
            continue
        shape = str(rng.choice(SHAPES))
        color = str(rng.choice(COLOR_NAMES))
        angle = float(rng.uniform(-0.3, 0.3))
        mask = shape_mask(shape, (cx, cy), radius, angle)
        rgb = COLORS[color]
        image[mask] = rgb
        placed.append((cx, cy, radius))
        objects.append(SceneObject(id=len(objects), shape=shape, color=color, rgb=rgb, size=size,
                                   center=(float(cx), float(cy)), radius=float(radius), angle=angle,
                                   pixel_mask=mask, patch_mask=patch_fractions(mask)))
    return Scene(seed=seed, image=image, background=bg, objects=objects)
