"""Named hook points that are always removed, also when a run raises (TransformerLens-style)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class HookSet:
    """Collects hook handles under readable names; ``remove()`` detaches every one of them."""

    def __init__(self):
        self._handles: list[tuple[str, torch.utils.hooks.RemovableHandle]] = []

    def pre(self, name: str, module: torch.nn.Module, fn) -> None:
        self._handles.append((name, module.register_forward_pre_hook(_tag(fn, name), with_kwargs=True)))

    def post(self, name: str, module: torch.nn.Module, fn) -> None:
        self._handles.append((name, module.register_forward_hook(_tag(fn, name), with_kwargs=True)))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop()[1].remove()


def hidden_states_of(args, kwargs):
    """The hidden states a layer is called with, passed positionally or by keyword."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden_states(args, kwargs, new):
    """A pre-hook's return value that hands the layer ``new`` hidden states, however they came."""
    if args:
        return (new,) + tuple(args[1:]), kwargs
    kwargs["hidden_states"] = new
    return args, kwargs


@contextmanager
def attached(hooks: HookSet):
    try:
        yield hooks
    finally:
        hooks.remove()


def _tag(fn, name):
    """Mark a hook as ours, so that it can be told apart from transformers' own (permanent) ones."""
    def hook(*args, **kwargs):
        return fn(*args, **kwargs)
    hook.mustdrop_hook = name
    return hook


def count_hooks(model: torch.nn.Module) -> int:
    """How many MustDrop hooks are attached anywhere in ``model`` (0 outside a run). Transformers'
    own output-capturing hooks, installed once and kept by design, are not counted."""
    n = 0
    for m in model.modules():
        for fn in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values()):
            n += hasattr(fn, "mustdrop_hook")
    return n
