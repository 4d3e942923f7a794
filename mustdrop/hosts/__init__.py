"""One module per model family: what differs between them, behind the :class:`~.base.Host` interface.

- ``base``        the interface (``Host``) and what stage 1 hands the LLM (``VisionResult``)
- ``llava``       LLaVA-1.5 layout: one square crop, CLIP (CLS) or SigLIP (no CLS) tower
- ``llava_next``  LLaVA-NeXT any-res: base image + tiles, stock or reference layout
- ``qwen_vl``     Qwen2-VL / Qwen2.5-VL: dynamic resolution, 2 x 2 merger, 3-D positions (``qwen_vl_geometry``)
- ``llava_onevision``  LLaVA-OneVision: SigLIP tiles packed with anyres_max_9 interpolation (weighted tokens)

``host_for(model, processor, layout)`` picks the host of a loaded model.
"""

from .base import Host, VisionResult


def host_for(model, processor, layout: str = "stock") -> Host:
    """The host of a loaded transformers model, by its model_type."""
    if model.config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        from .qwen_vl import QwenVLHost
        return QwenVLHost(model, processor)
    if model.config.model_type == "llava_onevision":
        from .llava_onevision import LlavaOnevisionHost
        return LlavaOnevisionHost(model, processor, layout=layout)
    if model.config.model_type == "llava_next":
        from .llava_next import LlavaNextHost
        return LlavaNextHost(model, processor, layout=layout)
    from .llava import LlavaHost
    return LlavaHost(model, processor)


__all__ = ["Host", "VisionResult", "host_for"]
