"""What the dataset lens shows, as pure functions over a TraceSet (no drawing, no model).

Words (design.md): lost = the vanilla run answered right and this config wrong; gained = the
reverse; both only where the sample has a reference answer and a vanilla row. Frequencies are the
share of a config's traces (of a chosen subset of samples) in which a patch had a property, on the
image grid of each crop kind ("image" for one-grid models; LLaVA-NeXT's base image and its tiles).
Coverage of the asked objects comes from the rows' object_boxes / object_mask, else the scene world's
masks (0 where a sample has none; mustdrop.dataset.objects).
"""

from __future__ import annotations

import numpy as np

from .traceset import (DROPPED, FATE_NAMES, MERGED, NO_TOKEN, SCORE_GLOBAL, SCORE_INDIVIDUAL, SCORE_NAMES,
                       SCORE_RANK, TRIMMED, TraceSet)

MAP_KINDS = ("merged", "key", "dropped", "kept", "trimmed")
MAP_TITLES = {"merged": "merged in 1a", "key": "key token (1b)", "dropped": "dropped by layer",
              "kept": "kept after layer", "trimmed": "trimmed from KV at layer"}


# ---------------------------------------------------------------------- answers
def flips(ts: TraceSet):
    """The table with vanilla_correct, lost and gained per row (NaN / False without a vanilla row or
    a reference answer); the vanilla rows themselves are never lost or gained."""
    rows = ts.rows.copy()
    if ts.vanilla is None:
        rows["vanilla_correct"] = np.nan
    else:
        van = rows[rows["config"] == ts.vanilla].set_index("id")["correct"]
        rows["vanilla_correct"] = rows["id"].map(van).astype(float)
    ok = rows["status"] == "ok"
    if ts.vanilla is not None:
        ok &= rows["config"] != ts.vanilla
    rows["lost"] = ok & (rows["vanilla_correct"] == 1) & (rows["correct"] == 0)
    rows["gained"] = ok & (rows["vanilla_correct"] == 0) & (rows["correct"] == 1)
    return rows


def config_summary(ts: TraceSet) -> dict:
    """Per config: method, n_samples, accuracy (NaN without answers), lost, gained, agreement with
    vanilla and the mean accounting (both token conventions, FLOPs and KV ratios)."""
    rows = flips(ts)
    out = {}
    for cfg in ts.configs:
        g = rows[(rows["config"] == cfg) & (rows["status"] == "ok")]
        acc = g["correct"].dropna()
        out[cfg] = {"method": "vanilla" if cfg == ts.vanilla else _first(g["method"]), "n_samples": int(len(g)),
                    "n_failed": int(((rows["config"] == cfg) & (rows["status"] != "ok")).sum()),
                    "accuracy": float(acc.mean()) if len(acc) else None,
                    "lost": int(g["lost"].sum()), "gained": int(g["gained"].sum()),
                    "agrees_vanilla": _mean(g["agrees_vanilla"]),
                    "eq_tokens_authors": _mean(g["eq_tokens_authors"]), "eq_tokens_compute": _mean(g["eq_tokens_compute"]),
                    "flops_ratio_image": _mean(g["flops_ratio_image"]), "kv_ratio": _mean(g["kv_ratio"])}
    return out


def sample_table(ts: TraceSet):
    """The table the lens lists: every (sample, config) row with lost / gained and the recall of the
    asked objects' patches after the last layer (coverage-weighted; NaN without a mask)."""
    rows = flips(ts)
    idx = ts.index
    recall = {}
    a = idx.arrays
    for i, t in enumerate(idx.traces):
        if not t["has_mask"]:
            continue
        s = idx.slice(i, 0)
        cov = a["target"][s].astype(np.float64)
        alive = (a["has_token"][s] > 0) & (a["drop_layer"][s] < 0)
        recall[(t["id"], t["config"])] = float((cov * alive).sum() / cov.sum()) if cov.sum() > 0 else np.nan
    rows["recall"] = [recall.get((i, c), np.nan) for i, c in zip(rows["id"], rows["config"])]
    return rows


