"""What the visitor typed, checked: numbers, prune layers, the advanced knobs, decoding settings.

Each function raises ValueError with a message that names the field and the value.
"""

from __future__ import annotations

import numpy as np

from mustdrop.config import KNOB_FIELDS, parse_flag, parse_int_list, parse_knobs, parse_number


def number(v, name, kind=float):
    """A number from a form field or an API payload (mustdrop.config.parse_number, the library's parser:
    whole numbers never pass through float; booleans are not numbers)."""
    return parse_number(v, name, kind)


def flag(v, name) -> bool:
    """A checkbox (mustdrop.config.parse_flag): true or false, also the strings 'true' / 'false'."""
    return parse_flag(v, name)


def preset_name(v, allowed) -> str:
    """A preset as a name; the API may send 64 as a number, which names the preset '64'."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        v = str(int(v))
    if not isinstance(v, str) or v not in allowed:
        raise ValueError(f"preset must be one of {', '.join(allowed)} (a string), got {v!r}")
    return v


def parse_prune_layers(text) -> tuple[int, ...]:
    return parse_int_list(text, "prune layers")


def custom_knobs(*values) -> dict:
    """The advanced panel's values (in KNOB_FIELDS order) as MustDropConfig fields, each parsed by the
    config's own parser under its knob name (the config checks the ranges)."""
    knobs = parse_knobs(dict(zip(KNOB_FIELDS, values, strict=True)))
    if knobs["filter"] and not knobs["prune_layers"]:
        raise ValueError("stage 2 needs at least one prune layer: list them, or switch '2 filter' off")
    return knobs


def _choice(v, name, allowed):
    if not isinstance(v, str) or v not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {v!r}")
    return v


def knob_values(config) -> tuple:
    """The advanced panel's values for a config, in the order custom_knobs takes them."""
    return tuple(", ".join(str(x) for x in v) if isinstance(v, tuple) else v
                 for v in (getattr(config, k) for k in KNOB_FIELDS))


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
