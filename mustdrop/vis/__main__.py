"""``python -m mustdrop.vis TRACE ...``: the slide figure; a bad trace gets one message, exit code 2."""

import sys

from .slides import main


def run(argv=None) -> int:
    try:
        return main(argv)
    except (KeyError, TypeError, ValueError, IndexError) as e:   # a trace field the checks let through
        print(f"error: the trace cannot be drawn ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
        return 2


raise SystemExit(run())