def disagreements(ts: TraceSet, a: str, b: str):
    """Samples where configs a and b answer differently: one row each with both answers and verdicts."""
    rows = sample_table(ts)
    cols = ["id", "prediction", "correct", "lost", "recall"]
    left = rows[rows["config"] == a][cols + ["qtype", "question", "answer"]]
    right = rows[rows["config"] == b][cols]
    m = left.merge(right, on="id", suffixes=(f" {a}", f" {b}"))
    return m[m[f"prediction {a}"] != m[f"prediction {b}"]].reset_index(drop=True)


# ---------------------------------------------------------------------- maps on the image grid
def _crop_kinds(t: dict) -> list[tuple[int, str]]:
    """(crop, kind) of an indexed trace: crop 0 is its own kind (named as the trace names it), every
    further crop (LLaVA-NeXT tiles) is 'tile'."""
    return [(c, t["crops"][0][0] if c == 0 else "tile") for c in range(len(t["crops"]))]


def traces_of(ts: TraceSet, config: str, ids=None) -> list[int]:
    """Index positions of a config's traces, restricted to sample ids when given."""
    keep = None if ids is None else set(map(str, ids))
    return [i for i, t in enumerate(ts.index.traces) if t["config"] == config and (keep is None or t["id"] in keep)]


def patch_property(ts: TraceSet, i: int, kind: str, layer: int | None = None, crop: int = 0) -> np.ndarray:
    """(rows, cols) bool map of one indexed trace: merged, key, dropped (by LLM layer ``layer``, ever
    when None), kept (its token still in the sequence after ``layer``; the last layer when None),
    trimmed (processed by ``layer`` but not held in its KV cache; any layer when None)."""
    idx = ts.index
    has = idx.patch(i, "has_token", crop) > 0
    drop = idx.patch(i, "drop_layer", crop).astype(np.int64)
    L = idx.traces[i]["num_layers"]
    if kind == "merged":
        return idx.patch(i, "merged", crop) > 0
    if kind == "key":
        return idx.patch(i, "key", crop) > 0
    if kind == "dropped":
        return has & (drop >= 0) & (drop <= (L - 1 if layer is None else layer))
    if kind == "kept":
        last = L - 1 if layer is None else layer
        return has & ((drop < 0) | (drop > last))
    if kind == "trimmed":
        kv = idx.kv_cached(i, crop)
        processed = np.stack([has & ((drop < 0) | (drop >= lyr)) for lyr in range(L)])
        gone = processed & ~kv
        return gone.any(0) if layer is None else gone[min(layer, L - 1)]
    raise ValueError(f"unknown map kind {kind!r}; one of {', '.join(MAP_KINDS)}")


def _stacks(ts: TraceSet, config: str) -> dict:
    """{crop kind: dict(ids, layers, has, drop, merged, key, kv)} of a config's traces, one row per
    crop of that kind (the index's per-patch arrays gathered into (n, rows*cols) matrices once per
    config and kept on the TraceSet, so that every map and subset is a vectorised mean)."""
    memo = ts.__dict__.setdefault("_stacks", {})
    if config in memo:
        return memo[config]
    idx, a = ts.index, ts.index.arrays
    groups: dict = {}
    for i in traces_of(ts, config):
        t = idx.traces[i]
        off = t["offset"]
        for c, (name, r, k) in enumerate(t["crops"]):
            ck = name if c == 0 else "tile"
            g = groups.setdefault(ck, {"shape": (r, k), "starts": [], "ids": [], "layers": []})
            if g["shape"] != (r, k):
                g = groups.setdefault(f"{ck} {r}x{k}", {"shape": (r, k), "starts": [], "ids": [], "layers": []})
            g["starts"].append(off)
            g["ids"].append(t["id"])
            g["layers"].append(t["num_layers"])
            off += r * k
    out = {}
    for ck, g in groups.items():
        r, k = g["shape"]
        pos = np.asarray(g["starts"], np.int64)[:, None] + np.arange(r * k)
        out[ck] = {"shape": (r, k), "ids": np.asarray(g["ids"]), "layers": np.asarray(g["layers"]),
                   "has": a["has_token"][pos] > 0, "drop": a["drop_layer"][pos].astype(np.int64),
                   "merged": a["merged"][pos] > 0, "key": a["key"][pos] > 0, "kv": a["kv"][pos]}
    memo[config] = out
    return out


