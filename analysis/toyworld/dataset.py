"""Train / validation / test splits by disjoint seed ranges, and the one-call sample accessor.

A sample is a pure function of (split, index): the test set regenerates identically anywhere.
Question types cycle with the index (index % 5), so any contiguous run of test indices is balanced
by type; a scene that cannot support the requested type is replaced by the next sub-seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .generate import generate_scene
from .questions import QUESTION_TYPES, Question, ask
from .scene import Scene

SPLIT_OFFSETS = {"train": 0, "val": 100_000_000, "test": 200_000_000}
_SUBSEEDS = 1000  # sub-seeds per index reserved for retries; keeps splits disjoint


@dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str
    scene: Scene
    qtype: str
    targets: tuple[int, ...]


def scene_seed(split: str, index: int, attempt: int = 0) -> int:
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split must be one of {sorted(SPLIT_OFFSETS)}")
    if not 0 <= index < SPLIT_OFFSETS["val"] // _SUBSEEDS:
        raise ValueError("index out of range")
    return SPLIT_OFFSETS[split] + index * _SUBSEEDS + attempt


def make_sample(split: str, index: int, qtype: str | None = None) -> Sample:
    """The index-th (image, question, answer, scene, question type, target ids) of a split."""
    qtype = qtype or QUESTION_TYPES[index % len(QUESTION_TYPES)]
    for attempt in range(_SUBSEEDS):
        seed = scene_seed(split, index, attempt)
        scene = generate_scene(seed)
        q = ask(scene, qtype, np.random.default_rng([seed, 1]))
        if q is not None:
            return Sample(Image.fromarray(scene.image), q.text, q.answer, scene, q.qtype, q.targets)
    raise RuntimeError(f"no scene supports a {qtype} question for {split}[{index}]")


def scene_questions(scene: Scene, k: int, rng: np.random.Generator,
                    type_weights: dict[str, float] | None = None) -> list[Question]:
    """Up to k distinct questions about one scene (used to pack training). Types are drawn uniformly,
    or in proportion to `type_weights` (missing types weigh 0): a scene supports only one count
    question but many position pairs and existence probes, so the realised mix differs from the
    weights."""
    if type_weights is None:
        p = None
    else:
        unknown = set(type_weights) - set(QUESTION_TYPES)
        if unknown:
            raise ValueError(f"unknown question types {sorted(unknown)}; known: {QUESTION_TYPES}")
        w = np.array([max(0.0, float(type_weights.get(t, 0.0))) for t in QUESTION_TYPES])
        if w.sum() <= 0:
            raise ValueError("type_weights must give some question type a positive weight")
        p = w / w.sum()
    out: dict[str, Question] = {}
    for _ in range(4 * k):
        if len(out) == k:
            break
        t = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))] if p is None else rng.choice(QUESTION_TYPES, p=p)
        q = ask(scene, str(t), rng)
        if q is not None:
            out.setdefault(q.text, q)
    return list(out.values())
