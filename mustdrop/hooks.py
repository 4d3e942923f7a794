"""Named hook points that are always removed, also when a run raises (TransformerLens-style)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class HookSet:
    """Collects hook handles under readable names; ``remove()`` detaches every one of them."""

    def __init__(self):
        self._handles: list[tuple[str, torch.utils.hooks.RemovableHandle]] = []

    def pre(self, name: str, module: torch.nn.Module, fn) -> None:
        self._handles.append((name, module.register_forward_pre_hook(fn, with_kwargs=True)))

    def post(self, name: str, module: torch.nn.Module, fn) -> None:
        self._handles.append((name, module.register_forward_hook(fn, with_kwargs=True)))

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self._handles]

    def remove(self) -> None:
        while self._handles:
            self._handles.pop()[1].remove()


@contextmanager
def attached(hooks: HookSet):
    try:
        yield hooks
    finally:
        hooks.remove()


def count_hooks(model: torch.nn.Module) -> int:
    """How many forward / pre-forward hooks are attached anywhere in ``model`` (tests use it)."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return n
