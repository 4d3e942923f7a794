"""What a token-dropping method is: the one interface the run machinery asks, built-in or plug-in.

A method says, in one class:
- ``name`` (what configs, traces, specs and command lines call it) and ``label`` (what people read);
- which stages it uses (``stages``: "vision" selects before the LLM, "llm" drops at LLM layers,
  "kv_trim" trims the prefill cache of the layers it shortened);
- how it meets a budget (``plan``: how many vision tokens survive before the LLM and after each
  drop layer; the layer average of those counts is the budget, see :class:`stages.BudgetPlan`);
- what it selects before the LLM (``select_vision``), and what of the vision tower it relies on
  there (``requires``: keys of :data:`VISION_NEEDS`; a model family that cannot offer one refuses the
  run with both reasons), and what it decides at each drop layer
  (``decide``), with the scores behind each decision in the trace's generic score arrays
  ("global_share" and "individual_max" of stage2.L{l}.*);
- how its decisions are explained: status names, the scores' names, a legend line and the
  inspector's sentence for a dropped token (:class:`Words`, stored in every trace so that a
  trace of a plug-in replays where the plug-in is not installed).

A researcher's method is usually a :class:`RankedDrop`: write ``score`` (one number per vision token
at a drop layer, higher = keep) and the run machinery keeps the top ``keep`` tokens, with the
budget solved as for FastV. ``examples/methods/`` holds a complete one.

Nothing here imports torch at module level: a trace's words are read without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# Stage-2 status codes (trace schema); a method may name them in its own words.
from ..statuses import (DROPPED, KEPT_BOTH, KEPT_GLOBAL, KEPT_INDIVIDUAL, KEPT_KEY, KEPT_PROTECTED,  # noqa: F401
                        STATUS_NAMES)

SCORE_ARRAYS = ("global_share", "individual_max")   # the generic per-layer score arrays of a trace
STAGES = ("vision", "llm", "kv_trim", "merge", "key_set")   # the last two: MustDrop's stage 1, in the host
MAX_WORDS_CHARS = 400                                # any one explanation string, as stored in a trace

# What a host's VisionInputs may offer beyond features, keep and score, by the name a method's
# ``requires`` uses. LLaVA-1.5 offers both; Qwen2-VL / Qwen2.5-VL neither (its merger folds 2 x 2
# patches into one token and is the projector); LLaVA-NeXT / OneVision run no vision-side method.
VISION_NEEDS = {
    "square_grid": "x.grid: the side of a square grid of tokens, one patch each",
    "vision_hidden": "x.hidden, x.keys and x.project: the feature layer's hidden states, their keys, and a "
                     "projector that maps each one to one LLM token",
}


class MethodError(ValueError):
    """A method that cannot be used or that failed: the message names the method and the fault.
    A ValueError, so that the command line and the app show it as a refused input."""


@dataclass(frozen=True)
class Words:
    """How a method's decisions are explained in every view.

    ``statuses``: status code -> name for the codes the method sets (legends, inspector);
    ``scores``: generic score array -> what it holds for this method (an array it leaves unused is
    absent); ``dropped``: the inspector's sentence for a token dropped after LLM layer {layer};
    ``legend``: one line under the drop map's legend; ``thresholds``: the scores are compared with
    the config's global / individual thresholds (MustDrop's filter), so views print them.
    """

    name: str
    label: str
    statuses: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    dropped: str = "dropped after LLM layer {layer}; later layers never see it."
    legend: str = ""
    thresholds: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label,
                "statuses": {str(int(k)): v for k, v in sorted(self.statuses.items())},
                "scores": dict(self.scores), "dropped": self.dropped, "legend": self.legend,
                "thresholds": bool(self.thresholds)}

    @classmethod
    def from_dict(cls, d) -> "Words":
        """Words read from a trace (untrusted): strings bounded, codes checked, unknown keys ignored."""
        if not isinstance(d, dict):
            raise ValueError("method_info must be a JSON object")

        def text(v, what):
            if not isinstance(v, str):
                raise ValueError(f"method_info {what} must be a string")
            return v[:MAX_WORDS_CHARS]
        statuses = {}
        for k, v in (d.get("statuses") or {}).items():
            code = int(k)
            if code not in STATUS_NAMES:
                raise ValueError(f"method_info names an unknown status code {k!r}")
            statuses[code] = text(v, f"status {k}")
        scores = {k: text(v, f"score {k}") for k, v in (d.get("scores") or {}).items() if k in SCORE_ARRAYS}
        return cls(name=text(d.get("name", ""), "name"), label=text(d.get("label", ""), "label"),
                   statuses=statuses, scores=scores, dropped=text(d.get("dropped", cls.dropped), "dropped"),
                   legend=text(d.get("legend", ""), "legend"), thresholds=bool(d.get("thresholds", False)))

    def status(self, code: int) -> str:
        """The name of a status code in this method's words (the schema's name where it has none)."""
        return self.statuses.get(int(code), STATUS_NAMES.get(int(code), f"status {code}"))

    def dropped_sentence(self, layer: int) -> str:
        try:
            return self.dropped.format(layer=layer)
        except (KeyError, IndexError, ValueError):
            return self.dropped


PROTECTED_NAME = STATUS_NAMES[KEPT_PROTECTED]


class LayerInputs:
    """What a method sees at one drop layer of the prefill.

    ``attn`` (H, T, V) float32: attention probabilities of the T text rows after the image over the
    V vision tokens alive (a softmax over every key, causal within the text rows); the last row is
    the last instruction token. ``keep``: how many tokens the budget plan keeps here (None where the
    method has no plan, MustDrop). ``protected``: positions the run keeps whatever the method says
    (LLaVA-NeXT and OneVision newline rows). ``drop``: which drop this is (0 for the first).

    Protected positions count toward a plan's ``keep``: where some are alive, a method with a plan is
    asked a second time with the other tokens only (their attention columns, ``keep`` minus the
    protected, none protected); its first answer gives the scores the trace records, its second the
    kept tokens (run/decisions.py). ``pre_llm`` likewise chooses among the non-protected tokens.
    """

    def __init__(self, attn, layer: int, drop: int, keep, config, state):
        self.attn, self.layer, self.drop, self.keep, self.config = attn, int(layer), int(drop), keep, config
        self._state = state

    @property
    def num_tokens(self) -> int:
        return int(self.attn.shape[-1])

    @property
    def protected(self):
        return self._state.protected_pos

    def key_set(self):
        """The stage 1b key set among the tokens alive, with the protected positions: positions, or,
        where there are none, a (V,) bool mask that the run carries from drop to drop with one gather
        (the filter's ``key_after``) instead of a search."""
        import torch

        state, prot = self._state, self._state.protected_pos
        if prot.numel():
            return torch.cat([state.key_pos, prot])
        if state.key_pos.dtype != torch.bool:
            state.key_pos = torch.zeros(state.V, dtype=torch.bool, device=self.attn.device).index_fill_(
                0, state.key_pos.to(self.attn.device), True)
        return state.key_pos


@dataclass
class VisionInputs:
    """What a method that selects before the LLM sees, for one image (a single grid).

    ``features`` (N, D): the projected features the LLM would receive, one per token of a
    ``grid_shape`` = (rows, cols) token grid in raster order (N = rows * cols); ``grid``: that grid's
    side where it is square and each token is one patch (LLaVA-1.5), else None (Qwen-VL: rows x cols
    tokens of 2 x 2 patches each; a method that needs it says so in ``requires``). A selection's
    ``groups`` are ids on this token grid; the host maps them to the patches each token covers.
    ``score`` (N,): the vision tower's CLS attention to each token at the
    feature layer, head mean (without a CLS token: the mean attention each token receives), or None
    where the method asks for none; ``hidden`` (prefix + N, C) and ``keys`` (prefix + N, d): that
    layer's hidden states and head-mean keys; ``num_prefix``: CLS tokens before the patches;
    ``project``: the model's projector, (1, K, C) -> (1, K, D); ``keep``: the plan's count.
    """

    features: object
    grid: int | None
    keep: int
    config: object
    score: object = None
    hidden: object = None
    keys: object = None
    num_prefix: int = 0
    project: object = None
    vision_layer: int | None = None
    grid_shape: tuple | None = None

    def __post_init__(self):
        if self.grid_shape is None:
            self.grid_shape = (self.grid, self.grid)


@dataclass
class VisionSelection:
    """A selection before the LLM: the tokens the LLM receives and the patches each covers.

    ``features`` (K, D) and ``groups`` (K, k) token-grid ids (``VisionInputs.grid_shape``; a patch id
    where a token is one patch), -1 padded; ``score`` (N,) a per-token score to record
    (baseline.vision_score), or None; ``params`` recorded in the trace."""

    features: object
    groups: object
    score: object = None
    params: dict = field(default_factory=dict)


class Method:
    """A token-dropping method. Subclass it (or :class:`RankedDrop`) and set the class attributes."""

    name: str = ""
    label: str = ""
    stages: tuple = ("llm", "kv_trim")
    budget_rule: str = ""          # how it meets a budget, in one line (``python -m mustdrop methods``)
    takes_layer: bool = False      # drops once after a layer K that a caller may choose (FastV's K)
    needs_vision_score: bool = True   # selecting before the LLM: hand it the vision tower's CLS attention
    requires: dict = {}               # selecting before the LLM: {VISION_NEEDS key: what the method does with it}
    recount_protected: bool = True    # drops are re-counted after protected positions are kept back
    statuses: dict = {KEPT_BOTH: "kept", DROPPED: "dropped", KEPT_PROTECTED: PROTECTED_NAME}
    scores: dict = {}
    dropped: str = "dropped after LLM layer {layer}; later layers never see it."
    legend: str = ""
    thresholds: bool = False

    # ------------------------------------------------------------ words
    @property
    def words(self) -> Words:
        return Words(self.name, self.label or self.name, dict(self.statuses), dict(self.scores), self.dropped,
                     self.legend, self.thresholds)

    @property
    def selects_before_llm(self) -> bool:
        return "vision" in self.stages

    # ------------------------------------------------------------ configuration
    def config_fields(self, budget: float, *, layer: int = 2, seed: int = 0, positions: str = "reference",
                      layers=None) -> dict:
        """The MustDropConfig fields of a run of this method at a layer-averaged budget (compute
        convention); ``MustDropConfig.baseline`` builds the config from them (so the methods need
        not import the config, which imports the registry)."""
        prune = (int(layer),) if "llm" in self.stages and self.takes_layer else \
            tuple(int(x) for x in (layers or ())) if "llm" in self.stages else ()
        return dict(method=self.name, budget=float(budget), seed=int(seed), merge=False, key_set=False,
                    filter="llm" in self.stages, kv_trim="kv_trim" in self.stages, prune_layers=prune,
                    positions=positions, preset=f"{self.name}@{float(budget):g}")

    def check_config(self, config) -> None:
        """Refuse a config this method cannot run (raise ValueError naming the knob)."""
        b = config.budget
        if b is None or not isinstance(b, (int, float)) or not math.isfinite(float(b)) or b <= 0:
            raise ValueError(f"method {self.name!r} needs a positive token budget, got {b!r}")
        if self.takes_layer and "llm" in self.stages and len(config.prune_layers) != 1:
            raise ValueError(f"method {self.name!r} drops at one layer; got prune layers {list(config.prune_layers)}")
        if config.keep_counts and len(config.keep_counts) != len(config.prune_layers):
            raise ValueError(f"keep_counts {list(config.keep_counts)} must give one count per prune layer "
                             f"{list(config.prune_layers)}")
        if any(k < 0 for k in config.keep_counts) or (config.pre_keep is not None and int(config.pre_keep) < 1):
            raise ValueError("keep_counts must be >= 0 and pre_keep >= 1")

    def default_layers(self, num_layers: int) -> tuple:
        """Drop layers when the config names none (None: the config must name them)."""
        return None

    # ------------------------------------------------------------ budget
    def plan(self, budget: float, n0: int, config, num_layers: int):
        """How this sample meets the budget: a stages.BudgetPlan (tokens kept before the LLM, after
        each drop layer). Default: FastV's rule, one drop after config.prune_layers[0]."""
        from .. import stages

        if "llm" not in self.stages:
            return stages.plan_vision_side(self.name, budget, n0)
        layers = config.prune_layers or self.default_layers(num_layers) or ()
        if len(layers) == 1:
            return stages.plan_single_drop(self.name, budget, n0, layers[0], num_layers)
        return replace(stages.plan_pyramid(budget, n0, layers, num_layers), method=self.name)

    def pre_llm(self, n0: int, keep: int, config):
        """Which of the n0 vision tokens survive a drop before the LLM (the part of a budget that
        cannot be met inside it): (ascending positions, how they were chosen). Default: evenly spaced
        in raster order, as no LLM score exists yet."""
        from .. import stages

        return stages.evenly_spaced(n0, keep), "evenly spaced in raster order (no LLM score exists before the LLM)"

    # ------------------------------------------------------------ decisions
    def select_vision(self, x: VisionInputs) -> VisionSelection:
        """Before the LLM (methods with "vision" in ``stages``): the tokens the LLM receives."""
        raise NotImplementedError(f"method {self.name!r} selects before the LLM but defines no select_vision")

    def decide(self, x: LayerInputs):
        """At a drop layer: a stages.FilterResult (kept positions, ascending; scores; status codes)."""
        raise NotImplementedError(f"method {self.name!r} drops in the LLM but defines no decide")

    def __repr__(self):
        return f"<method {self.name!r} ({self.label})>"


class RankedDrop(Method):
    """A method that keeps, at each drop layer, the ``keep`` tokens with the highest ``score``.

    Write ``score(x)``: one float per vision token alive, (V,), from ``x.attn`` (H, T, V) or anything
    else on ``x``. The score is recorded as the trace's "global_share" array (name it in ``scores``).
    One drop after layer K by default (FastV's budget rule); set ``layers_of`` for several."""

    takes_layer = True
    budget_rule = "one drop after layer K (FastV's rule: tokens dropped before the LLM first if keeping half cannot meet it)"
    statuses = {KEPT_BOTH: "kept: among the top by score", DROPPED: "dropped: below the kept top by score",
                KEPT_PROTECTED: PROTECTED_NAME}

    def score(self, x: LayerInputs):
        raise NotImplementedError(f"method {self.name!r} defines no score")

    def decide(self, x: LayerInputs):
        import torch

        from .. import stages

        s = self.score(x)
        if not isinstance(s, torch.Tensor):
            raise MethodError(f"method {self.name!r}: score must return a tensor, got {type(s).__name__}")
        if tuple(s.shape) != (x.num_tokens,) or not s.is_floating_point():
            raise MethodError(f"method {self.name!r}: score must be a float tensor of shape ({x.num_tokens},), "
                              f"got {s.dtype} {tuple(s.shape)}")
        s = s.detach().float()
        if not bool(torch.isfinite(s).all()):
            raise MethodError(f"method {self.name!r}: score holds NaN or infinite values")
        keep = min(max(int(x.keep), 0), s.numel())
        kept = torch.sort(torch.topk(s, keep).indices).values
        status = torch.full((s.numel(),), DROPPED, dtype=torch.int8, device=s.device)
        status[kept] = KEPT_BOTH
        return stages.FilterResult(kept, torch.zeros(0, dtype=torch.long, device=s.device), s, s, status,
                                   s.numel() - kept.numel())


# ---------------------------------------------------------------- the run machinery's side
# A plug-in's answers are checked before the run uses them (a built-in's are trusted: checking reads
# values back from the device, which the hot path's budget of read-backs does not allow). Any
# exception a plug-in raises becomes a MethodError naming the method, the step and the fault.

def _fail(method, where: str, e: Exception) -> MethodError:
    if isinstance(e, MethodError):
        return e
    return MethodError(f"method {method.name!r} failed {where}: {type(e).__name__}: {e}")


def _check_indices(method, idx, n: int, want: int | None, what: str):
    import torch

    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
        got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise MethodError(f"method {method.name!r}: {what} must be a 1-D integer tensor, got {got}")
    values = idx.tolist()
    if values and (min(values) < 0 or max(values) >= n):
        raise MethodError(f"method {method.name!r}: {what} has indices outside 0..{n - 1}")
    if len(set(values)) != len(values):
        raise MethodError(f"method {method.name!r}: {what} repeats indices")
    if values != sorted(values):
        raise MethodError(f"method {method.name!r}: {what} must be ascending")
    if want is not None and len(values) != want:
        raise MethodError(f"method {method.name!r} misses its budget: {what} has {len(values)} tokens, "
                          f"the plan keeps {want}")


def checked_plan(method, budget, n0, config, num_layers, builtin: bool):
    """method.plan, and for a plug-in: a BudgetPlan whose layer average meets the budget within half a
    token (the built-ins' tolerance), dropping only at valid layers."""
    from .. import stages

    if builtin:
        return method.plan(budget, n0, config, num_layers)
    try:
        plan = method.plan(budget, n0, config, num_layers)
    except Exception as e:  # noqa: BLE001 - a plug-in's fault, reported with its name
        raise _fail(method, "planning its budget", e) from None
    if not isinstance(plan, stages.BudgetPlan):
        raise MethodError(f"method {method.name!r}: plan must return a stages.BudgetPlan, got {type(plan).__name__}")
    try:
        stages.check_prune_layers(plan.layers, num_layers)
    except ValueError as e:
        raise MethodError(f"method {method.name!r}: its plan's drop layers: {e}") from None
    if len(plan.keep) != len(plan.layers) or not 1 <= plan.pre_keep <= n0 or any(k < 0 for k in plan.keep):
        raise MethodError(f"method {method.name!r}: its plan keeps {plan.pre_keep} of {n0} before the LLM and "
                          f"{list(plan.keep)} after layers {list(plan.layers)}: one count >= 0 per layer needed")
    avg = plan.layer_average(num_layers)
    if abs(avg - float(budget)) > 0.5 + 1e-9:
        raise MethodError(f"method {method.name!r} misses its budget: its plan averages {avg:.2f} vision tokens "
                          f"per layer for a budget of {float(budget):g}")
    return plan


def checked_pre_llm(method, n0, keep, config, builtin: bool):
    if builtin:
        return method.pre_llm(n0, keep, config)
    try:
        sel, how = method.pre_llm(n0, keep, config)
    except Exception as e:  # noqa: BLE001
        raise _fail(method, "choosing the tokens kept before the LLM", e) from None
    _check_indices(method, sel, n0, keep, "the selection before the LLM")
    return sel, str(how)[:MAX_WORDS_CHARS]


def checked_decide(method, x: LayerInputs, builtin: bool):
    """method.decide at one drop layer; for a plug-in, the result checked: kept positions (distinct,
    ascending, in range, as many as the plan keeps), (V,) float scores, (V,) int8 status codes that
    agree with the kept positions."""
    if builtin:
        return method.decide(x)
    import torch

    from .. import stages

    try:
        res = method.decide(x)
    except Exception as e:  # noqa: BLE001
        raise _fail(method, f"at LLM layer {x.layer}", e) from None
    if not isinstance(res, stages.FilterResult):
        raise MethodError(f"method {method.name!r}: decide must return a stages.FilterResult, got {type(res).__name__}")
    v = x.num_tokens
    _check_indices(method, res.kept, v, x.keep, f"the tokens kept at layer {x.layer}")
    for name in ("global_share", "individual_max"):
        a = getattr(res, name)
        if not isinstance(a, torch.Tensor) or tuple(a.shape) != (v,) or not a.is_floating_point():
            got = f"{a.dtype} {tuple(a.shape)}" if isinstance(a, torch.Tensor) else type(a).__name__
            raise MethodError(f"method {method.name!r}: its {name} score at layer {x.layer} must be a float tensor "
                              f"of shape ({v},), got {got}")
    st = res.status
    if not isinstance(st, torch.Tensor) or tuple(st.shape) != (v,) or st.dtype != torch.int8:
        raise MethodError(f"method {method.name!r}: its status at layer {x.layer} must be an int8 tensor of shape ({v},)")
    codes = set(st.tolist())
    if not codes <= set(STATUS_NAMES):
        raise MethodError(f"method {method.name!r}: unknown status codes {sorted(codes - set(STATUS_NAMES))}")
    dropped = (st == DROPPED)
    if int(dropped.sum()) != v - res.kept.numel() or bool(dropped[res.kept].any()):
        raise MethodError(f"method {method.name!r}: its status at layer {x.layer} disagrees with the kept tokens")
    return res


def checked_select_vision(method, x: VisionInputs, builtin: bool) -> VisionSelection:
    if builtin:
        return method.select_vision(x)
    import torch

    try:
        sel = method.select_vision(x)
    except Exception as e:  # noqa: BLE001
        raise _fail(method, "selecting before the LLM", e) from None
    if isinstance(sel, torch.Tensor):              # kept patch positions: the common case
        _check_indices(method, sel, x.features.shape[0], x.keep, "the selection before the LLM")
        sel = VisionSelection(x.features[sel.to(x.features.device)], sel.to(x.features.device).unsqueeze(1),
                              x.score)
    if not isinstance(sel, VisionSelection):
        raise MethodError(f"method {method.name!r}: select_vision must return positions or a VisionSelection")
    f, g = sel.features, sel.groups
    if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[1] != x.features.shape[1] \
            or f.dtype != x.features.dtype or f.shape[0] != x.keep:
        got = f"{f.dtype} {tuple(f.shape)}" if isinstance(f, torch.Tensor) else type(f).__name__
        raise MethodError(f"method {method.name!r}: selected features must be {x.features.dtype} of shape "
                          f"({x.keep}, {x.features.shape[1]}), got {got}")
    n = x.grid_shape[0] * x.grid_shape[1]
    if not isinstance(g, torch.Tensor) or g.dim() != 2 or g.shape[0] != f.shape[0] or g.dtype != torch.int64 \
            or int(g.min()) < -1 or int(g.max()) >= n or bool((g.max(1).values < 0).any()):
        raise MethodError(f"method {method.name!r}: groups must be int64 ({f.shape[0]}, k) token-grid ids in "
                          f"-1..{n - 1}, each row naming at least one")
    s = sel.score
    if s is not None and (not isinstance(s, torch.Tensor) or tuple(s.shape) != (n,)):
        got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise MethodError(f"method {method.name!r}: the selection's score must be one value per token, ({n},), got {got}")
    return sel
