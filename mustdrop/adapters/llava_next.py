"""Compatibility layer: the LLaVA-NeXT runner under its old name (code in ``mustdrop/hosts/llava_next.py``)."""

from __future__ import annotations

from ..hosts.llava_next import LAYOUTS, LlavaNextHost
from ..run.runner import MustDropRunner

__all__ = ["LAYOUTS", "LlavaNextMustDrop"]


class LlavaNextMustDrop(MustDropRunner):
    """A loaded LLaVA-NeXT model + processor that runs MustDrop (``layout`` "stock" or "reference")."""

    def __init__(self, model, processor, model_id: str = "", defaults=None, layout: str = "stock"):
        super().__init__(LlavaNextHost(model, processor, layout=layout), model_id, defaults)
