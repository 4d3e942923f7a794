"""The model side of the app: the model loaded once, one lock around it, a cache of vanilla runs.

``Lens.analyze`` is the only way the app reaches the model, and ``_run_model`` (under
``spaces.GPU`` on a ZeroGPU Space) the only place it calls it. With ``compare=METHOD`` it also runs
a same-budget baseline at the budget of the MustDrop run it just made (``mustdrop.matched``: the
rule ``analysis.sweep compare`` uses).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

from mustdrop import methods
from mustdrop.config import PRESET_NAMES, MustDropConfig, config_from_text
from mustdrop.images import ImageInputError, load_image, pixel_sha256
from mustdrop.trace import TraceError

try:  # HuggingFace ZeroGPU Spaces: run the model under spaces.GPU when the package exists
    import spaces  # type: ignore

    _gpu = spaces.GPU
except Exception:  # noqa: BLE001 - anything: the package is optional
    spaces = None

    def _gpu(fn=None, **_kw):
        return fn if fn is not None else (lambda f: f)


@_gpu
def _run_model(runner, *args, **kwargs):
    """The one place the app runs the model (under spaces.GPU on a ZeroGPU Space)."""
    return runner.run(*args, **kwargs)


HERE = Path(__file__).resolve().parents[1]        # the repository: assets/ and the shipped model
DEFAULT_MODEL = "assets/toy-llava"
PRESETS = list(PRESET_NAMES) + ["custom"]
VANILLA_CACHE_SIZE = 32
COMPARE_NONE = "none"


def compare_methods() -> tuple[str, ...]:
    """The "compare with" values: none, then every registered method but MustDrop (built-ins, then the
    plug-ins loaded by --method-file or entry points), read when the app is built."""
    return (COMPARE_NONE,) + methods.baselines()


def refused_methods(runner) -> dict[str, str]:
    """{method: why} of the baselines the loaded model runs no config of (its host's
    ``method_refusal``: pooling on Qwen-VL, every vision-side method on LLaVA-NeXT); none without a model."""
    host = getattr(runner, "host", None)
    if host is None:
        return {}
    return {m: why for m in methods.baselines() if (why := host.method_refusal(methods.get(m)))}


def compare_choices(runner=None) -> list[tuple[str, str]]:
    """(label, value) of each "compare with" choice the loaded model can run (every one without a model)."""
    labels, refused = methods.labels(), refused_methods(runner)
    return [("none", COMPARE_NONE)] + [(labels[m], m) for m in compare_methods()[1:] if m not in refused]


def compare_method(value) -> str | None:
    """A "compare with" value as a baseline method (None for none), or a ValueError naming the choices."""
    if value is None or value == "" or value == COMPARE_NONE:
        return None
    if value not in compare_methods():
        raise ValueError(f"unknown comparison method {value!r}; choose one of {', '.join(compare_methods())}")
    return str(value)


class Analysis(NamedTuple):
    """One analysis: the vanilla and MustDrop traces, the image, and the comparison trace (or None)."""

    vanilla: object
    trace: object
    image: object
    compare: object = None


def user_errors() -> tuple:
    """The exceptions whose message is shown to the visitor as it is (bad input, not a bug)."""
    errors = (ValueError, ImageInputError, TraceError)
    try:
        from mustdrop.adapters.loading import ModelLoadError
        return errors + (ModelLoadError,)
    except Exception:  # noqa: BLE001 - the adapters cannot be imported: replay only
        return errors


def stage_progress(say, run_name: str, start: float, span: float = 0.5):
    """A run's progress callback (stage ids, see RUN_STAGES) as (fraction, words) for a progress bar
    on which this run takes the ``span`` starting at ``start``."""
    from mustdrop.adapters.llava import RUN_STAGES

    order = list(RUN_STAGES)

    def report(stage: str):
        say(start + span * order.index(stage) / len(order), f"{run_name}: {RUN_STAGES[stage]}")
    return report


class Lens:
    """One runner, one lock, a cache of vanilla runs."""

    def __init__(self, model: str | None = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
                 runner=None):
        self.model_arg = model
        self.device, self.dtype = device, dtype
        self.runner = runner
        self.load_error: str | None = None
        self._lock = threading.Lock()
        self._vanilla: OrderedDict = OrderedDict()
        self.vanilla_hits = 0

    @property
    def model_id(self) -> str:
        return self.runner.model_id if self.runner is not None else str(self.model_arg)

    @property
    def model_label(self) -> str:
        """model_id for the page header: a path inside the app's folder is shown relative to it."""
        try:
            return str(Path(self.model_id).resolve().relative_to(HERE))
        except (ValueError, OSError):
            return self.model_id

    def load(self):
        """Load the model once; remember a load failure so the UI can say it (replay keeps working)."""
        from mustdrop.adapters import load_llava, make_runner
        from mustdrop.adapters.loading import ModelLoadError

        with self._lock:
            if self.runner is not None:
                return self.runner
            path = self.model_arg
            local = HERE / path if path and not Path(path).is_absolute() else None
            if local is not None and local.exists():
                path = str(local)
            elif path == DEFAULT_MODEL:
                self.load_error = (f"the shipped model {DEFAULT_MODEL} is not in this checkout (it is built by "
                                   "analysis/train_toy.py); pass --model PATH_OR_ID")
                raise ModelLoadError(self.load_error)
            try:
                model, processor = load_llava(path, device=self.device, dtype=self.dtype)
                # Traces name the model as the user gave it; the defaults come from where it loaded.
                self.runner = make_runner(model, processor, str(self.model_arg), defaults_from=path)
                self.load_error = None
            except ModelLoadError as e:
                self.load_error = str(e)
                raise
            return self.runner

    def defaults(self, preset: str = "64") -> MustDropConfig:
        """A named preset's knobs for this model (the reference ones when no model is loaded)."""
        return self.runner.config_for(preset) if self.runner is not None else MustDropConfig()

    def config(self, preset: str, custom: dict | None = None) -> MustDropConfig:
        runner = self.load()
        if preset == "custom":
            if not custom:
                raise ValueError("preset 'custom' needs the knobs of the advanced panel")
            return config_from_text(runner.config_for, "64", **custom).replace(preset="custom")
        if preset not in PRESET_NAMES:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return runner.config_for(preset)

    def analyze(self, image, question, config, max_new_tokens=16, sampling=None, progress=None,
                compare: str | None = None) -> Analysis:
        """Analysis(vanilla trace, MustDrop trace, image, comparison trace or None) for one input;
        vanilla cached per model, image, question and decoding settings. ``compare``: a baseline
        method run at the MustDrop run's budget (mustdrop.matched.matched_config), its random seed
        the decoding seed."""
        from mustdrop.adapters import Sampling

        method = compare_method(compare)
        if method is not None and not config.enabled:
            raise ValueError("a same-budget comparison needs a MustDrop run that prunes: choose a preset other than off")
        runner = self.load()
        sampling = sampling or Sampling()
        img = load_image(image)
        sha = pixel_sha256(img)
        q = question.strip() if isinstance(question, str) else question
        key = (self.model_id, sha, q, int(max_new_tokens), float(sampling.temperature), float(sampling.top_p),
               int(sampling.seed))
        say = progress or (lambda frac, desc: None)
        span = 0.5 if method is None else 1 / 3
        with self._lock:
            vanilla = self._vanilla.get(key)
            if vanilla is not None:
                self._vanilla.move_to_end(key)
                self.vanilla_hits += 1
                say(span, "vanilla: cached")
            else:
                vanilla = _run_model(runner, img, q, runner.config_for("off"), max_new_tokens=max_new_tokens,
                                     sampling=sampling, progress=stage_progress(say, "vanilla", 0.0, span)).trace
                self._vanilla[key] = vanilla
                while len(self._vanilla) > VANILLA_CACHE_SIZE:
                    self._vanilla.popitem(last=False)
            if not config.enabled:
                return Analysis(vanilla, vanilla, img)
            trace = _run_model(runner, img, q, config, max_new_tokens=max_new_tokens, sampling=sampling,
                               progress=stage_progress(say, f"MustDrop {config.preset}", span, span)).trace
            other = None
            if method is not None:
                from mustdrop.matched import matched_config

                cfg = matched_config(runner, method, trace, seed=int(sampling.seed))
                other = _run_model(runner, img, q, cfg, max_new_tokens=max_new_tokens, sampling=sampling,
                                   progress=stage_progress(say, methods.get(method).label, 2 * span, span)).trace
        return Analysis(vanilla, trace, img, other)
