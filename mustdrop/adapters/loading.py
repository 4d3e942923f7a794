"""Loading a LLaVA checkpoint (hub id or local folder) with one code path and clear failures."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded or used, with a message that says what to do."""


def pick_device(device: str | None = None) -> str:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for, but no CUDA GPU is available here")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str | None, device: str) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype:
        if dtype not in names:
            raise ModelLoadError(f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16")
        return names[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_llava(model: str, device: str | None = None, dtype: str | None = None):
    """Load (model, processor) with transformers' own classes; the shipped model, a folder or a hub id."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}

    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    local = Path(model).exists()
    if local and not (Path(model) / "config.json").is_file():
        raise ModelLoadError(f"{model} is a folder without config.json: not a transformers checkpoint")
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(e).lower() \
            or "connect" in str(e).lower()
        hint = (" The model hub cannot be reached from here (offline): pass a local folder such as "
                "assets/toy-llava, or run on a machine with internet access." if offline or not local else "")
        raise ModelLoadError(f"cannot load model {model!r}: {str(e).splitlines()[0]}.{hint}") from None
    if getattr(config, "model_type", None) not in classes:
        raise ModelLoadError(f"{model!r} is a {getattr(config, 'model_type', 'unknown')!r} model; MustDrop Lens "
                             "runs LLaVA checkpoints (model_type 'llava' or 'llava_next')")
    try:
        processor = AutoProcessor.from_pretrained(model)
        llava = classes[config.model_type].from_pretrained(model, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the weights or processor of {model!r}: {str(e).splitlines()[0]}") from None
    return llava.to(device).eval(), processor
