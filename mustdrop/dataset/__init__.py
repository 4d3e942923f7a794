"""The dataset lens: a run folder (many samples x configs) read as a whole.

    layout     the run folder every producer writes (analysis.batch, analysis.sweep compare, lmms-eval)
    traceset   TraceSet: a run opened lazily, its per-patch index cached beside it
    aggregate  pure functions over a TraceSet: lost / gained, patch frequency maps, positional bias,
               survival curves, failure attribution
    report     ``python -m mustdrop report RUN_DIR --out report.html [--json summary.json]``

Below the Trace line: nothing here imports a model or touches a hook.
"""

from .traceset import RunError, TraceSet

__all__ = ["RunError", "TraceSet"]
