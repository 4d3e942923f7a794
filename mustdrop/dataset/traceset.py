"""TraceSet: a run folder (many samples x configs) opened lazily, with one index cached beside it.

Why an index: every aggregate of the dataset lens reads a few patch maps of every trace; reading
and validating 4000 trace files takes tens of seconds, their per-patch facts a few megabytes. The
index holds exactly those facts, computed once through the Trace's own patch queries
(``Trace.patch``, ``has_token``, ``kv_cached_at``, ``stage2_patch``) so that no geometry is derived
twice, and is stored as ``.lens-index.safetensors`` in the run (no pickle). It is rebuilt when any
trace or the table changes (size and modification time of each) or when it does not validate.

A run folder is untrusted input like any trace: the settings and table are size-capped before
they are parsed, the rows and traces are counted, every path stays inside the folder (symlinks
resolved), and every trace is read through :meth:`mustdrop.trace.Trace.load`, which validates it.
A trace that does not validate is left out of the index and named in ``TraceSet.problems``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..trace import Trace, TraceError
from . import layout

MAX_SETTINGS_BYTES = 1 << 20
MAX_TABLE_BYTES = 256 << 20
MAX_ROWS = 200_000
MAX_TRACES = 100_000
MAX_PATCHES = 200_000_000          # summed over the index: bounds its memory (a few bytes per patch)
INDEX_FILE = ".lens-index.safetensors"
# Bumped whenever what the index holds is computed differently, so that a cached index is rebuilt:
# /2 maps scene-world masks through each trace's grid (objects.scene_coverage; OneVision's 27 x 27).
INDEX_SCHEMA = "mustdrop-run-index/2"
TRACE_CACHE = 64

# Why a patch is not (fully) in the sequence any more: one code per patch and trace (the index's "fate").
KEPT, MERGED, TRIMMED, DROPPED, NO_TOKEN = 0, 1, 2, 3, 4
FATE_NAMES = {KEPT: "kept", MERGED: "merged in 1a (averaged into a window token)",
              TRIMMED: "trimmed from the KV cache (stage 3)", DROPPED: "dropped inside the LLM",
              NO_TOKEN: "dropped before the LLM (no token)"}
# Which score decided a drop inside the LLM.
SCORE_NONE, SCORE_GLOBAL, SCORE_INDIVIDUAL, SCORE_RANK = 0, 1, 2, 3
SCORE_NAMES = {SCORE_NONE: "", SCORE_GLOBAL: "global share", SCORE_INDIVIDUAL: "individual max",
               SCORE_RANK: "the method's ranking"}


class RunError(ValueError):
    """A run folder that cannot be opened, with a message naming the problem."""


@dataclass
class Index:
    """Per-patch facts of every indexed trace, concatenated; ``traces`` says which slice is whose.

    traces[i]: {"id", "config", "path", "method", "offset", "crops": [[name, rows, cols], ...],
    "num_layers", "prune_layers", "vision_tokens_per_layer", "global_thr", "individual_thr",
    "has_mask"}; arrays over all patches P: has_token, merged, key (uint8), drop_layer (int16, -1
    never), drop_score (int8, SCORE_*), fate (int8, FATE), kv (P, ceil(Lmax/8)) uint8 bit-packed
    kv_cached per LLM layer, target (float32 coverage of the asked objects on crop 0, 0 without a mask)."""

    traces: list
    arrays: dict
    fingerprint: str = ""
    lookup: dict = field(default_factory=dict)

    def __post_init__(self):
        self.lookup = {(t["id"], t["config"]): i for i, t in enumerate(self.traces)}

    def slice(self, i: int, crop: int = 0) -> slice:
        t = self.traces[i]
        start = t["offset"]
        for name, r, c in t["crops"][:crop]:
            start += r * c
        _, r, c = t["crops"][crop]
        return slice(start, start + r * c)

    def patch(self, i: int, name: str, crop: int = 0) -> np.ndarray:
        """(rows, cols) map of one indexed trace and crop."""
        _, r, c = self.traces[i]["crops"][crop]
        return self.arrays[name][self.slice(i, crop)].reshape(r, c)

    def kv_cached(self, i: int, crop: int = 0) -> np.ndarray:
        """(num_layers, rows, cols) bool: each LLM layer holds the patch's K/V after prefill."""
        t = self.traces[i]
        _, r, c = t["crops"][crop]
        bits = np.unpackbits(self.arrays["kv"][self.slice(i, crop)], axis=1, count=t["num_layers"])
        return bits.T.reshape(t["num_layers"], r, c).astype(bool)


