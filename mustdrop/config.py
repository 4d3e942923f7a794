"""MustDropConfig: every knob of the method, its presets, and per-model defaults.

The reference defaults are those of the authors' code for LLaVA-1.5-7B (32 LLM layers). A model
folder may carry its own defaults in ``mustdrop.json`` beside ``config.json`` (prune layers fitted
to its depth, thresholds calibrated per preset); for hub checkpoints without such a folder the package
ships defaults in ``mustdrop/defaults/<org>--<name>.json``. ``MustDropConfig.for_model`` reads them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from . import methods, stages

DEFAULTS_FILE = "mustdrop.json"
DEFAULTS_SCHEMA = "mustdrop-defaults/1"
SHIPPED_DEFAULTS_DIR = Path(__file__).parent / "defaults"

# (global_thr, individual_thr) the authors publish for LLaVA-1.5-7B per average vision-token budget.
REFERENCE_PRESETS: dict[str, tuple[float, float]] = {
    "192": (0.001, 0.001),
    "128": (0.0012, 0.001),
    "64": (0.011, 0.01),
}
PRESET_NAMES = ("off", "192", "128", "64")
REFERENCE_PRUNE_LAYERS = (2, 6, 10, 14)
REFERENCE_DEPTH = 32
POSITION_MODES = ("reference", "original")
# Seeds (decoding, the random baseline): torch.Generator takes 0..2**64-1, but a trace records the seed in
# JSON, which readers without big integers (JavaScript: the browser) hold exactly only up to 2**53 - 1.
SEED_MAX = 2 ** 53 - 1


def knob(name: str, label: str | None = None, short: str | None = None, *, row: str | None = None,
         interval: tuple | None = None, choices: tuple | None = None) -> dict:
    """Field metadata of a knob a user sets (the app's advanced panel, analysis specs, lmms-eval model
    args): ``name`` is what messages call it, ``label`` what the panel shows (default: the name),
    ``short`` its parameter of the app's /run endpoint (default: the name), knobs of one ``row`` share
    a line of the panel, ``interval`` the closed range its value is checked against, ``choices`` its
    allowed values. Written here once: the app builds its panel and /run's parameters from it."""
    return {"knob": {"name": name, "label": label or name, "short": short or name, "row": row, "interval": interval,
                     "choices": choices}}


