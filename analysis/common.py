"""What every analysis command shares: the model runner, samples, config specs, answer matching.

Why one module: evaluate, batch, sweep and calibrate must read samples, name configs and judge
answers in exactly the same way, or their numbers are not comparable.

Config specs (strings, so that a command line, a table column and a trace folder all name a run
the same way):

    off | 192 | 128 | 64            a preset of the model (its mustdrop.json, else the reference)
    64-no-merge                     the preset with one stage switched off
                                    (no-merge, no-key_set, no-filter, no-kv_trim)
    fastv@64 | random@64 | pool@64  a same-budget baseline (any registered method but MustDrop:
    fastervlm@64 | visionzip@64     mustdrop.methods, plug-ins of --method-file included): its budget
    pdrop@64 | METHOD@64            is, per sample, the layer-averaged vision tokens (compute
                                    convention) of that sample's run of the named spec ("64" here);
                                    how each one meets it: its module in mustdrop/methods/
    fastv=150                       a baseline at a fixed budget of 150 tokens
    SPEC+key=value+...              any MustDropConfig field overridden, e.g.
                                    64+global_thr=0.02+individual_thr=0.02, 64+prune_layers=1,3
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mustdrop.config import STAGE_FIELDS, ConfigSpec, parse_spec  # noqa: E402,F401 - parse_spec: analysis' API
from mustdrop.jsonfile import write_json_atomic  # noqa: E402,F401 - analysis' API

STAGES = STAGE_FIELDS
TIMING_COLUMNS = ("vision_s", "prefill_s", "decode_s", "total_s", "wall_s")
TOKEN_CONVENTIONS = ("authors' convention: (p0 N0 + (p1-p0) N1 + ... + (L-p_last) Nk) / L, as the paper "
                     "prints and quotes its budgets; compute convention: mean over layers of the vision "
                     "tokens each layer processed")


# --------------------------------------------------------------------------- answers
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalise_answer(text: str | None) -> str:
    """Lower case, punctuation removed, whitespace collapsed: 'Red.' and ' red' match 'red'."""
    if text is None:
        return ""
    return " ".join(str(text).lower().translate(_PUNCT).split())


def is_correct(prediction: str | None, answer: str | None) -> float:
    """1.0 / 0.0 after normalisation; NaN when the sample has no reference answer."""
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        return float("nan")
    return float(normalise_answer(prediction) == normalise_answer(answer))


# --------------------------------------------------------------------------- samples
@dataclass
class Item:
    """One sample: an image (loaded on demand), a question, maybe an answer and scene ground truth."""

    id: str
    order: int
    question: str
    load_image: Callable = field(repr=False)
    answer: str | None = None
    qtype: str | None = None
    scene: object = field(default=None, repr=False)      # analysis.toyworld.Scene when known
    targets: tuple[int, ...] | None = None


SEED_BLOCK = 10_000      # questions per seed block; the scene world has 100,000 indices per split
SEED_BLOCKS = 10


def scene_start(seed: int) -> int:
    """First index of a seed's block of a split: seeds pick disjoint blocks, and within one seed a
    run with n questions is a prefix of a run with more (so small runs are comparable to big ones)."""
    if not 0 <= int(seed) < SEED_BLOCKS:
        raise ValueError(f"seed must be in 0..{SEED_BLOCKS - 1} (the scene world has {SEED_BLOCKS} blocks of "
                         f"{SEED_BLOCK} questions per split)")
    return int(seed) * SEED_BLOCK


def scene_items(split: str, n: int, seed: int = 0, start: int | None = None) -> list[Item]:
    """n consecutive questions of a scene-world split (question types cycle, so types are balanced)."""
    first = scene_start(seed) if start is None else int(start)
    if n > SEED_BLOCK:
        raise ValueError(f"at most {SEED_BLOCK} questions per seed block, got n = {n}")
    items = []
    for k in range(n):
        index = first + k
        items.append(_LazySceneItem(f"{split}-{index:07d}", k, split, index))
    return items


class _LazySceneItem(Item):
    """A scene-world item that renders its scene only when a run needs it (resumed runs need not)."""

    def __init__(self, id: str, order: int, split: str, index: int):
        self.id, self.order, self.split, self.index = id, order, split, index
        self._sample = None

    def __repr__(self):
        return f"SceneItem({self.id})"

    def _get(self):
        if self._sample is None:
            from analysis.toyworld import make_sample
            self._sample = make_sample(self.split, self.index)
        return self._sample

    question = property(lambda self: self._get().question)
    answer = property(lambda self: self._get().answer)
    qtype = property(lambda self: self._get().qtype)
    scene = property(lambda self: self._get().scene)
    targets = property(lambda self: tuple(self._get().targets))
    load_image = property(lambda self: (lambda: self._get().image))


def folder_items(images: str | Path, questions: str | Path) -> list[Item]:
    """A folder of images + a JSONL file, one object per line:
    {"image": "name.png", "question": "...", "answer": "..." (optional), "id": "..." (optional)}."""
    from mustdrop.images import load_image

    images = Path(images)
    items = []
    for k, line in enumerate(Path(questions).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{questions}: line {k + 1} is not JSON ({e})") from None
        if not isinstance(rec, dict) or "image" not in rec or "question" not in rec:
            raise ValueError(f"{questions}: line {k + 1} needs at least 'image' and 'question'")
        path = images / rec["image"]
        sid = str(rec.get("id", f"{k:06d}-{Path(rec['image']).stem}"))
        items.append(Item(safe_name(sid), len(items), str(rec["question"]), (lambda p=path: load_image(p)),
                          rec.get("answer"), rec.get("type")))
    return items


def hf_items(path: str | Path, image_column="image", question_column="question", answer_column="answer",
             split: str | None = None, n: int | None = None) -> list[Item]:
    """A local HuggingFace ``datasets`` dataset saved with save_to_disk (read offline)."""
    try:
        import datasets  # noqa: F401 - optional dependency, imported only for this input kind
    except ImportError:
        raise SystemExit("reading a HuggingFace dataset needs the 'datasets' package, which is not installed "
                         "here: pip install datasets (or export it to a folder of images + JSONL and use "
                         "--images/--questions)") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            raise SystemExit(f"{path} holds splits {list(ds)}; choose one with --hf-split")
        ds = ds[split]
    for col in (image_column, question_column):
        if col not in ds.column_names:
            raise SystemExit(f"{path} has no column {col!r}; columns: {ds.column_names}")
    rows = range(len(ds) if n is None else min(n, len(ds)))
    items = []
    for k in rows:
        def img(k=k):
            return ds[k][image_column]
        rec = ds[k]
        ans = rec.get(answer_column) if answer_column in ds.column_names else None
        items.append(Item(f"{k:07d}", k, str(rec[question_column]), img, None if ans is None else str(ans)))
    return items


def shard(items: list[Item], spec: str | None) -> list[Item]:
    """``i/n``: every n-th item starting at i (0-based), so shards are balanced and disjoint."""
    if not spec:
        return items
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard must be i/n with 0 <= i < n, got {spec!r}")
    i, n = int(m.group(1)), int(m.group(2))
    return [it for it in items if it.order % n == i]


# --------------------------------------------------------------------------- configs
# Specs are parsed by the library's one parser of configs from text (mustdrop.config.parse_spec; its
# overrides by parse_field), which the app's advanced panel and the lmms-eval model args use too.
Spec = ConfigSpec


def build_config(runner, spec: Spec, budget: float | None = None, baseline_layer: int | None = None, seed: int = 0,
                 n_tokens: int | None = None):
    """The MustDropConfig of a spec for this model; ``budget`` for baselines matched to another run,
    ``n_tokens`` that run's unpruned vision tokens (mustdrop.accounting.vanilla_vision_tokens) where the
    grid is per image. Baselines run at the model's default positions, as its MustDrop presets do."""
    from mustdrop import methods
    from mustdrop.config import MustDropConfig

    if spec.base in methods.baselines():
        b = spec.budget if spec.budget is not None else budget
        if b is None:
            raise ValueError(f"{spec.text}: a matched baseline needs the budget of its {spec.match!r} run")
        layer = baseline_layer if baseline_layer is not None else auto_baseline_layer(runner, b, n_tokens)
        cfg = MustDropConfig.baseline(spec.base, b, layer=layer, seed=seed, positions=runner.defaults.positions)
    else:
        cfg = runner.config_for(spec.base)
        if spec.off_stage:
            cfg = cfg.replace(**{spec.off_stage: False})
    if spec.overrides:
        cfg = cfg.replace(**spec.changes())
    return cfg.replace(preset=spec.text)


