"""The views of the app, one module each; every module registers its views with ``@view``.

A view builds its own components (inside the layout slot app.py opens for it) and draws them from
a Session and a Frame. ``all_views()`` imports every module of this package, so adding a view is
adding a file: the layout and every event's outputs are derived from the registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import REGISTRY, SLOTS, View, view

__all__ = ["REGISTRY", "View", "view", "all_views"]


def all_views() -> list[type[View]]:
    """Every registered view class, in layout order (slot, then order)."""
    for m in pkgutil.iter_modules(__path__):
        if m.name != "base":
            importlib.import_module(f"{__name__}.{m.name}")
    return sorted(REGISTRY, key=lambda v: (SLOTS.index(v.slot), v.order))

