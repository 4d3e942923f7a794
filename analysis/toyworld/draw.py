"""Rasterisers for backgrounds and shape masks.

Shapes are rasterised to boolean masks first and then painted with one flat colour, without
anti-aliasing, so that "the pixels under an object's mask have that object's colour" holds exactly.
Backgrounds come in four kinds with very different local statistics, so that MustDrop's 3 x 3
window merging (cosine similarity after vision layer 0) has flat regions to merge and textured
ones to leave alone.
"""

from __future__ import annotations

import cv2
import numpy as np

from .palette import IMAGE_SIZE


def _tone(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation background tone: a grey level plus a small tint."""
    grey = rng.uniform(70, 200)
    tint = rng.uniform(-18, 18, size=3)
    return np.clip(grey + tint, 0, 255)


def background(kind: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, dict]:
    """Render a background of the given kind; returns (uint8 (size, size, 3), parameters)."""
    if kind == "flat":
        c = _tone(rng)
        img = np.broadcast_to(c, (size, size, 3)).astype(np.float64)
        params = {"kind": kind, "color": c.round().tolist()}
    elif kind == "gradient":
        a, b = _tone(rng), _tone(rng)
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
        t = (np.cos(theta) * xx + np.sin(theta) * yy)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        img = a * (1 - t[..., None]) + b * t[..., None]
        params = {"kind": kind, "from": a.round().tolist(), "to": b.round().tolist(), "angle": float(theta)}
    elif kind == "noise":
        c = _tone(rng)
        amp = rng.uniform(15, 40)
        scale = int(rng.choice([1, 3, 7]))
        noise = rng.normal(0, 1, size=(size // scale + 1, size // scale + 1))
        noise = cv2.resize(noise, (size, size), interpolation=cv2.INTER_LINEAR)
        noise /= max(noise.std(), 1e-9)
        img = c + amp * noise[..., None]
        params = {"kind": kind, "color": c.round().tolist(), "amplitude": float(amp), "scale": scale}
    elif kind == "stripes":
        a, b = _tone(rng), _tone(rng)
        period = rng.uniform(10, 40)
        theta = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:size, 0:size]
        phase = (np.cos(theta) * xx + np.sin(theta) * yy) / period
        on = (np.floor(phase) % 2 == 0)
        img = np.where(on[..., None], a, b)
        params = {"kind": kind, "a": a.round().tolist(), "b": b.round().tolist(),
                  "period": float(period), "angle": float(theta)}
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    return np.clip(img, 0, 255).round().astype(np.uint8), params


def _polygon_mask(points: np.ndarray, size: int) -> np.ndarray:
    canvas = np.zeros((size, size), np.uint8)
    # Fixed-point coordinates (4 fractional bits) keep sub-pixel placement without anti-aliasing.
    pts = np.round(points * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _regular(n: int, r: float, angle: float, start: float) -> np.ndarray:
    t = start + angle + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def shape_mask(shape: str, center: tuple[float, float], radius: float, angle: float,
               size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of a shape with circumradius `radius` (pixels), rotated by `angle`."""
    cx, cy = center
    if shape == "circle":
        yy, xx = np.mgrid[0:size, 0:size]
        return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius ** 2
    if shape == "square":
        pts = _regular(4, radius, angle, np.pi / 4)
    elif shape == "triangle":
        pts = _regular(3, radius, angle, -np.pi / 2)
    elif shape == "star":
        outer = _regular(5, radius, angle, -np.pi / 2)
        inner = _regular(5, radius * 0.45, angle, -np.pi / 2 + np.pi / 5)
        pts = np.empty((10, 2))
        pts[0::2], pts[1::2] = outer, inner
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return _polygon_mask(pts + np.array([cx, cy]), size)