@dataclass(frozen=True)
class MustDropConfig:
    """All MustDrop settings of one run.

    positions:
      "reference" (default) reproduces the authors' code, so that what the tool shows is what the
        published numbers were produced with: after each drop the survivors' RoPE positions are
        compacted to 0..L'-1, and at decode each layer places the new token at its own cache length,
        so the trimmed layers keep keys rotated at their old prefill positions.
      "original" keeps every token at its position in the unpruned sequence (prefill and decode);
        a run is then exactly the unpruned model with the dropped tokens masked out.
    """

    window: int = field(default=3, metadata=knob("window", "window (w x w)", row="stage 1"))
    merge_threshold: float = field(default=0.8, metadata=knob(
        "merge threshold", "merge threshold (cosine)", "merge_thr", row="stage 1", interval=(-1.0, 1.0)))
    key_keep_rate: float = field(default=0.08, metadata=knob(
        "key keep rate", short="key_rate", row="stage 1", interval=(0.0, 1.0)))
    prune_layers: tuple[int, ...] = field(default=REFERENCE_PRUNE_LAYERS, metadata=knob(
        "prune layers", "prune layers (0-based)", "prune"))
    global_thr: float = field(default=1.0, metadata=knob(        # with individual_thr 0.0: stage 2 drops nothing
        "global threshold", short="gthr", row="thresholds", interval=(0.0, 1.0)))
    individual_thr: float = field(default=0.0, metadata=knob(
        "individual threshold", short="ithr", row="thresholds", interval=(0.0, 1.0)))
    positions: str = field(default="reference", metadata=knob("positions", choices=POSITION_MODES))
    merge: bool = field(default=True, metadata=knob("1a merge", short="m1a", row="stages"))       # stage 1a
    key_set: bool = field(default=True, metadata=knob("1b key set", short="m1b", row="stages"))   # stage 1b
    filter: bool = field(default=True, metadata=knob("2 filter", short="m2", row="stages"))       # stage 2
    kv_trim: bool = field(default=True, metadata=knob("3 KV trim", short="m3", row="stages"))     # stage 3
    preset: str = "custom"           # the name this config came from, for captions
    method: str = "mustdrop"         # or any other registered method (mustdrop.methods), see MustDropConfig.baseline
    budget: float | None = None      # baselines: layer-averaged vision tokens (compute convention)
    seed: int = 0                    # baseline "random": which tokens
    keep_counts: tuple[int, ...] = ()   # methods dropping in the LLM: tokens kept after each prune layer;
    pre_keep: int | None = None         # ... and before the LLM. Empty / None: solved from the budget
                                        # (Method.plan) by the adapter, which records the result

    def __post_init__(self):
        for name in ("merge", "key_set", "filter", "kv_trim"):
            object.__setattr__(self, name, check_flag(getattr(self, name), name))
        object.__setattr__(self, "seed", check_int(self.seed, "seed", 0, SEED_MAX))
        if not isinstance(self.preset, str):
            raise ValueError(f"preset must be a string, got {self.preset!r}")
        object.__setattr__(self, "prune_layers", tuple(int(x) for x in self.prune_layers))
        object.__setattr__(self, "keep_counts", tuple(int(x) for x in self.keep_counts))
        for name in ("merge_threshold",):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not -1.0 <= float(self.merge_threshold) <= 1.0 + 1e-9 and self.merge:
            raise ValueError(f"merge threshold is a cosine similarity in [-1, 1], got {self.merge_threshold!r}")
        for f in fields(self):       # the rates and thresholds: key keep rate, global and individual threshold
            if knob_info(f.name).get("interval") == (0.0, 1.0):
                stages.check_unit_interval(knob_info(f.name)["name"], getattr(self, f.name))
        method = methods.get(self.method)           # the registry: built-ins and loaded plug-ins
        if self.method != methods.DEFAULT:
            method.check_config(self)
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 2:
            raise ValueError(f"window must be an integer >= 2, got {self.window!r}")
        if list(self.prune_layers) != sorted(set(self.prune_layers)) or any(x < 0 for x in self.prune_layers):
            raise ValueError(f"prune layers must be non-negative, strictly ascending, without duplicates; "
                             f"got {list(self.prune_layers)}")

    @classmethod
    def baseline(cls, method: str, budget: float, layer: int = 2, seed: int = 0,
                 positions: str = "reference", layers=None) -> "MustDropConfig":
        """A same-budget baseline through the same adapter and trace format: any registered method
        but MustDrop (``Method.config_fields``). ``budget`` is the layer-averaged count of vision
        tokens (compute convention) the baseline must meet; how each built-in meets it (its module
        in mustdrop/methods/ says it, recorded in the trace under "baseline"):

        fastv / random: one drop after ``layer`` (FastV's K), ranked by the last token's attention /
          seeded at random (stages.plan_single_drop: where the drop cannot meet the budget keeping
          half, the remainder is dropped before the LLM first); within 0.5 of a token.
        pdrop: the same share kept after each of ``layers`` (default stages.pyramid_layers, the
          depth cut in four), ranked by the last instruction token, share solved for the budget
          (stages.plan_pyramid); within 0.5 of a token.
        fastervlm / visionzip: round(budget) tokens chosen before the LLM by the vision tower's CLS
          attention (SigLIP: the stage 1b substitute score), VisionZip with 10/64 of them contextual
          tokens merged by key similarity; within 0.5 of a token.
        pool: the grid average-pooled to round(sqrt(budget))^2 tokens (a square grid only).
        None of them merges windows or keeps a key set.
        """
        if method not in methods.baselines():
            raise ValueError(f"baseline method must be one of {', '.join(methods.baselines())}, got {method!r}")
        return cls(**methods.get(method).config_fields(budget, layer=layer, seed=seed, positions=positions,
                                                       layers=layers))

    @property
    def enabled(self) -> bool:
        """False when no stage can change anything: the run is the vanilla model."""
        return self.merge or self.key_set or self.filter or self.kv_trim or self.method != methods.DEFAULT

    def validate_for(self, grid: int, num_llm_layers: int) -> None:
        """Check the knobs that depend on the model: the grid and the LLM depth."""
        if self.merge:
            stages.check_grid(grid, self.window)
        default_schedule = self.method != methods.DEFAULT and not self.prune_layers \
            and methods.get(self.method).default_layers(num_llm_layers) is not None     # pdrop: from the depth
        if self.filter and not default_schedule:
            if not self.prune_layers:
                raise ValueError("stage 2 is on but no prune layer is given: name at least one, or switch stage 2 off")
            stages.check_prune_layers(self.prune_layers, num_llm_layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prune_layers"] = list(self.prune_layers)
        d["keep_counts"] = list(self.keep_counts)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MustDropConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MustDrop config keys: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "MustDropConfig":
        return replace(self, **changes)

    @classmethod
    def preset_for(cls, name: str, defaults: "ModelDefaults | None" = None) -> "MustDropConfig":
        """The config of a named preset, with a model's own defaults when it has them."""
        name = str(name)
        if name not in PRESET_NAMES:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
        d = defaults or ModelDefaults()
        base = cls(window=d.window, merge_threshold=d.merge_threshold, key_keep_rate=d.key_keep_rate,
                   prune_layers=d.prune_layers, positions=d.positions, preset=name)
        if name == "off":
            return base.replace(merge=False, key_set=False, filter=False, kv_trim=False)
        g, i = d.presets[name]
        return base.replace(global_thr=g, individual_thr=i)

    @classmethod
    def for_model(cls, model_path_or_id: str | None, preset: str = "64",
                  num_llm_layers: int | None = None) -> "MustDropConfig":
        return cls.preset_for(preset, ModelDefaults.load(model_path_or_id, num_llm_layers))


KNOB_FIELDS = tuple(f.name for f in fields(MustDropConfig) if "knob" in f.metadata)   # in panel order
_FIELD_TYPES = {f.name: str(f.type) for f in fields(MustDropConfig)}


def knob_info(key: str) -> dict:
    """A field's knob metadata (name, label, row, interval, choices); {} for a field that is no knob."""
    f = MustDropConfig.__dataclass_fields__.get(key)
    return dict(f.metadata.get("knob", {})) if f is not None else {}


# --------------------------------------------------------------------------- text -> config
# The one place a config is read from what a person typed: the app's advanced panel, analysis config
# specs (below), lmms-eval model args and the command line all parse their values with these.

def parse_number(v, name: str, kind=float):
    """A number from a form field, an API payload, a command line or a spec; ``kind`` int asks for a
    whole number. Whole numbers never pass through float (a seed of 2**53 + 1 stays itself); booleans
    are not numbers."""
    import numpy as np

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
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if kind is int:
        if x != int(x):
            raise ValueError(f"{name} must be a whole number, got {v!r}")
        if abs(x) > 2 ** 53:
            raise ValueError(f"{name} {v!r} is too large to be exact: send it as an integer")
        return int(x)
    return x


def parse_int_list(v, name: str) -> tuple[int, ...]:
    """Whole numbers given as a list, or as text separated by commas, semicolons or spaces ("2, 6;10 14";
    lmms-eval model args quote them and use ';', since ',' separates the args)."""
    if isinstance(v, (list, tuple)):
        items = list(v)
    else:
        items = [t for t in re.split(r"[;,\s]+", str(v or "").strip("\"' ")) if t.strip()]
    out = []
    for t in items:
        try:
            out.append(int(str(t).strip()))
        except ValueError:
            raise ValueError(f"{name} must be whole numbers separated by commas, got {t!r}") from None
    return tuple(out)


def parse_flag(v, name: str) -> bool:
    """A stage switch: a bool (numpy's too), or the text true / false; anything else is refused, since
    bool('false') is True."""
    if isinstance(v, bool) or type(v).__name__ in ("bool_", "bool"):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise ValueError(f"{name} must be true or false, got {v!r}")


def parse_field(key: str, value, name: str | None = None):
    """One MustDropConfig field's value from text (or a form's value), by the field's type; messages
    call it ``name`` (default: the key). The config checks ranges and combinations when it is made."""
    if key not in _FIELD_TYPES:
        raise ValueError(f"unknown MustDrop config key {key!r}; known: {sorted(_FIELD_TYPES)}")
    name = name or key
    t = _FIELD_TYPES[key]
    if "None" in t and (value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))):
        return None
    if t.startswith("tuple"):
        return parse_int_list(value, name)
    if t == "bool":
        return parse_flag(value, name)
    if t.startswith("int"):
        return parse_number(value, name, int)
    if t.startswith("float"):
        return parse_number(value, name)
    choices = knob_info(key).get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def config_from_text(config_for, preset: str, **fields) -> "MustDropConfig":
    """A named preset's config (``config_for``: a runner's, for its model's own defaults) with fields
    given as text or form values, each read by parse_field; a field given as None keeps the preset's."""
    cfg = config_for(str(preset))
    changes = {k: parse_field(k, v) for k, v in fields.items() if v is not None}
    return cfg.replace(**changes) if changes else cfg


