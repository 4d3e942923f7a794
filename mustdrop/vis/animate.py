"""One sample stepped through the LLM layers, for teaching: ``python -m mustdrop.vis TRACE --animate out.gif``
(or ``out.mp4``).

Frames: stage 1a (merged windows), stage 1b (key tokens), then one frame per LLM layer with two
panels: left, the stage-2 decisions of the last prune layer at or before it (what was dropped there
in vermillion, earlier drops dark grey: the app's rule, Trace.stage2_layer_for); right, the patches
that layer keeps in its KV cache after the stage-3 trim. Every panel is the overlay the app and the
slides draw (mustdrop.vis.overlays), so the colours are the slides' colours. GIF through PIL; MP4
through OpenCV's video writer (its bundled codec), refused with a message where none is available.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..accounting import vanilla_vision_tokens
from .geometry import base_canvas, geometry
from .overlays import filter_overlay, kv_overlay, merge_overlay
from .palette import DEFAULT_OPACITY

CAPTION_H = 44
PANEL = 384


def _caption(width: int, lines: list[str]) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, CAPTION_H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for k, line in enumerate(lines[:3]):
        d.text((8, 4 + 13 * k), line[:160], fill=(0, 0, 0))
    return np.asarray(img)


def _pad(panels: list[np.ndarray]) -> np.ndarray:
    gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [gap, p]
    return np.concatenate(row, axis=1)


def frames(trace, image=None, crop: int = 0, opacity: float = DEFAULT_OPACITY) -> list[np.ndarray]:
    """The animation's frames (RGB arrays of one size)."""
    from .overlays import key_overlay

    geom = geometry(trace, PANEL)
    base = base_canvas(image, trace, geom, crop=crop)
    kw = dict(base=base, crop=crop, opacity=opacity)
    q = str(trace.meta["input"]["question"])
    head = f"{trace.meta['model']['id']} | {trace.meta['config'].get('preset')} | Q: {q} | A: {trace.answer}"
    seq = trace.meta["sequence"]
    out = []
    blank = np.full_like(base, 255)
    out.append(np.concatenate([_caption(2 * base.shape[1] + 8, [head, f"stage 1a: {vanilla_vision_tokens(trace.meta)} vision "
                                                               f"tokens -> {seq['N0']} (merged windows)"]),
                               _pad([merge_overlay(trace, **kw), blank])]))
    out.append(np.concatenate([_caption(2 * base.shape[1] + 8, [head, f"stage 1b: "
                                                               f"{len(trace.meta['stage1b']['key_tokens'])} key tokens"]),
                               _pad([key_overlay(trace, **kw), blank])]))
    per_layer = trace.meta["vision_tokens_per_layer"]
    for layer in range(trace.num_layers):
        pl = trace.stage2_layer_for(layer)
        left = filter_overlay(trace, pl, **kw) if pl is not None and pl <= layer else merge_overlay(trace, **kw)
        rec = trace.stage2(pl) if pl is not None and pl <= layer else None
        what = (f"stage 2 at prune layer {pl}: {rec['dropped']} of {rec['entering']} dropped" if rec
                else "stage 2: no prune layer yet")
        out.append(np.concatenate([
            _caption(2 * base.shape[1] + 8, [head, f"LLM layer {layer} of {trace.num_layers} (0-based): "
                                             f"{per_layer[layer]} vision tokens processed", f"left: {what}; right: "
                                             f"stage 3, this layer's KV cache after the trim"]),
            _pad([left, kv_overlay(trace, layer, **kw)])]))
    return out


def save_animation(trace, out, image=None, crop: int = 0, fps: float = 1.0,
                   opacity: float = DEFAULT_OPACITY) -> Path:
    """Write the frames as a GIF (PIL) or MP4 (OpenCV); ValueError names a format or codec problem."""
    out = Path(out)
    if out.suffix.lower() not in (".gif", ".mp4"):
        raise ValueError(f"--animate writes .gif or .mp4, got {out.name!r}")
    if not 0.1 <= float(fps) <= 30:
        raise ValueError(f"--fps must be in 0.1..30, got {fps}")
    fr = frames(trace, image, crop, opacity)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".gif":
        from PIL import Image

        imgs = [Image.fromarray(f) for f in fr]
        imgs[0].save(out, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
        return out
    import cv2

    h, w = fr[0].shape[:2]
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
    if not writer.isOpened():
        raise ValueError("no MP4 codec is available to OpenCV here; write a .gif instead")
    try:
        for f in fr:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return out
