"""Stage 3, output-aware KV trim, for every host: after prefill, the cache layers from the first to
the last prune layer keep only the final survivors (index-selected, one gather per layer)."""

from __future__ import annotations

from .. import stages


def trim(cache, state, config, num_layers: int) -> list:
    """Index-select the cache of layers first..last prune layer; return, per layer, which stage's
    sequence its cached entries are (stage i: the sequence entering prune layer i; the last
    stage, ``len(state.records)``: the survivors of every drop), for the trace to index on the host."""
    prune = list(config.prune_layers) if config.filter else []
    final = len(state.records)
    per_layer = None
    if prune and config.kv_trim:      # the drops' own selections, composed: one gather per drop
        per_layer = stages.kv_keep_indices(num_layers, prune, state.S, state.T, state.N0,
                                           state.kept_positions, only_trimmed=True,
                                           selections=[rec["selection"] for rec in state.records])
    out = []
    stage = 0   # how many prune layers lie strictly before the current layer
    for layer in range(num_layers):
        trim_here = per_layer is not None and per_layer[layer] is not None
        if trim_here and per_layer[layer].numel() < state.length_at(stage):
            cl = cache.layers[layer]
            cl.keys = cl.keys.index_select(-2, per_layer[layer])
            cl.values = cl.values.index_select(-2, per_layer[layer])
            out.append(final)       # a trimmed layer keeps exactly the final survivors
        else:
            out.append(stage)
        if stage < len(prune) and layer == prune[stage]:
            stage += 1
    return out