def add_method_file_arg(ap) -> None:
    """--method-file PATH (repeatable): a researcher's method, usable in config specs by its name."""
    ap.add_argument("--method-file", action="append", default=[], metavar="PATH",
                    help="a Python file declaring METHOD (see examples/methods/); repeat for several")


def load_method_files(paths) -> list[str]:
    """Register the methods of --method-file files; a broken file ends the command with its message."""
    from mustdrop import methods

    try:
        return [m.name for m in methods.load_files(paths)]
    except methods.MethodError as e:
        raise SystemExit(f"error: {e}") from None


def auto_baseline_layer(runner, budget: float, n_tokens: int | None = None) -> int:
    """FastV / random drop layer K when none is given (mustdrop.matched.auto_baseline_layer: the
    rule the app's comparison uses too)."""
    from mustdrop.matched import auto_baseline_layer as rule

    return rule(runner, budget, n_tokens)


def baseline_columns(trace) -> dict:
    """A baseline's plan as table columns: tokens a baseline that drops inside the LLM had to drop
    before it to meet its budget (pre_llm_keep, NaN when none) and PyramidDrop's share (pdrop_ratio)."""
    plan = (trace.meta.get("baseline") or {}).get("plan") or {}
    pre = plan.get("pre_keep")
    in_llm = bool(plan.get("layers"))          # FasterVLM / VisionZip / pooling select before the LLM by design
    return {"pre_llm_keep": float(pre) if in_llm and pre < plan.get("n0", pre) else float("nan"),
            "pdrop_ratio": float(plan["ratio"]) if plan.get("ratio") is not None else float("nan")}