def parse_knobs(values: dict, names: bool = True) -> dict:
    """Knob values by field key (a form, model args), each parsed; messages name each by its knob name
    (``names``) or by its key."""
    return {k: parse_field(k, v, knob_info(k).get("name") if names else None) for k, v in values.items()}


@dataclass(frozen=True)
class ConfigSpec:
    """A parsed config spec (analysis specs, see parse_spec). ``match`` names the spec whose run sets a
    baseline's budget."""

    text: str
    base: str                     # preset name, or baseline method
    off_stage: str | None = None
    budget: float | None = None
    match: str | None = None
    overrides: tuple = ()

    @property
    def needs(self) -> list[str]:
        return [self.match] if self.match else []

    def changes(self) -> dict:
        """The +key=value overrides as MustDropConfig field values."""
        return {k: parse_field(k, v) for k, v in self.overrides}


STAGE_FIELDS = ("merge", "key_set", "filter", "kv_trim")


def parse_spec(text: str) -> ConfigSpec:
    """A config spec: PRESET, PRESET-no-STAGE, METHOD@SPEC (a baseline at the budget of SPEC's run),
    METHOD=BUDGET, each optionally +key=value (any field, parsed by parse_field)."""
    head, *over = str(text).strip().split("+")
    overrides = []
    for o in over:
        if "=" not in o:
            raise ValueError(f"config spec {text!r}: override {o!r} must be key=value")
        k, v = o.split("=", 1)
        overrides.append((k.strip(), v.strip()))
    baselines = methods.baselines()        # any registered method but MustDrop, plug-ins included
    m = re.fullmatch(rf"({'|'.join(map(re.escape, baselines))})(@|=)(.+)", head)
    if m:
        method, how, arg = m.groups()
        if how == "@":
            parse_spec(arg)
            return ConfigSpec(text, method, match=arg, overrides=tuple(overrides))
        return ConfigSpec(text, method, budget=float(arg), overrides=tuple(overrides))
    m = re.fullmatch(rf"({'|'.join(PRESET_NAMES)})(?:-no-({'|'.join(STAGE_FIELDS)}))?", head)
    if not m:
        raise ValueError(f"unknown config spec {text!r}: use a preset ({', '.join(PRESET_NAMES)}), PRESET-no-STAGE, "
                         f"METHOD@SPEC or METHOD=BUDGET for a baseline METHOD in {', '.join(baselines)}, "
                         f"each optionally +key=value")
    return ConfigSpec(text, m.group(1), off_stage=m.group(2), overrides=tuple(overrides))


