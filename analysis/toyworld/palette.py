"""The fixed vocabulary of the scene world: shapes, colours, sizes and background kinds.

Colours are saturated and far apart in RGB so that one 14 x 14 patch is enough to name its colour;
backgrounds are drawn only from low-saturation tones so that no background can be mistaken for an
object colour. Everything that a question or an answer can mention is listed here, which is what
the toy model's word-level tokenizer is built from.
"""

from __future__ import annotations

IMAGE_SIZE = 336
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 24

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 20),
    "purple": (150, 40, 200),
    "orange": (250, 130, 0),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# Half-extent (circumradius) in pixels, before a small per-object jitter: roughly 3, 4 and 6 patches wide.
SIZES: dict[str, int] = {"small": 21, "medium": 29, "large": 40}

BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "noise", "stripes")

MAX_OBJECTS = 5
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
DIRECTIONS: tuple[str, ...] = ("left", "right", "above", "below")