def bootstrap_interval(values, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (NaN-free values, e.g. per-question correctness);
    seeded, so the same table prints the same interval."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def order_specs(texts: list[str]) -> list[Spec]:
    """Parsed specs with every matched spec run before the baselines that need it ("off" first)."""
    specs = {t: parse_spec(t) for t in texts}
    for s in list(specs.values()):
        for need in s.needs:
            specs.setdefault(need, parse_spec(need))
    specs.setdefault("off", parse_spec("off"))
    out, seen = [], set()

    def visit(t):
        if t in seen:
            return
        seen.add(t)
        for need in specs[t].needs:
            visit(need)
        out.append(specs[t])

    visit("off")
    for t in texts:
        visit(t)
    for t in specs:
        visit(t)
    return out


def safe_name(text: str) -> str:
    """A file-system-safe folder name for a spec or sample id (a short hash keeps it unique)."""
    slug = re.sub(r"[^A-Za-z0-9._@-]+", "_", text).strip("._") or "x"
    if slug != text:
        slug += "-" + hashlib.sha1(text.encode()).hexdigest()[:6]
    return slug


# --------------------------------------------------------------------------- model
def load_runner(model: str, device: str | None = None, dtype: str | None = None, threads: int | None = None):
    """Load a checkpoint of any supported family (LLaVA-1.5, SigLIP-LLaVA, LLaVA-NeXT, OneVision,
    Qwen2-VL / Qwen2.5-VL) into its runner, as the app and the CLI do (offline)."""
    import torch

    from mustdrop.adapters import load_llava, make_runner

    if threads:
        torch.set_num_threads(int(threads))
    m, p = load_llava(model, device, dtype)
    return make_runner(m, p, str(model))


def clean_for_json(obj):
    """NaN -> None recursively, so that the JSON is strict (other tools choke on NaN)."""
    if isinstance(obj, dict):
        return {k: clean_for_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_for_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    try:
        import numpy as np
        if isinstance(obj, np.generic):
            return clean_for_json(obj.item())
    except ImportError:
        pass
    return obj


def iter_progress(iterable, total: int | None = None, desc: str = "", disable: bool | None = None) -> Iterator:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True)
