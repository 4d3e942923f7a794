"""What one visitor is looking at: the traces of a run and what is drawn from them.

A Session lives in the visitor's ``gr.State``; every view draws from a Session and a Frame, never
from the model. Beside the MustDrop and vanilla traces it may hold a comparison: a same-budget
baseline's trace of the same input (run by "compare with", or uploaded with the others). A Frame is
the part of the page state a redraw depends on: the LLM layer on the slider, the inspected patch,
whether ground-truth outlines are shown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mustdrop import vis
from mustdrop.trace import Trace, TraceError
from mustdrop.vis import compare as vis_compare

CANVAS = 480                               # overlay size in pixels (G * cell)


@dataclass
class Session:
    trace: Trace                                     # the MustDrop run (the vanilla one when preset is off)
    vanilla: Trace | None = None
    views: list[np.ndarray] | None = None            # the image as the model saw it, per crop; None: grey
    gt: vis.GroundTruth | None = None                # the example's object masks, when the image is one
    files: list[str] = field(default_factory=list)   # the trace files offered for download
    note: str = ""
    crop: int = 0
    compare: Trace | None = None                     # a same-budget baseline of the same input, or None
    opacity: float = vis.DEFAULT_OPACITY             # how strongly the category colours tint the image
    image_name: str = ""                             # the image's file name, for the slide file names
    _canvases: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of_run(cls, trace: Trace, vanilla: Trace | None, image, gt=None, files=(), note="",
               compare: Trace | None = None) -> "Session":
        """A session whose overlays are drawn on ``image`` (None: on grey)."""
        if compare is not None:
            vis_compare.check_pair(trace, compare)
        views = None if image is None else [vis.model_view(image, trace, crop=c) for c in range(trace.n_crops)]
        return cls(trace, vanilla, views, gt, list(files), note, compare=compare)

    @property
    def geometry(self) -> vis.Geometry:
        return vis.geometry(self.trace, CANVAS, crop=self.crop)

    def canvas(self) -> np.ndarray:
        """The dimmed background of the crop shown, built once per crop (every redraw paints on it)."""
        c = self.crop
        if c not in self._canvases:
            view = self.views[c] if self.views else None
            self._canvases[c] = vis.base_canvas(None, self.trace, self.geometry, view=view, crop=c)
        return self._canvases[c]

    def ground_truth(self, show: bool) -> vis.GroundTruth | None:
        """The outlines to draw: the masks are of the base image, so none on a LLaVA-NeXT tile."""
        return self.gt if show and self.crop == 0 else None

    def show_crop(self, crop) -> None:
        c = int(crop or 0)
        if not 0 <= c < self.trace.n_crops:
            raise ValueError(f"crop {c} is not in this trace")
        self.crop = c

    def crop_choices(self) -> list[tuple[str, int]]:
        return [(self.trace.crop_name(c), c) for c in range(self.trace.n_crops)]


@dataclass(frozen=True)
class Frame:
    layer: int = 0
    selected: tuple[int, int] | None = None
    show_gt: bool = True
    started: float = field(default_factory=time.perf_counter)   # when the redraw began (the caption says how long)

    @classmethod
    def of(cls, session: Session, layer, selected=None, show_gt=True) -> "Frame":
        """The frame of the page's inputs, the layer clamped to the trace's layers."""
        L = session.trace.num_layers
        return cls(int(min(max(int(layer or 0), 0), L - 1)), tuple(selected) if selected else None, bool(show_gt))

    def kw(self, session: Session) -> dict:
        """The drawing arguments every overlay of this frame takes."""
        return dict(base=session.canvas(), selected=self.selected, gt_masks=session.ground_truth(self.show_gt),
                    crop=session.crop, opacity=session.opacity)


def split_comparison(traces: list[Trace]) -> tuple[list[Trace], Trace | None]:
    """Uploaded traces as (MustDrop + vanilla ones, comparison or None): a baseline's trace is the
    comparison when a MustDrop run that prunes is among them; alone (or with its vanilla trace) it
    is replayed as the run itself."""
    pruning = [t for t in traces if not vis_compare.is_baseline(t) and not t.is_vanilla]
    others = [t for t in traces if vis_compare.is_baseline(t)]
    if not pruning or not others:
        return list(traces), None
    if len(others) > 1:
        raise TraceError("upload at most one comparison (same-budget baseline) trace beside the MustDrop trace")
    return [t for t in traces if t is not others[0]], others[0]


def pair_traces(traces: list[Trace]) -> tuple[Trace, Trace | None]:
    """(MustDrop trace, vanilla trace or None) of one or two uploaded traces of the same input."""
    if len(traces) > 2:
        raise TraceError("upload one MustDrop trace, optionally with its vanilla trace (two files at most)")
    vanilla = [t.is_vanilla for t in traces]
    if len(traces) == 2 and vanilla[0] == vanilla[1]:
        raise TraceError("two traces of the same kind: upload one MustDrop trace and one vanilla trace")
    md = next((t for t, v in zip(traces, vanilla) if not v), traces[0])
    va = next((t for t, v in zip(traces, vanilla) if v), None)
    if va is not None and not vis_compare.same_input(md, va):
        raise TraceError("the vanilla trace is of another image, question or model than the MustDrop trace")
    return md, va


def save_comparison(compare: Trace | None, beside: str) -> list[str]:
    """The comparison trace as a file to download, in the folder of the run's other traces."""
    if compare is None:
        return []
    method = compare.meta["config"].get("method")
    return [str(compare.save(Path(beside).parent / f"compare-{method}.safetensors"))]