class TraceSet:
    """One run folder. ``rows``: the table (pandas), one row per (sample, config), normalised to the
    layout's columns; ``configs``: config names in run order; ``vanilla``: the unpruned config or None;
    ``index``: the per-patch facts; ``trace(id, config)``: a validated Trace, read on demand."""

    def __init__(self, root: Path, settings: dict, rows, kind: str):
        self.root = root
        self.settings = settings
        self.rows = rows
        self.kind = kind
        order = [c.get("name") for c in settings.get("configs", []) if isinstance(c, dict)]
        seen = list(dict.fromkeys(str(c) for c in rows["config"])) if len(rows) else []
        self.configs = [c for c in order if c in seen] + [c for c in seen if c not in order]
        v = settings.get("vanilla")
        self.vanilla = v if v in self.configs else None
        self.problems: list[str] = []
        self.index: Index | None = None
        self._traces: OrderedDict = OrderedDict()
        self._root_s = str(root)
        self._dirs: dict = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, root, *, cache: bool = True, progress=None) -> "TraceSet":
        """Open a run folder (this layout, an older analysis.batch folder or an lmms-eval output
        folder) and its index (read from the cache when it is current, else built and cached)."""
        import pandas as pd

        root = Path(root)
        if not root.is_dir():
            raise RunError(f"run folder not found: {root.name}")
        root = root.resolve()
        settings, kind = _settings(root)
        tables = _table_files(root, settings.get("table", layout.TABLE))
        if not tables:
            raise RunError(f"{root.name} holds no table ({settings.get('table', layout.TABLE)}): not a run folder")
        frames = [_read_jsonl(p) for p in tables]
        rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if len(rows) > MAX_ROWS:
            raise RunError(f"{root.name} has {len(rows)} rows; a run is limited to {MAX_ROWS}")
        rows = _normalise(root, rows)
        ts = cls(root, settings, rows, kind)
        ts._load_index(cache=cache, progress=progress)
        return ts

    # ------------------------------------------------------------------ traces and images
    def path_of(self, rel) -> Path | None:
        """A path the table names, inside the run folder; None if it leaves it (``..``, an absolute
        path, a symlinked file or a folder that resolves elsewhere) or is empty. Folders are resolved
        once each (a run has a few), files checked with lstat: 4000 paths in milliseconds."""
        if not isinstance(rel, str) or not rel or "\0" in rel:
            return None
        p = os.path.normpath(os.path.join(self._root_s, rel))
        if not p.startswith(self._root_s + os.sep):
            return None
        parent = os.path.dirname(p)
        ok = self._dirs.get(parent)
        if ok is None:
            real = os.path.realpath(parent)
            ok = self._dirs[parent] = real == self._root_s or real.startswith(self._root_s + os.sep)
        if not ok:
            return None
        try:
            if stat.S_ISLNK(os.lstat(p).st_mode):
                return None
        except OSError:
            pass            # not there (yet): callers check is_file
        return Path(p)

    def trace_path(self, sample_id: str, config: str) -> Path | None:
        hit = self.rows[(self.rows["id"] == str(sample_id)) & (self.rows["config"] == str(config))]
        return None if hit.empty else self.path_of(hit["trace"].iloc[0])

    def trace(self, sample_id: str, config: str) -> Trace:
        """The validated Trace of one (sample, config); TraceError when it has none or it is bad."""
        key = (str(sample_id), str(config))
        if key in self._traces:
            self._traces.move_to_end(key)
            return self._traces[key]
        path = self.trace_path(*key)
        if path is None:
            raise TraceError(f"sample {key[0]!r} has no trace for config {key[1]!r} in this run")
        t = Trace.load(path)
        self._traces[key] = t
        while len(self._traces) > TRACE_CACHE:
            self._traces.popitem(last=False)
        return t

    def image_ref(self, sample_id: str) -> dict | None:
        hit = self.rows[self.rows["id"] == str(sample_id)]
        for ref in hit["image"] if "image" in hit else []:
            ref = parse_ref(ref)
            if ref:
                return ref
        return layout.image_ref_of_id(sample_id)

    def image(self, sample_id: str, trace: Trace | None = None):
        """The sample's image (PIL) when the run says where it is and its pixels are the ones the
        trace recorded (sha256); else None (views then draw on the trace alone)."""
        ref = self.image_ref(sample_id)
        img = _load_ref(self, ref)
        if img is None:
            return None
        if trace is None:
            ok = self.rows[(self.rows["id"] == str(sample_id)) & (self.rows["status"] == "ok")]
            if ok.empty:
                return None
            trace = self.trace(sample_id, ok["config"].iloc[0])
        want = trace.meta.get("input", {}).get("image", {}).get("sha256")
        return img if want and _pixel_sha(img) == want else None

    def scene(self, sample_id: str):
        """(Scene, target ids) of a scene-world sample whose image matches its traces, else None."""
        ref = self.image_ref(sample_id)
        if not ref or ref.get("kind") != "scene":
            return None
        sample = _scene_sample(ref)
        return None if sample is None else (sample.scene, tuple(sample.targets))

    # ------------------------------------------------------------------ index
    def _load_index(self, cache: bool, progress) -> None:
        entries = self._entries()
        fp = self._fingerprint(entries)
        path = self.root / INDEX_FILE
        if cache and path.is_file():
            got = _read_index(path, fp)
            if got is not None:
                self.index, self.problems = got
                return
        self.index = build_index(self, entries, progress=progress)
        self.index.fingerprint = fp
        if cache:
            try:
                _write_index(path, self.index, self.problems)
            except OSError:
                pass      # a read-only run folder: the index lives in memory only

    def _entries(self) -> list[tuple[str, str, Path]]:
        ok = self.rows[(self.rows["status"] == "ok")]
        out = []
        for sid, cfg, rel in zip(ok["id"], ok["config"], ok["trace"]):
            p = self.path_of(rel)
            try:
                st = os.stat(p) if p is not None else None
            except OSError:
                st = None
            if st is not None and stat.S_ISREG(st.st_mode):
                out.append((str(sid), str(cfg), p, st.st_size, st.st_mtime_ns))
        if len(out) > MAX_TRACES:
            raise RunError(f"{self.root.name} has {len(out)} traces; a run is limited to {MAX_TRACES}")
        return out

    def _fingerprint(self, entries) -> str:
        h = hashlib.sha256(INDEX_SCHEMA.encode())
        for p in _table_files(self.root, self.settings.get("table", layout.TABLE)):
            st = p.stat()
            h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        for sid, cfg, p, size, mtime in entries:
            h.update(f"{sid}|{cfg}|{p}|{size}|{mtime}\n".encode())
        for rel in sorted({v for v in self.rows.get("object_mask", []) if isinstance(v, str)}):
            p = self.path_of(rel)          # the rows' mask files feed the index's coverage too
            st = os.stat(p) if p is not None and p.is_file() else None
            h.update(f"{rel}|{st and st.st_size}|{st and st.st_mtime_ns}\n".encode())
        return h.hexdigest()


