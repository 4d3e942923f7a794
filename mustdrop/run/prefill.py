"""Stage 2 during prefill, for every host: which tokens of the sequence are still alive, and the
hooks that score, drop and re-slice positions.

- a forward hook on each prune layer's q_proj (``Host.query_proj``) keeps the queries;
- a forward hook on its self_attn scores the T text rows against all keys from the cache (T x L per
  head, never L x L: :mod:`mustdrop.run.textrows`);
- a forward hook on the decoder layer asks the method's decision point (``decide``) and drops;
- a pre-hook on every later layer gathers the full-length position embeddings / ids / mask that the
  decoder loop hands to every layer (``Host.shorten_positions``).

On an accelerator this reads back one value per prune layer (the kept count, which sizes the next
layer's input); scores, statuses and indices stay on the device until the trace takes them.
"""

from __future__ import annotations

import torch

from ..hooks import hidden_states_of
from .textrows import text_rows_probs


class Prefill:
    """Mutable state of one prefill: which tokens of the sequence are still alive.

    Device tensors are replaced, never written to, so that the records can hold them as they were.
    """

    def __init__(self, S, N0, T, key_tokens, device, protected=None):
        self.S, self.N0, self.T = S, N0, T
        self.protected_pos = (protected if protected is not None else torch.zeros(0, dtype=torch.long)).to(device)
        self.L0 = S + N0 + T
        self.V = N0                                                 # vision tokens alive (host count)
        self._alive = torch.arange(self.L0, device=device)          # original sequence indices
        self.head = self._alive[:S]                                 # the S tokens before the image
        self.selections = []        # per drop: indices into the sequence it shortened that it kept
        self._applied = 0           # how many of them ``_alive`` has been composed with
        # the key set among the vision tokens alive now: positions in the block, ascending, or (once
        # MustDrop's filter has run without protected positions) a bool mask over them
        self.key_pos = key_tokens.to(device)
        self.text_attn = None
        self.queries = None                                         # the prune layer's q_proj output
        self.rows_rope = None                                       # text-row rotary tables (RowsRope)
        self.records = []                                           # per prune layer
        self.kept_positions = []                                    # per prune layer (for stage 3)
        self.layer_kwargs = None    # shortened layer kwargs, computed once after each drop

    @property
    def L(self):
        return self.S + self.V + self.T

    @property
    def alive(self):
        """Original sequence indices of the tokens alive now (device), composed from the drops'
        selections only when asked for: original positions and 4-D masks need them, reference
        positions do not, and the trace derives its own on the host from the statuses."""
        while self._applied < len(self.selections):
            self._alive = self._alive[self.selections[self._applied]]
            self._applied += 1
        return self._alive

    def length_at(self, stage: int) -> int:
        """Length of the sequence the layers of ``stage`` processed (stage i: the one entering
        prune layer i; the last stage: the survivors of every drop)."""
        return self.S + (self.records[stage]["V"] if stage < len(self.records) else self.V) + self.T

    @property
    def shortened(self):
        return self.L < self.L0

    def apply_drop(self, layer: int, res, kept, hidden):
        """Record prune layer ``layer``'s decision; return the selection of the sequence it keeps
        (None when it keeps every vision token)."""
        V = self.V
        self.kept_positions.append(kept)
        record = {"layer": layer, "V": V, "result": res, "selection": None}
        self.records.append(record)
        if kept.numel() == V:
            return None
        S = self.S
        sel = torch.cat([self.head, S + kept, torch.arange(S + V, hidden.shape[1], device=kept.device)])
        record["selection"] = sel
        self.selections.append(sel)
        self.V = kept.numel()
        self.layer_kwargs = None
        if self.protected_pos.numel():
            self.key_pos = torch.searchsorted(kept, self.key_pos)
            self.protected_pos = torch.searchsorted(kept, self.protected_pos)
        else:   # the filter already placed the key set among the survivors (baselines keep none)
            self.key_pos = res.key_after if res is not None else self.key_pos[:0]
        return sel


def attach_prefill(hooks, host, state: Prefill, config, decide) -> None:
    """Attach stage 2 to ``host``'s decoder: ``decide(attn, state, layer, config)`` is the method's
    decision at each prune layer (:func:`mustdrop.run.decisions._decide`)."""
    first = config.prune_layers[0]
    prune = set(config.prune_layers)
    reference = config.positions == "reference"

    def gather(module, args, kwargs):
        hidden = hidden_states_of(args, kwargs)
        if hidden.shape[1] <= 1 or not state.shortened:
            return None
        # Every layer receives the same full-length position embeddings and mask from the
        # model's forward; slice them once per drop, not once per layer (each slice is a few
        # kernel launches, which is what a batch-1 prefill on a GPU is bound by).
        if state.layer_kwargs is None:
            state.layer_kwargs = host.shorten_positions(kwargs, state, reference)
        kwargs.update(state.layer_kwargs)
        return args, kwargs

    def keep_queries(module, args, kwargs, output):
        state.queries = output

    def score_text_rows(module, args, kwargs, output):
        keys = kwargs["past_key_values"].layers[module.layer_idx].keys
        queries, state.queries = state.queries, None
        if state.rows_rope is None:       # the first prune layer sees the full-length tables
            state.rows_rope = host.rows_rope(kwargs["position_embeddings"], module)
        # text rows sit at the end: positions n-T..n-1 (reference) or L0-T..L0-1 (original)
        start = (state.L if reference else state.L0) - state.T
        probs = text_rows_probs(queries[:, -state.T:], keys, module.head_dim,
                                lambda q: state.rows_rope(q, start))
        state.text_attn = probs[:, :, state.S:state.S + state.V]             # (H, T, V)

    def drop(module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] <= 1:
            return None
        layer = module.self_attn.layer_idx
        attn, state.text_attn = state.text_attn, None
        if state.V == 0:
            res = None
            kept = torch.zeros(0, dtype=torch.long, device=hidden.device)
        else:
            res = decide(attn, state, layer, config)
            kept = res.kept
        sel = state.apply_drop(layer, res, kept, hidden)
        if sel is None:
            return None
        new = hidden[:, sel]
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    for i, layer in enumerate(host.decoder_layers):
        if i > first:
            hooks.pre(f"llm.layer{i}.gather_positions", layer, gather)
        if i in prune:
            hooks.post(f"llm.layer{i}.self_attn.q_proj.keep", host.query_proj(i), keep_queries)
            hooks.post(f"llm.layer{i}.self_attn.text_rows", layer.self_attn, score_text_rows)
            hooks.post(f"llm.layer{i}.stage2_filter", layer, drop)
