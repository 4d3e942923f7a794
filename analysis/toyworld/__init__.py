"""A synthetic scene world with ground-truth masks: coloured shapes on varied backgrounds,
one-word questions about them, and the ids of the objects each question is about."""

from .dataset import SPLIT_OFFSETS, Sample, make_sample, scene_questions, scene_seed
from .generate import generate_scene
from .palette import (BACKGROUNDS, COLOR_NAMES, COLORS, DIRECTIONS, GRID, IMAGE_SIZE, MAX_OBJECTS,
                      NUMBER_WORDS, PATCH_SIZE, SHAPES, SIZES)
from .questions import QUESTION_TYPES, Question, ask, question_words, relation
from .scene import Scene, SceneObject, patch_fractions

__all__ = [
    "BACKGROUNDS", "COLORS", "COLOR_NAMES", "DIRECTIONS", "GRID", "IMAGE_SIZE", "MAX_OBJECTS",
    "NUMBER_WORDS", "PATCH_SIZE", "QUESTION_TYPES", "SHAPES", "SIZES", "SPLIT_OFFSETS", "Question",
    "Sample", "Scene", "SceneObject", "ask", "generate_scene", "make_sample", "patch_fractions",
    "question_words", "relation", "scene_questions", "scene_seed",
]