@dataclass(frozen=True)
class ModelDefaults:
    """MustDrop defaults for one model: read from its folder's mustdrop.json, else the reference's."""

    window: int = 3
    merge_threshold: float = 0.8
    key_keep_rate: float = 0.08
    prune_layers: tuple[int, ...] = REFERENCE_PRUNE_LAYERS
    presets: dict = field(default_factory=lambda: dict(REFERENCE_PRESETS))
    source: str = "reference (LLaVA-1.5-7B)"
    positions: str = "reference"      # a family whose positions cannot be compacted ships "original"

    @classmethod
    def load(cls, model_path_or_id: str | None, num_llm_layers: int | None = None) -> "ModelDefaults":
        """The model folder's mustdrop.json, else the defaults shipped for its hub id, else the reference's
        (prune layers scaled to ``num_llm_layers``)."""
        path = Path(model_path_or_id) / DEFAULTS_FILE if model_path_or_id else None
        if path is not None and path.is_file():
            return cls.from_file(path)
        shipped = shipped_defaults_path(model_path_or_id)
        if shipped is not None:
            return cls.from_file(shipped)
        d = cls()
        if num_llm_layers is not None and num_llm_layers != REFERENCE_DEPTH:
            d = replace(d, prune_layers=scaled_prune_layers(num_llm_layers),
                        source=f"reference scaled to {num_llm_layers} layers")
        return d

    @classmethod
    def from_file(cls, path: Path) -> "ModelDefaults":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read MustDrop defaults {path}: {e}") from None
        if not isinstance(raw, dict) or raw.get("schema") != DEFAULTS_SCHEMA:
            raise ValueError(f"{path}: expected a JSON object with schema {DEFAULTS_SCHEMA!r}")
        presets = dict(REFERENCE_PRESETS)
        for name, th in (raw.get("presets") or {}).items():
            if name not in REFERENCE_PRESETS:
                raise ValueError(f"{path}: unknown preset {name!r}")
            presets[name] = (stages.check_unit_interval(f"{name} global_thr", th["global_thr"]),
                             stages.check_unit_interval(f"{name} individual_thr", th["individual_thr"]))
        source = str(raw["source"]) if isinstance(raw.get("source"), str) else str(Path(path).name)
        return cls(window=int(raw.get("window", 3)), merge_threshold=float(raw.get("merge_threshold", 0.8)),
                   key_keep_rate=float(raw.get("key_keep_rate", 0.08)),
                   prune_layers=tuple(int(x) for x in raw.get("prune_layers", REFERENCE_PRUNE_LAYERS)),
                   presets=presets, source=source, positions=_positions(raw.get("positions", "reference"), path))

    def to_json(self) -> dict:
        return {"schema": DEFAULTS_SCHEMA, "window": self.window, "merge_threshold": self.merge_threshold,
                "key_keep_rate": self.key_keep_rate, "prune_layers": list(self.prune_layers),
                "presets": {k: {"global_thr": g, "individual_thr": i} for k, (g, i) in self.presets.items()},
                **({} if self.positions == "reference" else {"positions": self.positions})}


