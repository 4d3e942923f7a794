"""What the visitor typed, checked: numbers, prune layers, the advanced knobs, decoding settings.

Each function raises ValueError with a message that names the field and the value.
"""

from __future__ import annotations

import numpy as np


def number(v, name, kind=float):
    if v is None or (isinstance(v, str) and not v.strip()):
        raise ValueError(f"{name} is empty: enter a number")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not np.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if kind is int:
        if x != int(x):
            raise ValueError(f"{name} must be a whole number, got {v!r}")
        return int(x)
    return x


def parse_prune_layers(text) -> tuple[int, ...]:
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [t for t in str(text or "").replace(";", ",").replace(" ", ",").split(",") if t.strip()]
    out = []
    for t in items:
        try:
            out.append(int(str(t).strip()))
        except ValueError:
            raise ValueError(f"prune layers must be whole numbers separated by commas, got {t!r}") from None
    return tuple(out)


def custom_knobs(window, merge_threshold, key_keep_rate, prune_layers, global_thr, individual_thr, positions,
                 merge, key_set, filt, kv_trim) -> dict:
    """The advanced panel as MustDropConfig fields (the config checks the ranges)."""
    layers = parse_prune_layers(prune_layers)
    if filt and not layers:
        raise ValueError("stage 2 needs at least one prune layer: list them, or switch '2 filter' off")
    return dict(window=number(window, "window", int), merge_threshold=number(merge_threshold, "merge threshold"),
                key_keep_rate=number(key_keep_rate, "key keep rate"), prune_layers=layers,
                global_thr=number(global_thr, "global threshold"),
                individual_thr=number(individual_thr, "individual threshold"),
                positions=str(positions), merge=bool(merge), key_set=bool(key_set), filter=bool(filt),
                kv_trim=bool(kv_trim))


def knob_values(config) -> tuple:
    """The advanced panel's values for a config, in the order custom_knobs takes them."""
    return (config.window, config.merge_threshold, config.key_keep_rate,
            ", ".join(str(x) for x in config.prune_layers), config.global_thr, config.individual_thr,
            config.positions, config.merge, config.key_set, config.filter, config.kv_trim)


def same_knobs(config: dict, knobs: dict) -> bool:
    """Whether a trace's config (its JSON form) has these knob values."""
    return all((tuple(config.get(k) or ()) == tuple(v)) if k == "prune_layers" else config.get(k) == v
               for k, v in knobs.items())


def sampling_from(mode, temperature, top_p, seed):
    from mustdrop.adapters import Sampling

    if mode == "greedy":
        return Sampling(0.0, 1.0, number(seed, "seed", int) if seed is not None else 0)
    t = number(temperature, "temperature")
    if t <= 0:
        raise ValueError("sampling needs a temperature > 0 (choose greedy for temperature 0)")
    return Sampling(t, number(top_p, "top p"), number(seed, "seed", int))


def require_question(question) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty: type a question about the image")
    return question
