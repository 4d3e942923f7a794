"""Find (global_thr, individual_thr) that reach a target average vision-token budget on a sample.

    python -m analysis.calibrate --model assets/toy-llava --budget 64 [--n 32] [--split val] [--write]

Why: the authors' thresholds were tuned for LLaVA-1.5-7B; on another model the same numbers keep a
very different number of tokens, so "the 64 preset" would not mean 64 tokens. The paper's budgets
(192 / 128 / 64) are averages over layers and samples in the authors' printed convention
((p0 N0 + (p1-p0) N1 + ... + (L-p_last) Nk) / L), so that is the default target here; pass
--convention compute for the mean over layers of the tokens actually processed.

Method: one scale factor s multiplies the preset's pair, (g, i) -> (s g, s i), each capped at 1,
so the published ratio between the global and the individual threshold is kept. A larger s drops
more, so the average budget falls monotonically with s; we bracket the target by factors of 4
and bisect log s until the mean over the sample is within --tol of the target. Only prefill
matters, so each trial generates one token. The search works on the validation split so that the
test split stays unseen. Stage 1a (merging) is not touched: when merging alone already goes below
the target, or the key set alone stays above it, the budget is unreachable and we say so
(--write-nearest still stores the nearest pair, with that note in its calibration record).

--write updates the model folder's mustdrop.json (atomic write): presets[P] = the pair found, for
P the preset named by --preset (default: the budget, when it is 192, 128 or 64), plus a
"calibration" record of how it was found (target, convention, reached mean, split, n).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from analysis.common import clean_for_json, iter_progress, load_runner, scene_items, write_json_atomic

CONVENTIONS = ("authors", "compute")


def base_pair(defaults, preset: str | None, budget: float) -> tuple[str, tuple[float, float]]:
    """The preset whose thresholds are scaled: the named one, else the one nearest the budget."""
    presets = defaults.presets
    if preset is None:
        preset = min(presets, key=lambda k: abs(float(k) - budget))
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    return preset, tuple(float(x) for x in presets[preset])


def mean_budget(runner, images, items, config, convention: str) -> float:
    from mustdrop.accounting import summarize

    vals = []
    for img, item in zip(images, items):
        t = runner.run(img, item.question, config, max_new_tokens=1).trace
        vals.append(summarize(t)["equivalent_tokens"][convention])
    return sum(vals) / len(vals)


def calibrate(runner, items, budget: float, preset: str | None = None, convention: str = "authors",
              tol: float = 0.02, max_iter: int = 16, progress: bool = True) -> dict:
    """Bisect the scale factor; return the thresholds found and the search history."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}")
    if not budget > 0:
        raise ValueError(f"budget must be positive, got {budget!r}")
    preset, (g0, i0) = base_pair(runner.defaults, preset, budget)
    base = runner.config_for(preset)
    images = [it.load_image() for it in items]
    s_max = 1.0 / max(g0, i0)
    history: list[dict] = []
    bar = iter_progress(range(max_iter + 8), desc=f"calibrate {budget:g}", disable=not progress)

    def trial(s):
        cfg = base.replace(global_thr=min(1.0, g0 * s), individual_thr=min(1.0, i0 * s))
        e = mean_budget(runner, images, items, cfg, convention)
        history.append({"scale": s, "global_thr": cfg.global_thr, "individual_thr": cfg.individual_thr,
                        "budget": e})
        bar.update(1)
        bar.set_postfix(scale=f"{s:.4g}", budget=f"{e:.1f}")
        return e

    def close(e):
        return abs(e - budget) <= tol * budget

    s = min(1.0, s_max)
    e = trial(s)
    lo = hi = None                 # lo: scale with budget above target (drops too little); hi: below
    if e > budget:
        lo = (s, e)
        while not close(e) and e > budget and s < s_max:
            s = min(s * 4, s_max)
            e = trial(s)
            if e > budget:
                lo = (s, e)
        if e <= budget:
            hi = (s, e)
    else:
        hi = (s, e)
        while not close(e) and e < budget and s > 1e-7:
            s = s / 4
            e = trial(s)
            if e < budget:
                hi = (s, e)
        if e >= budget:
            lo = (s, e)
    it = 0
    while lo and hi and not close(history[-1]["budget"]) and it < max_iter:
        s = math.sqrt(lo[0] * hi[0])
        e = trial(s)
        if e > budget:
            lo = (s, e)
        else:
            hi = (s, e)
        it += 1
    bar.close()
    best = min(history, key=lambda h: abs(h["budget"] - budget))
    reached = abs(best["budget"] - budget) <= tol * budget
    note = ""
    if not reached and not (lo and hi):
        note = ("unreachable: " + ("even the largest thresholds keep more (key set / merging floor)"
                                   if lo and not hi else "merging alone already goes below the target"))
    return {"budget": budget, "convention": convention, "preset": preset, "base_pair": [g0, i0],
            "global_thr": best["global_thr"], "individual_thr": best["individual_thr"], "scale": best["scale"],
            "reached": best["budget"], "within_tol": reached, "tol": tol, "n": len(items),
            "history": history, "note": note}


