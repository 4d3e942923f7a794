"""Loading a LLaVA checkpoint (hub id or local folder) with one code path and clear failures."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

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


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub endpoint (or the HTTPS proxy, when one is set).

    huggingface_hub retries an unreachable hub with backoff (about half a minute); asking once first lets
    an offline machine fail in seconds, or load from the local cache."""
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(on: bool):
    """huggingface_hub's offline mode for the calls inside, as HF_HUB_OFFLINE=1 would set it at import
    (it still asks the network for its agent registry otherwise, even with local_files_only)."""
    if not on:
        yield
        return
    from huggingface_hub import constants
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def load_llava(model: str, device: str | None = None, dtype: str | None = None):
    """Load (model, processor) with transformers' own classes; the shipped model, a folder or a hub id.

    A hub id on a machine that cannot reach the hub is served from the local cache only, or refused at
    once with a message that says so (huggingface_hub alone would retry for about half a minute)."""
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    local = Path(model).exists()
    if local and not (Path(model) / "config.json").is_file():
        raise ModelLoadError(f"{model} is a folder without config.json: not a transformers checkpoint")
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    cache_only = not local and not offline_env and not hub_reachable()
    with _hub_offline(cache_only):
        return _load(model, torch_dtype, device, local_files_only=cache_only,
                     offline=offline_env or cache_only, local=local)


def _load(model, torch_dtype, device, local_files_only: bool, offline: bool, local: bool):
    from transformers import (AutoConfig, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                              LlavaOnevisionForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLForConditionalGeneration)

    from mustdrop.adapters.processors import load_processor

    classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
               "llava_onevision": LlavaOnevisionForConditionalGeneration,
               "qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
    hub = {"local_files_only": True} if local_files_only else {}
    try:
        config = AutoConfig.from_pretrained(model, **hub)
    except (OSError, ValueError) as e:
        offline = offline or "offline" in str(e).lower() or "connect" in str(e).lower()
        hint = (" The model hub cannot be reached from here (offline): pass a local folder such as "
                "assets/toy-llava, or run on a machine with internet access." if offline or not local else "")
        raise ModelLoadError(f"cannot load model {model!r}: {str(e).splitlines()[0]}.{hint}") from None
    if getattr(config, "model_type", None) not in classes:
        raise ModelLoadError(f"{model!r} is a {getattr(config, 'model_type', 'unknown')!r} model; MustDrop Lens "
                             "runs model types " + ", ".join(repr(t) for t in classes))
    try:
        processor = load_processor(model, config.model_type, **hub)
        llava = classes[config.model_type].from_pretrained(model, dtype=torch_dtype, **hub)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the weights or processor of {model!r}: {str(e).splitlines()[0]}") from None
    return llava.to(device).eval(), processor
