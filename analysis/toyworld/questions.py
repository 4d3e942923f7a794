"""Question templates with one-word answers, each naming the objects it is about.

Every question is made unambiguous by construction: an object is only referred to by an attribute
(or attribute pair) that no other object in the scene shares, and relative positions are only
asked when one axis clearly dominates. `targets` lists the ids of the objects whose patches a
pruning method must keep for the question to stay answerable:
- colour / shape / position: the object(s) named;
- count: every object;
- existence: every object sharing the asked colour or shape (the near misses that decide "no"),
  or every object when nothing shares either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .palette import COLOR_NAMES, DIRECTIONS, NUMBER_WORDS, SHAPES
from .scene import Scene

QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "exists", "count", "position")

# A relative position is asked only when the dominant axis offset is at least this many pixels and
# this many times the other axis offset.
_MIN_OFFSET = 30.0
_DOMINANCE = 1.5


@dataclass(frozen=True)
class Question:
    qtype: str
    text: str
    answer: str
    targets: tuple[int, ...]


def _unique(scene: Scene, key) -> dict:
    """Attribute value -> object id, for values carried by exactly one object."""
    counts: dict = {}
    for o in scene.objects:
        counts.setdefault(key(o), []).append(o.id)
    return {v: ids[0] for v, ids in counts.items() if len(ids) == 1}


def ask_color(scene: Scene, rng: np.random.Generator) -> Question | None:
    by_shape = _unique(scene, lambda o: o.shape)
    if not by_shape:
        return None
    shape = sorted(by_shape)[rng.integers(len(by_shape))]
    o = scene.objects[by_shape[shape]]
    return Question("color", f"what color is the {shape} ?", o.color, (o.id,))


def ask_shape(scene: Scene, rng: np.random.Generator) -> Question | None:
    by_color = _unique(scene, lambda o: o.color)
    if not by_color:
        return None
    color = sorted(by_color)[rng.integers(len(by_color))]
    o = scene.objects[by_color[color]]
    return Question("shape", f"what shape is the {color} one ?", o.shape, (o.id,))


def ask_exists(scene: Scene, rng: np.random.Generator) -> Question:
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        o = scene.objects[rng.integers(len(scene.objects))]
        color, shape, answer = o.color, o.shape, "yes"
    else:
        # Prefer near misses (colour or shape present) so that "no" needs a real look.
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
        near = [(c, s) for c, s in absent
                if any(o.color == c or o.shape == s for o in scene.objects)]
        pool = near if near and rng.random() < 0.8 else absent
        color, shape = pool[rng.integers(len(pool))]
        answer = "no"
    related = tuple(o.id for o in scene.objects if o.color == color or o.shape == shape)
    targets = related or tuple(o.id for o in scene.objects)
    return Question("exists", f"is there a {color} {shape} ?", answer, targets)


def ask_count(scene: Scene, rng: np.random.Generator) -> Question:
    n = len(scene.objects)
    return Question("count", "how many shapes are there ?", NUMBER_WORDS[n], tuple(range(n)))


def relation(a, b) -> str | None:
    """Where a lies relative to b ('left', 'right', 'above', 'below'), or None if not clear-cut."""
    dx = a.center[0] - b.center[0]
    dy = a.center[1] - b.center[1]
    if abs(dx) >= _MIN_OFFSET and abs(dx) >= _DOMINANCE * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= _MIN_OFFSET and abs(dy) >= _DOMINANCE * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def ask_position(scene: Scene, rng: np.random.Generator) -> Question | None:
    named = _unique(scene, lambda o: (o.color, o.shape))
    ids = sorted(named.values())
    pairs = [(i, j) for i in ids for j in ids if i != j
             and relation(scene.objects[i], scene.objects[j]) is not None]
    if not pairs:
        return None
    i, j = pairs[rng.integers(len(pairs))]
    a, b = scene.objects[i], scene.objects[j]
    rel = relation(a, b)
    assert rel in DIRECTIONS
    return Question("position", f"where is the {a.name} relative to the {b.name} ?", rel, (i, j))


ASKERS = {"color": ask_color, "shape": ask_shape, "exists": ask_exists,
          "count": ask_count, "position": ask_position}


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> Question | None:
    """A question of the given type about the scene, or None when the scene cannot support one."""
    return ASKERS[qtype](scene, rng)


def question_words() -> list[str]:
    """Every word any template or answer can produce (the toy tokenizer's vocabulary)."""
    words = ["what", "color", "is", "the", "shape", "one", "?", "there", "a", "how", "many", "shapes",
             "are", "where", "relative", "to", "yes", "no"]
    words += list(COLOR_NAMES) + list(SHAPES) + list(NUMBER_WORDS) + list(DIRECTIONS)
    return list(dict.fromkeys(words))
