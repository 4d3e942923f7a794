"""Processors for Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision checkpoints on a machine without torchvision.

transformers 5.23 falls back to the PIL image processors (``Qwen2VLImageProcessorPil``,
``LlavaOnevisionImageProcessorPil``) when torchvision is missing, but not for the processors: their video
processors need torchvision, and ``ProcessorMixin`` derives the sub-processors it loads and type-checks from
the ``__init__`` signature (and the settings it saves and restores from ``__init__``'s code object), so neither
``AutoProcessor.from_pretrained`` nor ``video_processor=None`` works. The classes here are the library's own
processors with an ``__init__`` that takes no video processor, spelled out so that ProcessorMixin finds every
other setting. They keep the library's class names, so what they save reads like the published files.
Images and text only: they reject nothing else, but they cannot process videos.

Imported lazily (by ``load_processor`` callers): it imports transformers.
"""

from __future__ import annotations

import transformers


class Qwen2VLProcessor(transformers.Qwen2VLProcessor):
    """transformers' Qwen2VLProcessor without its video processor (torchvision-free)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLProcessor(transformers.Qwen2_5_VLProcessor):
    """transformers' Qwen2_5_VLProcessor without its video processor (torchvision-free)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class LlavaOnevisionProcessor(transformers.LlavaOnevisionProcessor):
    """transformers' LlavaOnevisionProcessor without its video processor (torchvision-free)."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, video_token=video_token, vision_aspect_ratio=vision_aspect_ratio,
                         **kwargs)


IMAGE_ONLY = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor,
              "llava_onevision": LlavaOnevisionProcessor}


def image_only_processor_class(model_type: str) -> type:
    """The image-only processor class for ``model_type`` (one of ``IMAGE_ONLY``)."""
    if model_type not in IMAGE_ONLY:
        raise KeyError(f"no image-only processor for model_type {model_type!r}; known: {sorted(IMAGE_ONLY)}")
    return IMAGE_ONLY[model_type]


def load_processor(model: str, model_type: str | None, **hub):
    """The processor of checkpoint ``model`` (a folder or hub id): the image-only class for the model types
    whose stock processor needs torchvision, ``AutoProcessor`` for every other type. ``hub`` goes to
    ``from_pretrained`` (e.g. ``local_files_only=True``)."""
    if model_type in IMAGE_ONLY:
        return IMAGE_ONLY[model_type].from_pretrained(model, **hub)
    return transformers.AutoProcessor.from_pretrained(model, **hub)