def _property(st: dict, kind: str, layer: int | None, rows: np.ndarray) -> np.ndarray:
    """(n, rows*cols) bool of one property for the selected rows of a stack (see patch_property)."""
    has, drop = st["has"][rows], st["drop"][rows]
    last = st["layers"][rows][:, None] - 1
    if kind == "merged":
        return st["merged"][rows]
    if kind == "key":
        return st["key"][rows]
    if kind == "dropped":
        upto = last if layer is None else layer
        return has & (drop >= 0) & (drop <= upto)
    if kind == "kept":
        after = last if layer is None else layer
        return has & ((drop < 0) | (drop > after))
    if kind == "trimmed":
        gone = _trimmed(st)
        if layer is None:
            return gone["any"][rows]
        if not 0 <= layer < gone["per_layer"].shape[2]:
            return np.zeros(has.shape, bool)
        return gone["per_layer"][rows][:, :, layer]
    raise ValueError(f"unknown map kind {kind!r}; one of {', '.join(MAP_KINDS)}")


def _trimmed(st: dict) -> dict:
    """Per stack, once: (n, P, L) processed by layer l in prefill but not held in its KV cache, and its any."""
    if "trimmed" not in st:
        L = int(st["layers"].max()) if len(st["layers"]) else 0
        kv = np.unpackbits(st["kv"], axis=2, count=L).astype(bool)                        # (n, P, L)
        lyr = np.arange(L)
        processed = st["has"][:, :, None] & ((st["drop"][:, :, None] < 0) | (st["drop"][:, :, None] >= lyr))
        processed &= lyr[None, None, :] < st["layers"][:, None, None]
        per_layer = processed & ~kv
        st["trimmed"] = {"per_layer": per_layer, "any": per_layer.any(2)}
    return st["trimmed"]


def _rows(st: dict, ids) -> np.ndarray:
    if ids is None:
        return np.ones(len(st["ids"]), bool)
    key = frozenset(map(str, ids))
    memo = st.setdefault("rows", {})
    if key not in memo:
        memo[key] = np.array([i in key for i in st["ids"].tolist()], bool)
    return memo[key]


def frequency_maps(ts: TraceSet, config: str, kind: str, layer: int | None = None, ids=None) -> dict:
    """{crop kind: (frequency map (rows, cols) float64, number of crops averaged)} for one config:
    the share of its traces (of samples ``ids`` when given) in which the patch had property ``kind``
    (see patch_property)."""
    out = {}
    for ck, st in _stacks(ts, config).items():
        rows = _rows(st, ids)
        n = int(rows.sum())
        m = _property(st, kind, layer, rows).mean(0) if n else np.zeros(st["shape"][0] * st["shape"][1])
        out[ck] = (m.reshape(st["shape"]).astype(np.float64), n)
    return out


def answer_subsets(ts: TraceSet, config: str) -> dict:
    """Sample ids of a config split by verdict: right, wrong, lost, kept (vanilla right and still right)."""
    rows = flips(ts)
    g = rows[(rows["config"] == config) & (rows["status"] == "ok")]
    return {"right": set(g["id"][g["correct"] == 1]), "wrong": set(g["id"][g["correct"] == 0]),
            "lost": set(g["id"][g["lost"]]),
            "kept": set(g["id"][(g["vanilla_correct"] == 1) & (g["correct"] == 1)])}


