"""Token-dropping methods: one module each, and the registry every list of methods reads.

Built in: mustdrop, fastv, visionzip, fastervlm, pdrop, random, pool. Add your own in one file
(see examples/methods/ and the README's "Bring your own method"): subclass :class:`Method` or
:class:`RankedDrop`, set ``METHOD = YourMethod``, and pass ``--method-file PATH`` to any command,
or declare it in your package's entry-point group ``mustdrop.methods``.
"""

from .base import (DROPPED, KEPT_BOTH, KEPT_PROTECTED, SCORE_ARRAYS, VISION_NEEDS, LayerInputs, Method, MethodError, RankedDrop,
                   VisionInputs, VisionSelection, Words, checked_decide, checked_plan, checked_pre_llm,
                   checked_select_vision)
from .registry import (DEFAULT, ENTRY_POINT_GROUP, baselines, get, is_builtin, labels, load_entry_points, load_file,
                       load_files, names, register, unregister, words_of)

__all__ = ["DEFAULT", "DROPPED", "ENTRY_POINT_GROUP", "KEPT_BOTH", "KEPT_PROTECTED", "SCORE_ARRAYS", "VISION_NEEDS", "LayerInputs",
           "Method", "MethodError", "RankedDrop", "VisionInputs", "VisionSelection", "Words", "baselines",
           "checked_decide", "checked_plan", "checked_pre_llm", "checked_select_vision", "get", "is_builtin", "labels",
           "load_entry_points", "load_file", "load_files", "names", "register", "unregister", "words_of"]
