"""What the visitor typed, checked: numbers, prune layers, the advanced knobs, decoding settings.

Each function raises ValueError with a message that names the field and the value.
"""

from __future__ import annotations

import numpy as np

from mustdrop.config import POSITION_MODES


def number(v, name, kind=float):
    """A number from a form field or an API payload. Whole numbers never pass through float (a seed of
    2**53 + 1 stays itself); booleans are not numbers."""
    if v is None or (isinstance(v, str) and not v.strip()):
        raise ValueError(f"{name} is empty: enter a number")
    if isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    if kind is int and isinstance(v, (int, np.integer)):
        return int(v)
    if kind is int and isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    try:
        x = float(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not np.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if kind is int:
        if x != int(x):
            raise ValueError(f"{name} must be a whole number, got {v!r}")
        if abs(x) > 2 ** 53:
            raise ValueError(f"{name} {v!r} is too large to be exact: send it as an integer")
        return int(x)
    return x


def flag(v, name) -> bool:
    """A checkbox: true or false (also the strings 'true' / 'false'); anything else is refused, since
    bool('false') is True."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise ValueError(f"{name} must be true or false, got {v!r}")


def preset_name(v, allowed) -> str:
    """A preset as a name; the API may send 64 as a number, which names the preset '64'."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        v = str(int(v))
    if not isinstance(v, str) or v not in allowed:
        raise ValueError(f"preset must be one of {', '.join(allowed)} (a string), got {v!r}")
    return v


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
    if flag(filt, "2 filter") and not layers:
        raise ValueError("stage 2 needs at least one prune layer: list them, or switch '2 filter' off")
    return dict(window=number(window, "window", int), merge_threshold=number(merge_threshold, "merge threshold"),
                key_keep_rate=number(key_keep_rate, "key keep rate"), prune_layers=layers,
                global_thr=number(global_thr, "global threshold"),
                individual_thr=number(individual_thr, "individual threshold"),
                positions=_choice(positions, "positions", POSITION_MODES), merge=flag(merge, "1a merge"),
                key_set=flag(key_set, "1b key set"), filter=flag(filt, "2 filter"), kv_trim=flag(kv_trim, "3 KV trim"))


def _choice(v, name, allowed):
    if not isinstance(v, str) or v not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {v!r}")
    return v


def knob_values(config) -> tuple:
    """The advanced panel's values for a config, in the order custom_knobs takes them."""
    return (config.window, config.merge_threshold, config.key_keep_rate,
            ", ".join(str(x) for x in config.prune_layers), config.global_thr, config.individual_thr,
            config.positions, config.merge, config.key_set, config.filter, config.kv_trim)


def same_knobs(config: dict, knobs: dict) -> bool:
    """Whether a trace's config (its JSON form) has these knob values."""
    return all((tuple(config.get(k) or ()) == tuple(v)) if k == "prune_layers" else config.get(k) == v
               for k, v in knobs.items())


DECODING_MODES = ("greedy", "sampling")


def sampling_from(mode, temperature, top_p, seed):
    """Sampling settings from the Decoding panel; Sampling bounds temperature, top p and seed."""
    from mustdrop.adapters import Sampling

    mode = _choice(mode, "decoding", DECODING_MODES)
    if mode == "greedy":
        return Sampling(0.0, 1.0, number(seed, "seed", int) if seed is not None else 0)
    t = number(temperature, "temperature")
    if t <= 0:
        raise ValueError("sampling needs a temperature > 0 (choose greedy for temperature 0)")
    return Sampling(t, number(top_p, "top p"), number(seed, "seed", int))


def require_question(question) -> str:
    """The question, stripped: text, UTF-8, not empty, within the length limit (mustdrop.question)."""
    from mustdrop.question import check_question

    return check_question(question)