# ---------------------------------------------------------------------- settings and table
def _read_bounded(path: Path, limit: int, what: str) -> str:
    size = path.stat().st_size
    if size > limit:
        raise RunError(f"{path.name}: the {what} is {size / 1e6:.1f} MB; limited to {limit / 1e6:.0f} MB")
    return path.read_text(encoding="utf-8", errors="replace")


def _settings(root: Path) -> tuple[dict, str]:
    """run.json, or settings inferred for the older folders (see mustdrop.dataset.layout)."""
    p = root / layout.SETTINGS
    if p.is_file():
        try:
            doc = json.loads(_read_bounded(p, MAX_SETTINGS_BYTES, "settings file"))
        except json.JSONDecodeError as e:
            raise RunError(f"{root.name}/{layout.SETTINGS} is not JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("schema") != layout.RUN_SCHEMA:
            raise RunError(f"{root.name}/{layout.SETTINGS}: unknown schema {doc.get('schema') if isinstance(doc, dict) else None!r}; "
                           f"this version reads {layout.RUN_SCHEMA!r}")
        if not isinstance(doc.get("configs", []), list):
            raise RunError(f"{root.name}/{layout.SETTINGS}: configs must be a list")
        return doc, "run"
    if (root / layout.TABLE).is_file():
        return {"schema": None, "producer": "analysis.batch (older folder)", "configs": [], "vanilla": "off",
                "table": layout.TABLE, "dataset": {}}, "analysis.batch (older folder)"
    if list(root.glob("samples.rank*.jsonl")):
        return {"schema": None, "producer": "lmms-eval (older folder)", "configs": [], "vanilla": None,
                "table": "samples.rank*.jsonl", "dataset": {"kind": "lmms-eval"}}, "lmms-eval (older folder)"
    if (root / "mustdrop").is_dir() and list((root / "mustdrop").glob("samples.rank*.jsonl")):
        raise RunError(f"{root.name} is an lmms-eval output folder: open its 'mustdrop' subfolder")
    raise RunError(f"{root.name} is not a run folder: no {layout.SETTINGS}, {layout.TABLE} or samples.rank*.jsonl")


def _table_files(root: Path, table) -> list[Path]:
    names = table if isinstance(table, list) else [table]
    out = []
    for name in names:
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise RunError(f"the run's table must be file names in the run folder, got {name!r}")
        out += sorted(p for p in root.glob(name) if p.is_file() and p.suffix == ".jsonl")
    if len(out) > 1024:
        raise RunError(f"the run names {len(out)} table files; at most 1024")
    return out


def _read_jsonl(path: Path):
    import io

    import pandas as pd

    text = _read_bounded(path, MAX_TABLE_BYTES, "table")
    if not text.strip():
        return pd.DataFrame()
    try:
        return pd.read_json(io.StringIO(text), orient="records", lines=True, dtype=False)
    except ValueError as e:
        raise RunError(f"{path.name} is not a JSON-lines table ({str(e)[:200]})") from None


COLUMNS = ("id", "config", "method", "status", "question", "qtype", "answer", "prediction", "correct",
           "agrees_vanilla", "eq_tokens_authors", "eq_tokens_compute", "flops_ratio_image", "flops_ratio_full",
           "kv_bytes", "kv_ratio", "trace", "image")


def _normalise(root: Path, rows):
    """The layout's columns on every row (older lmms-eval rows: task/doc_id/response; missing
    config names read from the trace), ids and configs as strings, correctness as 1 / 0 / NaN."""
    import pandas as pd

    rows = rows.copy()
    if len(rows) == 0:
        return pd.DataFrame(columns=list(COLUMNS))
    if "id" not in rows and {"task", "doc_id"} <= set(rows.columns):
        rows["id"] = [f"{t}-{d}" for t, d in zip(rows["task"], rows["doc_id"])]
    if "prediction" not in rows and "response" in rows:
        rows["prediction"] = rows["response"]
    if "id" not in rows:
        raise RunError("the run's table has no 'id' column")
    if "config" not in rows or rows["config"].isna().any():
        rows["config"] = _configs_from_traces(root, rows)
    for c in COLUMNS:
        if c not in rows:
            rows[c] = None
    rows["id"] = rows["id"].astype(str)
    rows["config"] = rows["config"].astype(str)
    rows["status"] = rows["status"].fillna("ok").astype(str)
    rows["correct"] = pd.to_numeric(rows["correct"], errors="coerce").astype(float)
    for c in ("agrees_vanilla", "eq_tokens_authors", "eq_tokens_compute", "flops_ratio_image", "flops_ratio_full",
              "kv_bytes", "kv_ratio"):
        rows[c] = pd.to_numeric(rows[c], errors="coerce").astype(float)
    for c in ("question", "qtype", "answer", "prediction", "method"):
        rows[c] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)[:2000]
                   for v in rows[c]]
    rows = rows.drop_duplicates(subset=["id", "config"], keep="last").reset_index(drop=True)
    return rows


