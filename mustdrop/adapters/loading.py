"""Compatibility layer: model loading lives in :mod:`mustdrop.loading` (the hosts need its
ModelLoadError without importing this package)."""

from ..loading import ModelLoadError, hub_reachable, load_llava, pick_device, pick_dtype  # noqa: F401
