"""One module per host model family: how MustDrop is attached to it by hooks."""

from .llava import LlavaMustDrop, RunResult, Sampling, VisionResult
from .llava_next import LlavaNextMustDrop
from .loading import ModelLoadError, load_llava

__all__ = ["LlavaMustDrop", "LlavaNextMustDrop", "RunResult", "Sampling", "VisionResult", "ModelLoadError",
           "load_llava", "make_runner"]


def make_runner(model, processor, model_id: str = "", layout: str = "stock"):
    """The adapter for a loaded model: LLaVA-1.5 layout (CLIP or SigLIP tower) or LLaVA-NeXT any-res."""
    if model.config.model_type == "llava_next":
        return LlavaNextMustDrop(model, processor, model_id, layout=layout)
    return LlavaMustDrop(model, processor, model_id)
