"""MustDrop Lens: multi-stage vision token dropping (MustDrop) on transformers' LLaVA, recorded as a trace.

Where things live: stages.py (the four decisions as pure functions), methods/ (one module per
method, built-in or a researcher's file, and the registry every list of methods reads),
adapters/llava.py (where they are attached to the model by hooks), trace.py (the plain-data record every view reads),
accounting.py (equivalent tokens, FLOPs, KV bytes), config.py (knobs and presets).
"""

from .config import MustDropConfig, ModelDefaults
from .trace import Trace, TraceError

__all__ = ["MustDropConfig", "ModelDefaults", "Trace", "TraceError"]
__version__ = "0.1.0"
