"""One module per host model family: how MustDrop is attached to it by hooks."""

from .llava import LlavaMustDrop, RunResult, Sampling, VisionResult
from .llava_next import LlavaNextMustDrop
from .loading import ModelLoadError, load_llava

__all__ = ["LlavaMustDrop", "LlavaNextMustDrop", "RunResult", "Sampling", "VisionResult", "ModelLoadError",
           "load_llava", "make_runner"]


def make_runner(model, processor, model_id: str = "", layout: str = "stock", defaults_from: str | None = None):
    """The adapter for a loaded model: LLaVA-1.5 layout (CLIP or SigLIP tower) or LLaVA-NeXT any-res.

    model_id is what traces record; the MustDrop defaults (mustdrop.json) are read from
    defaults_from when given (the folder the weights were loaded from), else from model_id."""
    from mustdrop.config import ModelDefaults

    defaults = None
    if defaults_from is not None:
        defaults = ModelDefaults.load(defaults_from, model.config.text_config.num_hidden_layers)
    if model.config.model_type == "llava_next":
        return LlavaNextMustDrop(model, processor, model_id, defaults, layout=layout)
    return LlavaMustDrop(model, processor, model_id, defaults)