def positional_bias(ts: TraceSet, config: str, bands: int = 6, layer: int | None = None, ids=None):
    """Share of the kept patches (after ``layer``, the last by default) in each horizontal band of
    the first crop's grid, top to bottom, against the share a uniform choice among the patches the
    vanilla run gives a token would give (the config's own tokens without a vanilla run); ratio > 1: the config keeps that band more than uniform (arXiv 2508.17807
    reports attention-based pruning favouring the bottom rows)."""
    import pandas as pd

    stacks = _stacks(ts, config)
    if not stacks:
        return pd.DataFrame(columns=["band", "rows", "kept_share", "uniform_share", "ratio"])
    st = next(iter(stacks.values()))                 # the first crop kind (the image, or the base image)
    sel = _rows(st, ids)
    r, c = st["shape"]
    kept_rows = _property(st, "kept", layer, sel).reshape(-1, r, c).sum((0, 2)).astype(float)
    # Uniform reference: the patches the vanilla run of the same samples gives a token (a selection
    # before the LLM leaves its dropped patches without one, so its own tokens would hide its bias).
    ref = st
    if ts.vanilla is not None and ts.vanilla != config:
        van = next(iter(_stacks(ts, ts.vanilla).values()), None)
        if van is not None and van["shape"] == st["shape"]:
            ref = van
    ref_sel = _rows(ref, set(st["ids"][sel].tolist())) if ref is not st else sel
    tok_rows = ref["has"][ref_sel].reshape(-1, r, c).sum((0, 2)).astype(float)
    edges = np.linspace(0, kept_rows.shape[0], bands + 1).round().astype(int)
    recs = []
    for b in range(bands):
        lo, hi = edges[b], edges[b + 1]
        k = kept_rows[lo:hi].sum() / max(kept_rows.sum(), 1)
        u = tok_rows[lo:hi].sum() / max(tok_rows.sum(), 1)
        recs.append({"band": b, "rows": f"{lo}-{hi - 1}", "kept_share": float(k), "uniform_share": float(u),
                     "ratio": float(k / u) if u > 0 else np.nan})
    return pd.DataFrame(recs)


# ---------------------------------------------------------------------- survival
def survival(ts: TraceSet, config: str, ids=None) -> dict:
    """Vision tokens each LLM layer processed, across a config's samples: layers, median, q25, q75."""
    curves = [ts.index.traces[i]["vision_tokens_per_layer"] for i in traces_of(ts, config, ids)]
    if not curves:
        return {"layers": [], "median": [], "q25": [], "q75": [], "n": 0}
    L = max(len(c) for c in curves)
    arr = np.array([c + [np.nan] * (L - len(c)) for c in curves], dtype=float)
    q = np.nanpercentile(arr, [25, 50, 75], axis=0)
    return {"layers": list(range(L)), "median": q[1].tolist(), "q25": q[0].tolist(), "q75": q[2].tolist(),
            "n": len(curves)}


# ---------------------------------------------------------------------- failure attribution
def where_patches_went(ts: TraceSet, i: int) -> dict:
    """Coverage-weighted shares of the asked objects' patches by fate, and the drops by (layer, score)."""
    idx = ts.index
    s = idx.slice(i, 0)
    cov = idx.arrays["target"][s].astype(np.float64)
    total = cov.sum()
    fate = idx.arrays["fate"][s]
    drop = idx.arrays["drop_layer"][s]
    score = idx.arrays["drop_score"][s]
    out = {"shares": {FATE_NAMES[f]: float(cov[fate == f].sum() / total) for f in FATE_NAMES}, "drops": {}}
    for layer in sorted(set(drop[fate == DROPPED].tolist())):
        for sc in (SCORE_GLOBAL, SCORE_INDIVIDUAL, SCORE_RANK):
            w = cov[(fate == DROPPED) & (drop == layer) & (score == sc)].sum() / total
            if w > 0:
                out["drops"][(int(layer), SCORE_NAMES[sc])] = float(w)
    out["before_llm"] = float(cov[fate == NO_TOKEN].sum() / total)
    out["merged"] = float(cov[fate == MERGED].sum() / total)
    out["trimmed"] = float(cov[fate == TRIMMED].sum() / total)
    return out


