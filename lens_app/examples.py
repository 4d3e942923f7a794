"""The example scenes offered under the inputs, and their ground truth.

One format: a folder holding ``examples.json``, a JSON list with one entry per question:

    {"file": "scene_test_0000.png",      # the image, in the folder (required)
     "question": "what color is the star ?",   # required
     "masks": "scene_test_0000.npz",     # optional: Scene.to_npz of analysis.toyworld, whose
                                         #   patch_masks (k, G, G) are the objects' patch coverage
     "target_ids": [0],                  # optional: the objects (rows of patch_masks) the question asks about
     "world": "scene"}                   # optional: "scene" (default; the scene world of analysis.toyworld)
                                         #   or "photo" (a natural photograph)

Other keys (answer, question_type, objects ...) are allowed and ignored; an entry without "world"
whose question_type is "natural_photo" is a photo. Entries naming the same file are one example
with several questions. ``python -m analysis.make_examples`` writes this file; an entry that cannot
be used is skipped with a warning in the log, never an error.

Which examples the app offers depends on the model (``offer``): a model with a closed word-level
vocabulary (the shipped toy, trained on the scene world only) is offered the scene questions it
can read, and the photos only as images under a note that names a checkpoint for them; any other
model is offered every question, the photos' first.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mustdrop.images import load_image, pixel_sha256
from mustdrop.vis import GroundTruth
from mustdrop.vis.text import md_code

from .engine import DEFAULT_MODEL, HERE

EXAMPLES_DIR = HERE / "assets" / "examples"
LISTING = "examples.json"
WORLDS = ("scene", "photo")
QUESTIONS_PER_EXAMPLE = 2                              # rows offered per example image
PHOTO_CHECKPOINTS = (("llava-hf/llava-1.5-7b-hf", "GPU"), ("llava-hf/llava-interleave-qwen-0.5b-hf", "fits a CPU"))

log = logging.getLogger("mustdrop.app")


@dataclass
class Example:
    name: str
    image: str                                        # absolute path
    questions: list = field(default_factory=list)
    masks: np.ndarray | None = None                   # (k, G, G) patch coverage of each object
    targets: dict = field(default_factory=dict)       # normalised question -> ids of the objects it asks about
    world: str = "scene"                              # "scene" (the scene world) or "photo"


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
    world = entry.get("world") or ("photo" if entry.get("question_type") == "natural_photo" else "scene")
    if world not in WORLDS:
        raise ValueError(f"{file}: 'world' must be one of {', '.join(WORLDS)}, got {world!r}")
    ex = out.setdefault(str(path), Example(Path(file).stem, str(path), world=world))
    if question not in ex.questions:
        ex.questions.append(question)
    if masks is not None:
        ex.masks = masks
    if ids is not None:
        ex.targets[normalise_question(question)] = tuple(ids)


def image_sha(path_or_image) -> str | None:
    """The pixel hash a trace records for its image (None when it cannot be read)."""
    try:
        return pixel_sha256(load_image(path_or_image))
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


# ----------------------------------------------------------------------------- what the app offers
def closed_vocabulary(tokenizer) -> bool:
    """Whether the tokenizer knows a closed list of words (a word-level model, as the scene-world toy
    models of analysis/train_toy.py have): any other word reaches the model as the unknown token,
    so the model can answer only questions of the world it was trained on. The published LLaVA
    checkpoints use SentencePiece or byte-level BPE, which spell any word."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordLevel"


def reads(tokenizer, question: str) -> bool:
    """Whether every word of the question is one the tokenizer knows (no unknown token)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    return unk is None or unk not in tokenizer(question, add_special_tokens=False)["input_ids"]


@dataclass
class Offer:
    """The examples the page shows for one model."""
    rows: list                 # [image path, question] pairs, offered together
    photos: list               # image paths offered without a question (a closed-vocabulary model)
    label: str                 # the heading of ``rows``
    note: str = ""             # why ``photos`` come without questions, and which checkpoint to load


def offer(examples: list[Example], tokenizer=None, model_label: str = "the model") -> Offer:
    """What the page offers with this model loaded (``tokenizer`` None: no model; every question).

    A closed-vocabulary model gets only the scene questions it reads; the photos come as images,
    under a note that it knows the scene world only and names the checkpoints to load for photos.
    Any other model gets the photos' questions (what, how many, which colour) first, then the scenes'.
    """
    def rows_of(exs):
        return [[ex.image, q] for ex in exs for q in ex.questions[:QUESTIONS_PER_EXAMPLE]]

    scenes = [ex for ex in examples if ex.world == "scene"]
    photos = [ex for ex in examples if ex.world == "photo"]
    if tokenizer is None or not closed_vocabulary(tokenizer):
        label = "Examples: photos and scene-world scenes" if photos and scenes else "Examples"
        return Offer(rows_of(photos) + rows_of(scenes), [], label)
    rows = [r for r in rows_of(scenes) if reads(tokenizer, r[1])]
    note = ""
    if photos:
        (first, where), *more = PHOTO_CHECKPOINTS
        flags = "".join(f", or `--model {c}` ({w})" for c, w in more)       # PHOTO_CHECKPOINTS: ours
        who = f"The shipped model {md_code(model_label)}" if model_label == DEFAULT_MODEL else md_code(model_label)
        note = (f"**Photos need a real checkpoint.** {who} knows the scene world only ({len(tokenizer)} "
                f"words): it cannot say what a photo shows, so the photos below come without a question. "
                f"For photos start the app with `python viz_app.py --model {first}` ({where}){flags}.")
    return Offer(rows, [ex.image for ex in photos], "Scene-world examples (the questions this model was trained on)",
                 note)
