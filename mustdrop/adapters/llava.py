"""Compatibility layer: the LLaVA-1.5 runner under its old name and the helpers under their old homes.

The code lives in ``mustdrop.hosts`` (what differs per model family: ``hosts/llava.py`` here) and
``mustdrop.run`` (what every family shares). ``LlavaMustDrop(model, processor, model_id, defaults)``
is the shared runner on a :class:`~mustdrop.hosts.llava.LlavaHost`.
"""

from __future__ import annotations

from ..config import ModelDefaults
from ..hosts.base import VisionResult
from ..hosts.llava import LlavaHost, image_mapping
from ..run.decode import MAX_NEW_TOKENS_LIMIT, Sampling, _choose, _eos_ids
from ..run.prompt import MAX_QUESTION_CHARS, input_hash
from ..run.record import _to_host
from ..run.runner import RUN_STAGES, MustDropRunner, RunResult
from ..run.textrows import RowsRope, _RowsRope, text_rows_attention

__all__ = ["LlavaMustDrop", "RunResult", "Sampling", "VisionResult", "RUN_STAGES", "MAX_NEW_TOKENS_LIMIT",
           "MAX_QUESTION_CHARS", "image_mapping", "input_hash", "text_rows_attention", "RowsRope",
           "_RowsRope", "_to_host", "_choose", "_eos_ids"]


class LlavaMustDrop(MustDropRunner):
    """A loaded LLaVA model + processor that runs MustDrop and records a trace."""

    def __init__(self, model, processor, model_id: str = "", defaults: ModelDefaults | None = None):
        super().__init__(LlavaHost(model, processor), model_id, defaults)