def _configs_from_traces(root: Path, rows) -> list[str]:
    """Config names of rows that do not carry one (older lmms-eval rows): the first trace's preset."""
    name = None
    for rel in rows.get("trace", []):
        p = (root / str(rel)).resolve() if isinstance(rel, str) else None
        if p is not None and p.is_relative_to(root) and p.is_file():
            try:
                name = str(Trace.load(p).meta["config"].get("preset") or "run")
            except TraceError:
                continue
            break
    given = rows["config"] if "config" in rows else [None] * len(rows)
    return [str(c) if isinstance(c, str) else (name or "run") for c in given]


def parse_ref(ref) -> dict | None:
    """The image column (a JSON string or an object) as a dict, or None."""
    if isinstance(ref, str):
        try:
            ref = json.loads(ref)
        except json.JSONDecodeError:
            return None
    if not isinstance(ref, dict) or ref.get("kind") not in ("scene", "stored", "path"):
        return None
    return ref


def _scene_sample(ref: dict):
    try:
        from analysis.toyworld import make_sample
    except ImportError:          # the scene world ships with the repository, not with the package
        return None
    try:
        return make_sample(str(ref["split"]), int(ref["index"]))
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None


def _load_ref(ts: TraceSet, ref: dict | None):
    from ..images import ImageInputError, load_image

    if not ref:
        return None
    if ref["kind"] == "scene":
        s = _scene_sample(ref)
        return None if s is None else s.image
    p = ts.path_of(ref.get("path"))
    if p is None or not p.is_file():
        return None
    try:
        return load_image(p)
    except ImageInputError:
        return None


