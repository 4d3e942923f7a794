"""JSON files written whole or not at all: through a temporary file in the same folder, then renamed.

Run folders, summaries and calibration results are read by other processes (the app, a resumed run,
another shard) while they are being written; a reader must never see half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write strict JSON (no NaN; numpy scalars and arrays as numbers and lists) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=False, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