def attribute(went: dict, half: float = 0.5) -> tuple[str, int | None, str]:
    """(category, layer, score) of one lost answer: walking the losses in order (before the LLM, then
    each prune layer), the point where at least ``half`` of the asked objects' patches are gone; else
    at least half merged in 1a, or trimmed from the KV cache; else the patches were mostly kept."""
    gone = went["before_llm"]
    if gone >= half:
        return "lost before the LLM", None, ""
    layers = sorted({lyr for lyr, _ in went["drops"]})
    for layer in layers:
        at = {sc: w for (lyr, sc), w in went["drops"].items() if lyr == layer}
        gone += sum(at.values())
        if gone >= half - 1e-12:
            return f"lost at layer {layer}", layer, max(at, key=at.get)
    if went["merged"] >= half:
        return "merged in 1a", None, ""
    if went["trimmed"] >= half:
        return "trimmed from KV", None, ""
    return "kept (not the objects' tokens)", None, ""


def failure_attribution(ts: TraceSet, config: str, half: float = 0.5):
    """One row per lost answer of ``config`` whose sample has object masks: qtype, category, layer,
    score and the shares of the asked objects' patches by fate."""
    import pandas as pd

    rows = flips(ts)
    lost = rows[(rows["config"] == config) & rows["lost"]]
    recs = []
    for sid, qtype in zip(lost["id"], lost["qtype"]):
        i = ts.index.lookup.get((sid, config))
        if i is None or not ts.index.traces[i]["has_mask"]:
            continue
        went = where_patches_went(ts, i)
        cat, layer, score = attribute(went, half)
        recs.append({"id": sid, "qtype": qtype, "category": cat, "layer": layer, "score": score,
                     "gone": went["before_llm"] + sum(went["drops"].values()), "merged": went["merged"],
                     "trimmed": went["trimmed"]})
    return pd.DataFrame(recs, columns=["id", "qtype", "category", "layer", "score", "gone", "merged", "trimmed"])


def attribution_table(ts: TraceSet, config: str, half: float = 0.5):
    """Per question type: lost answers with masks, and how many fall in each category (with the
    deciding score for the layers), e.g. 'lost at layer 2 (global share)'."""
    import pandas as pd

    df = failure_attribution(ts, config, half)
    if df.empty:
        return pd.DataFrame(columns=["qtype", "lost"])
    df = df.assign(where=[c if not s else f"{c} ({s})" for c, s in zip(df["category"], df["score"])])
    t = pd.crosstab(df["qtype"], df["where"])
    t.insert(0, "lost", t.sum(axis=1))
    means = df.groupby("qtype")[["gone", "merged"]].mean().rename(
        columns={"gone": "mean share gone", "merged": "mean share merged"})
    return t.join(means).reset_index()


def attribution_sentences(ts: TraceSet, config: str, half: float = 0.5) -> list[str]:
    """The table in words: 'of 94 lost count answers at 64, 61 lost at least half of the asked
    objects' patches at layer 2, by the global share'."""
    df = failure_attribution(ts, config, half)
    out = []
    for qtype, g in df.groupby("qtype", sort=True):
        top = g.groupby(["category", "score"], dropna=False).size().sort_values(ascending=False)
        (cat, score), n = next(iter(top.items()))
        if cat.startswith("lost at layer"):
            what = f"lost at least half of the asked objects' patches at {cat[5:]}" + (f", by the {score}" if score else "")
        elif cat == "lost before the LLM":
            what = "lost at least half of the asked objects' patches before the LLM"
        elif cat == "merged in 1a":
            what = "had at least half of the asked objects' patches merged in 1a"
        elif cat == "trimmed from KV":
            what = "had at least half of the asked objects' patches trimmed from the KV cache"
        else:
            what = "kept at least half of the asked objects' patches (the loss is not their tokens)"
        out.append(f"of {len(g)} lost {qtype} answers at {config}, {n} {what}")
    return out


def _first(s):
    s = s.dropna()
    return None if s.empty else str(s.iloc[0])


def _mean(s):
    s = s.dropna()
    return float(s.mean()) if len(s) else None
