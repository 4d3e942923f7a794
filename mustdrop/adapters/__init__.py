"""One module per host model family: how MustDrop is attached to it by hooks."""

from .llava import LlavaMustDrop, RunResult, Sampling
from .loading import ModelLoadError, load_llava

__all__ = ["LlavaMustDrop", "RunResult", "Sampling", "ModelLoadError", "load_llava"]