def write_defaults(model_dir, preset: str, result: dict, split: str, num_layers: int | None = None) -> Path:
    """Store the pair in the model folder's mustdrop.json, keeping whatever else the file holds."""
    from mustdrop.config import DEFAULTS_FILE, ModelDefaults

    path = Path(model_dir) / DEFAULTS_FILE
    if not Path(model_dir).is_dir():
        raise ValueError(f"--write needs a local model folder, got {model_dir!r}")
    raw = json.loads(path.read_text()) if path.is_file() else {}
    if preset not in ("192", "128", "64"):
        raise ValueError(f"--write stores presets 192, 128 or 64; got {preset!r} (use --preset)")
    base = ModelDefaults.load(str(model_dir), num_layers).to_json()
    for k, v in base.items():
        raw.setdefault(k, v)
    raw.setdefault("presets", {})[preset] = {"global_thr": result["global_thr"],
                                             "individual_thr": result["individual_thr"]}
    raw.setdefault("calibration", {})[preset] = {
        "target": result["budget"], "convention": result["convention"], "reached": result["reached"],
        "split": split, "n": result["n"], "method": "scale of the preset pair, bisection (analysis.calibrate)"}
    if not result["within_tol"]:
        raw["calibration"][preset]["note"] = result["note"] or "target not reached; nearest pair stored"
    write_json_atomic(path, clean_for_json(raw))
    ModelDefaults.from_file(path)           # what we wrote must read back
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="assets/toy-llava")
    ap.add_argument("--budget", type=float, required=True, help="target average vision tokens")
    ap.add_argument("--preset", default=None, help="preset to scale and (with --write) to store; default: "
                                                   "the budget if it names a preset, else the nearest one")
    ap.add_argument("--convention", default="authors", choices=CONVENTIONS)
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=0.02, help="relative tolerance on the mean budget")
    ap.add_argument("--max-iter", type=int, default=16)
    ap.add_argument("--write", action="store_true", help="update MODEL/mustdrop.json")
    ap.add_argument("--write-nearest", action="store_true",
                    help="with --write: store the nearest pair even when the target is unreachable "
                         "(the calibration record then carries the note saying so)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    runner = load_runner(a.model, threads=a.threads)
    preset = a.preset or (f"{a.budget:g}" if f"{a.budget:g}" in runner.defaults.presets else None)
    res = calibrate(runner, scene_items(a.split, a.n, a.seed), a.budget, preset, a.convention, a.tol, a.max_iter)
    print(f"target {a.budget:g} equivalent tokens ({a.convention} convention) on {a.n} {a.split} questions: "
          f"global_thr {res['global_thr']:.6g}, individual_thr {res['individual_thr']:.6g} "
          f"(scale {res['scale']:.4g} of preset {res['preset']} {res['base_pair']}) -> {res['reached']:.2f}"
          + ("" if res["within_tol"] else f"  NOT within {a.tol:.0%}. {res['note']}"))
    if a.json:
        write_json_atomic(a.json, clean_for_json(res))
    if a.write:
        if not res["within_tol"] and not a.write_nearest:
            print("not written: the target was not reached", file=sys.stderr)
            return 1
        print(f"wrote {write_defaults(a.model, preset or res['preset'], res, a.split, runner.num_layers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
