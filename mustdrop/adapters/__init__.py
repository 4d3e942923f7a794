"""The public entry points: load a model, wrap it in a runner. A compatibility layer over
``mustdrop.hosts`` (one module per model family) and ``mustdrop.run`` (the shared machinery)."""

from ..hosts import host_for
from ..run.runner import MustDropRunner
from .llava import LlavaMustDrop, RunResult, Sampling, VisionResult
from .llava_next import LlavaNextMustDrop
from ..loading import ModelLoadError, load_llava

__all__ = ["LlavaMustDrop", "LlavaNextMustDrop", "RunResult", "Sampling", "VisionResult", "ModelLoadError",
           "MustDropRunner", "load_llava", "make_runner"]


def make_runner(model, processor, model_id: str = "", layout: str = "stock", defaults_from: str | None = None):
    """The adapter for a loaded model: LLaVA-1.5 layout (CLIP or SigLIP tower) or LLaVA-NeXT any-res.

    model_id is what traces record; the MustDrop defaults (mustdrop.json) are read from
    defaults_from when given (the folder the weights were loaded from), else from model_id."""
    from mustdrop.config import ModelDefaults

    defaults = None
    if defaults_from is not None:
        defaults = ModelDefaults.load(defaults_from, model.config.text_config.num_hidden_layers)
    return MustDropRunner(host_for(model, processor, layout=layout), model_id, defaults)
