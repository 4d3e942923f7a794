"""The example scenes offered under the inputs, and their ground truth.

One format: a folder holding ``examples.json``, a JSON list with one entry per question:

    {"file": "scene_test_0000.png",      # the image, in the folder (required)
     "question": "what color is the star ?",   # required
     "masks": "scene_test_0000.npz",     # optional: Scene.to_npz of analysis.toyworld, whose
                                         #   patch_masks (k, G, G) are the objects' patch coverage
     "target_ids": [0]}                  # optional: the objects (rows of patch_masks) the question asks about

Other keys (answer, question_type, objects ...) are allowed and ignored. Entries naming the same
file are one example with several questions. ``python -m analysis.make_examples`` writes this
file; an entry that cannot be used is skipped with a warning in the log, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mustdrop.images import load_image
from mustdrop.vis import GroundTruth

from .engine import HERE

EXAMPLES_DIR = HERE / "assets" / "examples"
LISTING = "examples.json"

log = logging.getLogger("mustdrop.app")


@dataclass
class Example:
    name: str
    image: str                                        # absolute path
    questions: list = field(default_factory=list)
    masks: np.ndarray | None = None                   # (k, G, G) patch coverage of each object
    targets: dict = field(default_factory=dict)       # normalised question -> ids of the objects it asks about


def normalise_question(q) -> str:
    return " ".join(str(q).split()).lower()


def load_examples(folder: Path = EXAMPLES_DIR) -> list[Example]:
    """The examples listed in ``folder/examples.json`` (see the module docstring); [] without one."""
    listing = Path(folder) / LISTING
    if not listing.is_file():
        return []
    try:
        entries = json.loads(listing.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("no examples: %s cannot be read (%s)", listing, e)
        return []
    if not isinstance(entries, list):
        log.warning("no examples: %s must hold a JSON list of entries", listing)
        return []
    out: dict[str, Example] = {}
    for i, entry in enumerate(entries):
        try:
            _add(out, entry, Path(folder))
        except (ValueError, OSError, KeyError) as e:
            log.warning("skipping example %d of %s: %s", i, listing, e)
    return list(out.values())


def _add(out: dict, entry, folder: Path) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"an entry must be a JSON object, got {type(entry).__name__}")
    file, question = entry.get("file"), entry.get("question")
    if not isinstance(file, str) or not file:
        raise ValueError("the entry names no image ('file')")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{file}: the entry has no question")
    path = (folder / file).resolve()
    if not path.is_file():
        raise ValueError(f"{file} is not in {folder}")
    masks = entry.get("masks")
    if masks is not None:
        if not isinstance(masks, str) or not masks.endswith(".npz"):
            raise ValueError(f"{file}: 'masks' must name an .npz file")
        with np.load(folder / masks, allow_pickle=False) as z:
            if "patch_masks" not in z.files:
                raise ValueError(f"{masks} holds no patch_masks")
            masks = np.asarray(z["patch_masks"], np.float32)
    ids = entry.get("target_ids")
    if ids is not None and (not isinstance(ids, list)
                            or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids)):
        raise ValueError(f"{file}: target_ids must be a list of integers")
    ex = out.setdefault(str(path), Example(Path(file).stem, str(path)))
    if question not in ex.questions:
        ex.questions.append(question)
    if masks is not None:
        ex.masks = masks
    if ids is not None:
        ex.targets[normalise_question(question)] = tuple(ids)


def image_sha(path_or_image) -> str | None:
    """The pixel hash a trace records for its image (None when it cannot be read)."""
    try:
        return hashlib.sha256(np.asarray(load_image(path_or_image)).tobytes()).hexdigest()
    except Exception:  # noqa: BLE001 - an unreadable example has no ground truth
        return None


class GroundTruthIndex:
    """The examples' object masks by image hash: a trace of an example image gets its ground truth."""

    def __init__(self, examples: list[Example]):
        self._by_sha = {}
        for ex in examples:
            if ex.masks is not None:
                sha = image_sha(ex.image)
                if sha:
                    self._by_sha[sha] = ex

    def for_trace(self, trace) -> GroundTruth | None:
        """The example's object masks for this trace's image, the asked-about objects marked."""
        ex = self._by_sha.get(trace.meta["input"]["image"]["sha256"])
        if ex is None:
            return None
        return GroundTruth(ex.masks, ex.targets.get(normalise_question(trace.meta["input"]["question"]), ()))