def _positions(value, path) -> str:
    if value not in POSITION_MODES:
        raise ValueError(f"{path}: positions must be one of {POSITION_MODES}, got {value!r}")
    return value


def check_flag(v, name: str) -> bool:
    """A stage switch: True or False (numpy's too), never a truthy string ("false" is truthy)."""
    import numpy as np

    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    raise ValueError(f"{name} must be true or false, got {v!r}")


def check_int(v, name: str, lo: int, hi: int) -> int:
    """A whole number in lo..hi, exactly: ints (numpy's too) as they are, floats only when integral and
    within 2**53 (beyond, a float is already rounded); never a bool."""
    import numpy as np

    if isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be a whole number in {lo}..{hi}, got {v!r}")
    if isinstance(v, (int, np.integer)):
        x = int(v)
    elif isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer() and abs(v) <= 2 ** 53:
        x = int(v)
    else:
        raise ValueError(f"{name} must be a whole number in {lo}..{hi}, got {v!r}")
    if not lo <= x <= hi:
        raise ValueError(f"{name} must be a whole number in {lo}..{hi}, got {x}")
    return x


def hub_id_of(model_path_or_id: str | None) -> str | None:
    """The hub id "org/name" a model string names: the id itself, or the id of a hub cache snapshot folder
    (.../models--org--name/snapshots/<rev>); None for anything else."""
    if not model_path_or_id:
        return None
    s = str(model_path_or_id).rstrip("/")
    for part in Path(s).parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--"):].replace("--", "/", 1)
    if s.count("/") == 1 and not s.startswith((".", "/")) and not Path(s).exists():
        return s
    return None


def shipped_defaults_path(model_path_or_id: str | None) -> Path | None:
    """mustdrop/defaults/<org>--<name>.json: defaults this package ships for a hub checkpoint, if any."""
    hub_id = hub_id_of(model_path_or_id)
    if hub_id is None:
        return None
    path = SHIPPED_DEFAULTS_DIR / (hub_id.replace("/", "--") + ".json")
    return path if path.is_file() else None


def scaled_prune_layers(num_layers: int) -> tuple[int, ...]:
    """The reference's 2/6/10/14 of 32 layers, scaled to another depth (distinct, ascending)."""
    if num_layers < 2:
        raise ValueError(f"a language model of {num_layers} layer(s) has no room for prune layers")
    out: list[int] = []
    for p in REFERENCE_PRUNE_LAYERS:
        x = min(max(round(p * num_layers / REFERENCE_DEPTH), 0), num_layers - 1)
        if not out or x > out[-1]:
            out.append(x)
    return tuple(out)