def _pixel_sha(img) -> str:
    """The hash a trace records for its image (mustdrop.images.pixel_sha256), of the image as RGB."""
    from ..images import pixel_sha256

    return pixel_sha256(img.convert("RGB"))


# ---------------------------------------------------------------------- index building
def trace_facts(trace: Trace, target: np.ndarray | None = None) -> tuple[dict, dict]:
    """The index's facts of one trace, from its patch queries: (per-trace record, per-patch arrays)."""
    cfg = trace.meta["config"]
    L = trace.num_layers
    crops, cols = [], {k: [] for k in ("has_token", "merged", "key", "drop_layer", "drop_score", "fate", "kv",
                                       "target")}
    gt, it = float(cfg.get("global_thr", 1.0)), float(cfg.get("individual_thr", 0.0))
    rule = _threshold_rule(trace)
    for c in range(trace.n_crops):
        has = trace.has_token(c)
        r, k = has.shape
        crops.append([trace.crop_name(c), int(r), int(k)])
        merged = trace.patch("merged", c).astype(bool)
        drop = trace.patch("dropped_after_layer", c).astype(np.int64)
        score = np.zeros((r, k), np.int8)
        for layer in sorted(set(drop[drop >= 0].tolist())):
            at = drop == layer
            if not rule:
                score[at] = SCORE_RANK
                continue
            g = trace.stage2_patch(layer, "global_share", c)[at].astype(np.float64)
            i = trace.stage2_patch(layer, "individual_max", c)[at].astype(np.float64)
            # Both scores were below their thresholds; the one nearer its threshold is the binding one:
            # raising that score past its threshold (or lowering the threshold) would have kept the patch.
            rg = g / gt if gt > 0 else -np.inf
            ri = i / it if it > 0 else -np.inf
            score[at] = np.where(np.nan_to_num(rg, nan=-np.inf) >= np.nan_to_num(ri, nan=-np.inf),
                                 SCORE_GLOBAL, SCORE_INDIVIDUAL)
        kv = np.stack([trace.kv_cached_at(layer, c) for layer in range(L)])                 # (L, r, k)
        processed = np.stack([trace.processed_at(layer, c) for layer in range(L)])
        trimmed = (processed & ~kv).any(0)
        fate = np.full((r, k), KEPT, np.int8)
        fate[merged] = MERGED
        fate[trimmed] = TRIMMED
        fate[drop >= 0] = DROPPED
        fate[~has] = NO_TOKEN
        cols["has_token"].append(has.ravel().astype(np.uint8))
        cols["merged"].append(merged.ravel().astype(np.uint8))
        cols["key"].append(trace.patch("key", c).ravel().astype(np.uint8))
        cols["drop_layer"].append(drop.ravel().astype(np.int16))
        cols["drop_score"].append(score.ravel())
        cols["fate"].append(fate.ravel())
        cols["kv"].append(np.packbits(kv.reshape(L, -1).T, axis=1))
        tgt = target if (c == 0 and target is not None and target.shape == (r, k)) else None
        cols["target"].append((np.zeros(r * k, np.float32) if tgt is None else tgt.ravel().astype(np.float32)))
    rec = {"crops": crops, "num_layers": L, "prune_layers": trace.prune_layers,
           "vision_tokens_per_layer": [int(x) for x in trace.meta["vision_tokens_per_layer"]],
           "global_thr": gt, "individual_thr": it, "method": str(cfg.get("method", "mustdrop")),
           "has_mask": bool(target is not None and target.shape == tuple(crops[0][1:]))}
    return rec, {k: np.concatenate(v) for k, v in cols.items()}


def _threshold_rule(trace: Trace) -> bool:
    """Whether the trace's drops compare its two scores with the config's global / individual
    thresholds (MustDrop's filter), as its method's words say (mustdrop.methods); else its drops are
    the method's own ranking."""
    try:
        from ..methods import words_of
    except ImportError:                    # a package without the method registry
        return trace.meta["config"].get("method", "mustdrop") == "mustdrop"
    return bool(words_of(trace).thresholds)


