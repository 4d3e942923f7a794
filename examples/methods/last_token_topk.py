"""A token-dropping method in one file: at one LLM layer K, keep the vision tokens that the last
instruction token attends to most in ANY head (FastV averages the heads; a token one head relies on
survives here).

Use it anywhere a built-in method works, with no edit to the package:

    python -m mustdrop methods --method-file last_token_topk.py
    python -m mustdrop run --image cat.png --question "What is it?" --method lasttok_max \
        --method-file last_token_topk.py --out lasttok.safetensors
    python viz_app.py --method-file last_token_topk.py        # then "compare with": last token, max head
    python -m analysis.sweep compare --out runs/cmp --n 20 --method-file last_token_topk.py
"""

from mustdrop.methods import DROPPED, KEPT_BOTH, KEPT_PROTECTED, RankedDrop


class LastTokenMaxHead(RankedDrop):
    # what configs, traces and command lines call it, and what people read
    name = "lasttok_max"
    label = "last token, max head"
    # where it acts: drops inside the LLM ("llm") after one layer K (takes_layer, set by RankedDrop),
    # and trims the KV cache of the layers up to K to the survivors ("kv_trim"), as FastV does
    stages = ("llm", "kv_trim")
    # how a budget is met: RankedDrop's default, FastV's rule (the run machinery solves `keep`)
    budget_rule = "one drop after layer K, FastV's rule"

    # how its decisions are explained in every view (stored in each trace it writes)
    statuses = {KEPT_BOTH: "kept: one head of the last token attends to it strongly",
                DROPPED: "dropped: no head of the last token attends to it much",
                KEPT_PROTECTED: "kept: newline row marker (never dropped)"}
    scores = {"global_share": "last token's attention, max over heads"}
    dropped = "no attention head of the last instruction token ranked it among the kept; later layers never see it."
    legend = "kept: the top tokens by the last token's attention in its strongest head"

    def score(self, x):
        """One score per vision token alive, higher = keep. x.attn is (heads, text rows, vision
        tokens): the attention of the text after the image to each vision token at layer x.layer."""
        return x.attn[:, -1, :].amax(dim=0)


METHOD = LastTokenMaxHead
