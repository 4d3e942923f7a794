"""Stage-2 status codes: why a vision token entering a prune layer was kept or dropped.

A leaf module (imports nothing of ours): the pure stages set these codes, the trace stores them
(array stage2.L{l}.status) and the views colour them, so each of those imports them from here and
none of them has to import another to get them.
"""

KEPT_BOTH = 0          # global share and individual max both at/above their thresholds
KEPT_GLOBAL = 1        # only the global share is at/above its threshold
KEPT_INDIVIDUAL = 2    # only the individual max is at/above its threshold
KEPT_KEY = 3           # both conditions said drop, but it is in the key token set
DROPPED = 4            # both conditions held: dropped
KEPT_PROTECTED = 5     # a layout marker that is never dropped (LLaVA-NeXT newline row)
NOT_ENTERING = -1      # patch maps only: the patch's token was dropped at an earlier prune layer
STATUS_NAMES = {
    KEPT_BOTH: "kept: both scores above threshold",
    KEPT_GLOBAL: "kept: global share above threshold",
    KEPT_INDIVIDUAL: "kept: individual max above threshold",
    KEPT_KEY: "kept: key token (both scores below threshold)",
    DROPPED: "dropped: global share AND individual max below threshold",
    KEPT_PROTECTED: "kept: newline row marker (never dropped)",
}
KEPT_CODES = (KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY, KEPT_PROTECTED)