def build_index(ts: TraceSet, entries, progress=None) -> Index:
    """Read every trace once (validated) and keep its per-patch facts (see :class:`Index`)."""
    recs, parts, offset = [], [], 0
    masks: dict = {}
    kv_width = 0
    ts.problems = []
    for n, (sid, cfg, path, _, _) in enumerate(entries):
        if progress is not None:
            progress(n, len(entries))
        try:
            trace = Trace.load(path)
        except TraceError as e:
            ts.problems.append(f"{sid} / {cfg}: {e}")
            continue
        if sid not in masks:
            masks[sid] = _target_mask(ts, sid, trace)
        rec, arrays = trace_facts(trace, masks[sid])
        size = arrays["fate"].size
        if offset + size > MAX_PATCHES:
            raise RunError(f"the run's traces hold over {MAX_PATCHES} patches; too large to index")
        rec.update(id=sid, config=cfg, path=str(path.relative_to(ts.root)), offset=offset)
        offset += size
        kv_width = max(kv_width, arrays["kv"].shape[1])
        recs.append(rec)
        parts.append(arrays)
    arrays = {}
    for k in ("has_token", "merged", "key", "drop_layer", "drop_score", "fate", "target"):
        arrays[k] = np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, np.uint8)
    arrays["kv"] = (np.concatenate([np.pad(p["kv"], ((0, 0), (0, kv_width - p["kv"].shape[1]))) for p in parts])
                    if parts else np.zeros((0, 1), np.uint8))
    return Index(recs, arrays)


def _target_mask(ts: TraceSet, sid: str, trace: Trace) -> np.ndarray | None:
    """Patch coverage of the asked objects: the boxes or mask the sample's row gives (see
    mustdrop.dataset.objects; a row that gives unusable ones is named in ``ts.problems``), else the
    scene world's masks for scene-world samples whose image is the trace's."""
    from . import objects

    hit = ts.rows[ts.rows["id"] == str(sid)]
    for row in hit.to_dict("records"):
        try:
            cov = objects.row_coverage(ts, row, trace)
        except objects.ObjectsError as e:
            ts.problems.append(f"{sid}: {e}; no object mask for this sample")
            return None
        if cov is not None:
            return cov
    ref = ts.image_ref(sid)
    if not ref or ref.get("kind") != "scene":
        return None
    sample = _scene_sample(ref)
    if sample is None or _pixel_sha(sample.image) != trace.meta["input"]["image"].get("sha256"):
        return None
    return objects.scene_coverage(trace, sample.scene, sample.targets)


INDEX_ARRAYS = {"has_token": (np.uint8, 1), "merged": (np.uint8, 1), "key": (np.uint8, 1),
                "drop_layer": (np.int16, 1), "drop_score": (np.int8, 1), "fate": (np.int8, 1),
                "target": (np.float32, 1), "kv": (np.uint8, 2)}


def _write_index(path: Path, idx: Index, problems: list[str]) -> None:
    import os
    import tempfile

    from safetensors.numpy import save_file

    meta = {"schema": INDEX_SCHEMA, "fingerprint": idx.fingerprint, "traces": idx.traces, "problems": problems}
    fd, tmp = tempfile.mkstemp(prefix=".lens-index.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in idx.arrays.items()}, tmp,
                  metadata={"index": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_index(path: Path, fingerprint: str) -> tuple[Index, list[str]] | None:
    """The cached index when it is this run's current one and consistent; else None (rebuild)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            meta = json.loads((f.metadata() or {}).get("index", "{}"))
            if meta.get("schema") != INDEX_SCHEMA or meta.get("fingerprint") != fingerprint:
                return None
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - any unreadable cache is rebuilt
        return None
    try:
        traces = meta["traces"]
        P = arrays["fate"].shape[0]
        for k, (dt, nd) in INDEX_ARRAYS.items():
            a = arrays[k]
            if a.dtype != dt or a.ndim != nd or a.shape[0] != P:
                return None
        end = 0
        for t in traces:
            n = sum(int(r) * int(c) for _, r, c in t["crops"])
            if t["offset"] != end or t["num_layers"] > 8 * arrays["kv"].shape[1]:
                return None
            end += n
        if end != P:
            return None
    except (KeyError, TypeError, ValueError):
        return None
    return Index(traces, arrays, fingerprint), [str(p) for p in meta.get("problems", [])][:1000]
