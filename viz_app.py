"""MustDrop Lens — the Gradio app: what MustDrop does to each image patch, stage by stage.

    python viz_app.py [--model PATH_OR_ID] [--device cpu|cuda] [--dtype float32|float16|bfloat16]
                      [--host 127.0.0.1] [--port 7860]

Layout and callbacks only. The model is reached through ``LlavaMustDrop.run`` and nothing else;
every picture comes from ``mustdrop.vis`` reading a Trace, so moving the layer slider or clicking
a patch re-draws from the trace without a model call, and an uploaded trace file replays every
view with no model loaded at all.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402

import gradio as gr  # noqa: E402

from mustdrop import vis  # noqa: E402
from mustdrop.config import PRESET_NAMES, MustDropConfig  # noqa: E402
from mustdrop.images import ImageInputError, load_image  # noqa: E402
from mustdrop.trace import MAX_TRACE_BYTES, Trace, TraceError  # noqa: E402

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


HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "assets/toy-llava"
EXAMPLES_DIR = HERE / "assets" / "examples"
MAX_FILE_SIZE = "64mb"                     # uploads (images, traces); traces are limited to 64 MB anyway
CANVAS = 480                               # overlay size in pixels (G * cell)
PRESETS = list(PRESET_NAMES) + ["custom"]
USER_ERRORS = (ValueError, ImageInputError, TraceError)   # ModelLoadError is added in _user_errors()
VANILLA_CACHE_SIZE = 32

log = logging.getLogger("mustdrop.app")


def _user_errors():
    try:
        from mustdrop.adapters.loading import ModelLoadError
        return USER_ERRORS + (ModelLoadError,)
    except Exception:  # noqa: BLE001 - torch missing: replay-only
        return USER_ERRORS


# =============================================================================== engine
class Lens:
    """The model side of the app: one runner, one lock, a cache of vanilla runs."""

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

    def config(self, preset: str, custom: dict | None = None) -> MustDropConfig:
        runner = self.load()
        if preset == "custom":
            if not custom:
                raise ValueError("preset 'custom' needs the knobs of the advanced panel")
            return runner.config_for("64").replace(preset="custom", **custom)
        if preset not in PRESET_NAMES:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return runner.config_for(preset)

    def analyze(self, image, question, config, max_new_tokens=16, sampling=None, progress=None):
        """(vanilla trace, MustDrop trace) for one input; vanilla cached per model/image/question/decoding."""
        from mustdrop.adapters import Sampling

        runner = self.load()
        sampling = sampling or Sampling()
        img = load_image(image)
        sha = hashlib.sha256(np.asarray(img).tobytes()).hexdigest()
        q = question.strip() if isinstance(question, str) else question
        key = (self.model_id, sha, q, int(max_new_tokens), float(sampling.temperature), float(sampling.top_p),
               int(sampling.seed))
        say = progress or (lambda frac, desc: None)
        with self._lock:
            vanilla = self._vanilla.get(key)
            if vanilla is not None:
                self._vanilla.move_to_end(key)
                self.vanilla_hits += 1
                say(0.5, "vanilla: cached")
            else:
                vanilla = _run_model(runner, img, q, runner.config_for("off"), max_new_tokens=max_new_tokens,
                                     sampling=sampling, progress=_stage_progress(say, "vanilla", 0.0)).trace
                self._vanilla[key] = vanilla
                while len(self._vanilla) > VANILLA_CACHE_SIZE:
                    self._vanilla.popitem(last=False)
            if not config.enabled:
                return vanilla, vanilla, img
            trace = _run_model(runner, img, q, config, max_new_tokens=max_new_tokens, sampling=sampling,
                               progress=_stage_progress(say, f"MustDrop {config.preset}", 0.5)).trace
        return vanilla, trace, img


def _stage_progress(say, run_name, start):
    from mustdrop.adapters.llava import RUN_STAGES

    order = list(RUN_STAGES)

    def cb(stage):
        say(start + 0.5 * order.index(stage) / len(order), f"{run_name}: {RUN_STAGES[stage]}")
    return cb


# =============================================================================== examples
@dataclass
class Example:
    name: str
    image: str
    questions: list = field(default_factory=list)
    masks: np.ndarray | None = None        # (k, G, G) patch coverage or (k, H, W) bool
    objects: list = field(default_factory=list)
    targets: dict = field(default_factory=dict)   # question -> ids of the objects it asks about


IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_QUESTION = "what is in the image ?"


def load_examples(folder: Path = EXAMPLES_DIR, cache_dir: Path | None = None) -> list[Example]:
    """Read the example scenes, tolerating the forms the listing may take (never raises).

    Accepted: JSON files holding a list of entries, {"examples"|"scenes"|"items": [...]}, or
    {name: entry}; each entry names an image ("image"/"file"/"path"/"image_path"), questions
    ("question" or "questions": strings or {"question"|"text"|"q": ...}) and optional masks
    ("masks"/"patch_masks"/"mask"/"npz"/"scene": an .npz with patch_masks / pixel_masks, a mask
    image, nested lists). Without JSON, every image in the folder is an example, with a same-stem
    .json (questions) and/or .npz (masks) beside it; .npz scenes without an image file give one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out: list[Example] = []
    seen: set = set()
    cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="mustdrop-examples-"))

    def add(entry, name_hint=""):
        try:
            ex = _example_from_entry(entry, folder, name_hint, cache_dir)
        except Exception as e:  # noqa: BLE001 - a bad entry is skipped, not fatal
            log.warning("skipping example %r: %s", name_hint or entry, e)
            return
        if ex is None:
            return
        if ex.image in seen:        # another question about an image already listed
            prev = next(e for e in out if e.image == ex.image)
            prev.questions += [q for q in ex.questions if q not in prev.questions and q != DEFAULT_QUESTION]
            prev.targets.update(ex.targets)
            if prev.masks is None:
                prev.masks = ex.masks
            return
        seen.add(ex.image)
        out.append(ex)

    jsons = sorted(folder.glob("*.json"))
    listing = [j for j in jsons if not any((folder / (j.stem + e)).exists() for e in IMAGE_EXT)]
    for j in listing:
        try:
            data = json.loads(j.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping example listing %s: %s", j.name, e)
            continue
        if isinstance(data, dict):
            for k in ("examples", "scenes", "items", "data"):
                if isinstance(data.get(k), (list, dict)):
                    data = data[k]
                    break
        if isinstance(data, list):
            for i, entry in enumerate(data):
                add(entry, "")
        elif isinstance(data, dict):
            if any(k in data for k in ("image", "file", "path", "image_path")):
                add(data, j.stem)
            else:
                for name, entry in data.items():
                    add(entry if isinstance(entry, dict) else {"image": entry}, name)
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_EXT and str(p.resolve()) not in seen and not p.stem.endswith("_mask"):
            entry = {"image": p.name}
            side = p.with_suffix(".json")
            if side.exists():
                try:
                    extra = json.loads(side.read_text())
                    if isinstance(extra, dict):
                        entry.update({k: v for k, v in extra.items() if k not in ("image",)})
                    elif isinstance(extra, list):
                        entry["questions"] = extra
                except (OSError, json.JSONDecodeError):
                    pass
            if p.with_suffix(".npz").exists() and "masks" not in entry:
                entry["masks"] = p.with_suffix(".npz").name
            add(entry, p.stem)
        elif p.suffix == ".npz" and not any(p.with_suffix(e).exists() for e in IMAGE_EXT) \
                and not any(str(p.resolve()) == s for s in seen):
            add({"npz": p.name}, p.stem)
    return out


def _example_from_entry(entry, folder, name_hint, cache_dir) -> Example | None:
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict):
        return None
    image = next((entry[k] for k in ("image", "file", "path", "image_path", "png") if isinstance(entry.get(k), str)), None)
    npz = None
    for k in ("npz", "scene", "masks", "patch_masks", "mask", "scene_file"):
        v = entry.get(k)
        if isinstance(v, str) and v.endswith(".npz"):
            npz = (folder / v) if not Path(v).is_absolute() else Path(v)
    data = None
    if npz is not None and npz.exists():
        with np.load(npz, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    if image is None and data is not None and "image" in data:
        from PIL import Image
        path = Path(cache_dir) / f"{npz.stem}.png"
        Image.fromarray(np.asarray(data["image"], np.uint8)).save(path)
        image = str(path)
    if image is None:
        return None
    path = Path(image) if Path(image).is_absolute() else folder / image
    if not path.is_file():
        return None
    questions = []
    qs = entry.get("questions", entry.get("question", []))
    if isinstance(qs, (str, dict)):
        qs = [qs]
    for q in qs or []:
        if isinstance(q, str):
            questions.append(q)
        elif isinstance(q, dict):
            t = next((q[k] for k in ("question", "text", "q", "prompt") if isinstance(q.get(k), str)), None)
            if t:
                questions.append(t)
    masks = None
    if data is not None:
        if "patch_masks" in data:
            masks = np.asarray(data["patch_masks"], np.float32)
        elif "pixel_masks" in data and "image" in data:
            h, w = data["image"].shape[:2]
            masks = np.unpackbits(data["pixel_masks"], axis=-1)[..., :w].astype(bool)
    else:
        for k in ("masks", "patch_masks", "mask"):
            v = entry.get(k)
            if isinstance(v, list) and v:
                a = np.asarray(v, np.float32)
                masks = a if a.ndim == 3 else (a[None] if a.ndim == 2 else None)
            elif isinstance(v, str) and Path(v).suffix.lower() in IMAGE_EXT and (folder / v).exists():
                from PIL import Image
                masks = (np.asarray(Image.open(folder / v).convert("L")) > 127)[None]
    objects = []
    meta_objs = entry.get("objects")
    if data is not None and "meta" in data:
        try:
            meta_objs = json.loads(str(data["meta"])).get("objects", meta_objs)
        except (ValueError, AttributeError):
            pass
    if isinstance(meta_objs, list):
        for o in meta_objs:
            if isinstance(o, dict):
                objects.append(" ".join(str(o[k]) for k in ("color", "shape") if k in o) or str(o.get("name", "")))
            elif isinstance(o, str):
                objects.append(o)
    if not questions:
        questions = [DEFAULT_QUESTION]
    name = str(entry.get("name") or entry.get("id") or name_hint or path.stem)
    targets = {}
    ids = entry.get("target_ids")
    if isinstance(ids, list) and all(isinstance(i, int) for i in ids):
        for q in questions:
            targets[_norm_q(q)] = tuple(ids)
    return Example(name, str(path.resolve()), questions, masks, objects, targets)


def _norm_q(q) -> str:
    return " ".join(str(q).split()).lower()


def image_sha(path_or_image) -> str | None:
    try:
        return hashlib.sha256(np.asarray(load_image(path_or_image)).tobytes()).hexdigest()
    except Exception:  # noqa: BLE001
        return None


def load_trace(path) -> Trace:
    """Trace.load, then the original-patch maps rebuilt from the token-level records, so a file whose
    patch.* maps are missing or disagree with its decisions cannot mislead (or crash) a view."""
    return Trace.load(path)


# =============================================================================== callbacks
def _payload_path(payload):
    """The file path of an un-preprocessed gr.Image / gr.File payload (dict or str)."""
    if payload is None:
        return None
    if isinstance(payload, str):
        return payload
    if isinstance(payload, dict):
        if payload.get("path"):
            return payload["path"]
        url = payload.get("url") or ""
        if url.startswith("data:"):
            import base64
            return base64.b64decode(url.split(",", 1)[1])
    if isinstance(payload, (list, tuple)):
        return [_payload_path(p) for p in payload]
    return getattr(payload, "path", payload)


def _num(v, name, kind=float):
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
    layers = parse_prune_layers(prune_layers)
    if filt and not layers:
        raise ValueError("stage 2 needs at least one prune layer: list them, or switch '2 filter' off")
    return dict(window=_num(window, "window", int), merge_threshold=_num(merge_threshold, "merge threshold"),
                key_keep_rate=_num(key_keep_rate, "key keep rate"), prune_layers=layers,
                global_thr=_num(global_thr, "global threshold"),
                individual_thr=_num(individual_thr, "individual threshold"),
                positions=str(positions), merge=bool(merge), key_set=bool(key_set), filter=bool(filt),
                kv_trim=bool(kv_trim))


def sampling_from(mode, temperature, top_p, seed):
    from mustdrop.adapters import Sampling

    if mode == "greedy":
        return Sampling(0.0, 1.0, _num(seed, "seed", int) if seed is not None else 0)
    t = _num(temperature, "temperature")
    if t <= 0:
        raise ValueError("sampling needs a temperature > 0 (choose greedy for temperature 0)")
    return Sampling(t, _num(top_p, "top p"), _num(seed, "seed", int))


def new_session(trace, vanilla, views=None, gt=None, files=None, note="") -> dict:
    """Per-browser-session view state: traces, the model view of each crop, GT masks, files, crop shown."""
    return {"trace": trace, "vanilla": vanilla, "views": views, "gt": gt, "files": files or [], "note": note,
            "crop": 0, "base": {}}


def VN(t):
    return t.n_crops


def crop_choices(trace):
    return [(trace.crop_name(c), c) for c in range(VN(trace))]


# =============================================================================== app
def build_app(lens: Lens, examples: list[Example] | None = None) -> gr.Blocks:
    examples = load_examples() if examples is None else examples
    gt_by_sha = {}
    for ex in examples:
        if ex.masks is not None:
            sha = image_sha(ex.image)
            if sha:
                gt_by_sha[sha] = ex
    workdir = Path(tempfile.mkdtemp(prefix="mustdrop-lens-"))

    def ground_truth(trace):
        """The example's object masks for this trace's image, the asked-about objects marked."""
        ex = gt_by_sha.get(trace.meta["input"]["image"]["sha256"])
        if ex is None:
            return None
        return vis.GroundTruth(ex.masks, ex.targets.get(_norm_q(trace.meta["input"]["question"]), ()))

    def canvas(sess):
        c = sess.get("crop", 0)
        bases = sess.setdefault("base", {})
        if c not in bases:      # once per session and crop: every redraw paints on this
            tr, views = sess["trace"], sess.get("views")
            bases[c] = vis.base_canvas(None, tr, vis.geometry(tr, CANVAS), view=views[c] if views else None, crop=c)
        return bases[c]

    def gt_for(sess, show):
        return sess.get("gt") if show and sess.get("crop", 0) == 0 else None

    # ------------------------------------------------------------------ drawing (no model)
    def draw_static(sess, selected, show_gt):
        tr, base, gt, c = sess["trace"], canvas(sess), gt_for(sess, show_gt), sess.get("crop", 0)
        kw = dict(base=base, selected=selected, gt_masks=gt, crop=c)
        return {
            img_merge: vis.merge_overlay(tr, **kw),
            img_sim: vis.heatmap_overlay(tr, "similarity", **kw),
            img_key: vis.key_overlay(tr, **kw),
            leg_1a: vis.legend_html("merge", tr, inspected=False) + vis.legend_html("similarity", tr, crop=c),
            leg_1b: vis.legend_html("key_score", tr, crop=c),
        }

    def draw_layer(sess, layer, selected, show_gt):
        t0 = time.perf_counter()
        tr, base, gt, c = sess["trace"], canvas(sess), gt_for(sess, show_gt), sess.get("crop", 0)
        kw = dict(base=base, selected=selected, gt_masks=gt, crop=c)
        L = tr.num_layers
        layer = int(min(max(int(layer or 0), 0), L - 1))
        prune = tr.prune_layers
        pl = tr.stage2_layer_for(layer)
        out = {img_kv: vis.kv_overlay(tr, layer, **kw), leg_3: vis.legend_html("kv", tr)}
        if pl is not None:
            out[img_filter] = vis.filter_overlay(tr, pl, **kw)
            out[img_gs] = vis.heatmap_overlay(tr, "global_share", layer=pl, **kw)
            out[img_im] = vis.heatmap_overlay(tr, "individual_max", layer=pl, **kw)
            out[leg_2] = (vis.legend_html("filter", tr, inspected=False)
                          + vis.legend_html("global_share", tr, pl, False, crop=c)
                          + vis.legend_html("individual_max", tr, pl, crop=c))
        else:
            blank = vis.paint(base, vis.geometry(tr, CANVAS), np.full((tr.grid, tr.grid, 3), vis.NAN_COLOUR, np.uint8), 0.2)
            out[img_filter] = out[img_gs] = out[img_im] = blank
            out[leg_2] = "<div>Stage 2 did not run in this trace (no prune layers / filter off).</div>"
        m = tr.meta
        bpe = m["kv"]["bytes_per_entry"]
        entries = m["kv"]["entries_per_layer"][layer]
        vis_entries = m["kv"]["vision_entries_per_layer"][layer]
        s2 = next((s for s in m["stage2"] if s["layer"] == layer), None)
        lines = [f"**LLM layer {layer}** of {L}: processes {m['vision_tokens_per_layer'][layer]} vision tokens in "
                 f"prefill; after the stage-3 trim its KV cache holds {entries} entries ({vis_entries} vision) = "
                 f"{vis.format_bytes(entries * bpe)}."]
        if s2:
            lines.append(f"Prune layer: {s2['entering']} vision tokens entered, {s2['kept']} kept, "
                         f"{s2['dropped']} dropped after this layer.")
        cov = vis.object_coverage(tr, gt, layer, c) if gt is not None else None
        if cov and cov["patches"]:
            lines.append(f"The object the question asks about covers {cov['patches']} patches: layer {layer} still "
                         f"processes {cov['processed']} of them in prefill and holds {cov['cached']} in its KV cache.")
        if pl is not None:
            lines.append(f"Stage-2 panels show prune layer **{pl}**" +
                         (" (the last prune layer at or before this layer)." if pl <= layer else
                          " (the first prune layer; nothing has been dropped yet at this layer)."))
        lines.append(f"<small>drawn from the trace in {1000 * (time.perf_counter() - t0):.0f} ms, no model call</small>")
        out[layer_md] = "\n\n".join(lines)
        return out

    def draw_views(sess, layer, selected, show_gt):
        out = draw_static(sess, selected, show_gt)
        out.update(draw_layer(sess, layer, selected, show_gt))
        if selected is not None:
            out[inspect_md] = vis.lifecycle_markdown(sess["trace"], *selected, crop=sess.get("crop", 0))
        return out

    def draw_all(sess, layer, selected, show_gt):
        tr, va = sess["trace"], sess["vanilla"]
        out = draw_views(sess, layer, selected, show_gt)
        d = vis.answer_diff(va, tr)
        out.update({
            plot_curve: vis.token_curve(tr, va), plot_kv: vis.kv_bytes_figure(tr, va),
            summary_md: vis.summary_markdown(tr, va),
            ans_vanilla: d["vanilla"], ans_md: d["mustdrop"], diff_md: d["text"], prob_md: d["table"],
            q_md: f"**Question:** {tr.meta['input']['question']}\n\n"
                  f"**Vanilla:** {va.answer if va is not None else '–'}  \n**MustDrop ({tr.meta['config'].get('preset')}):** {tr.answer}",
        })
        return out

    def warn(msg):
        gr.Warning(msg)
        return {status: f"**Problem:** {msg}"}

    def guarded(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except _user_errors() as e:
                return warn(str(e))
            except Exception as e:  # noqa: BLE001 - never a traceback in the UI; the log has it
                log.error("internal error in %s: %s", fn.__name__, traceback.format_exc())
                return warn(f"internal error ({type(e).__name__}): {str(e)[:300]}")
        return wrapper

    # ------------------------------------------------------------------ callbacks
    def on_run(image, question, preset, window, merge_thr, key_rate, prune, gthr, ithr, positions, m1a, m1b, m2, m3,
               max_new, mode, temperature, top_p, seed, show_gt, progress=gr.Progress()):
        img_src = _payload_path(image)
        if img_src is None:
            raise ImageInputError("no image given: upload, paste or choose an example image")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty: type a question about the image")
        custom = custom_knobs(window, merge_thr, key_rate, prune, gthr, ithr, positions, m1a, m1b, m2, m3) \
            if preset == "custom" else None
        max_new = _num(max_new, "max new tokens", int)
        sampling = sampling_from(mode, temperature, top_p, seed)
        img = load_image(img_src)
        config = lens.config(str(preset), custom)
        progress(0.0, desc="starting")
        vanilla, trace, img = lens.analyze(img, question, config, max_new, sampling,
                                           progress=lambda f, d: progress(f, desc=d))
        return finish_run(trace, vanilla, img, bool(show_gt))

    def prune_workdir(max_age_s=7200):
        """Drop this server's trace / slide folders older than two hours (a long-running Space)."""
        import shutil

        now = time.time()
        for d in workdir.iterdir():
            try:
                if now - d.stat().st_mtime > max_age_s:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass

    def finish_run(trace, vanilla, img, show_gt=True):
        prune_workdir()
        views = [vis.model_view(img, trace, crop=c) for c in range(VN(trace))]
        gt = ground_truth(trace)
        stem = f"{trace.meta['input']['input_hash']}-{int(time.time() * 1000) % 10**8}"
        folder = workdir / stem
        files = [str(trace.save(folder / f"mustdrop-{trace.meta['config'].get('preset')}.safetensors"))]
        if vanilla is not None and vanilla is not trace:
            files.append(str(vanilla.save(folder / "vanilla.safetensors")))
        sess = new_session(trace, vanilla, views, gt, files)
        L = trace.num_layers
        layer = trace.prune_layers[0] if trace.prune_layers else 0
        out = draw_all(sess, layer, None, show_gt)
        out.update({state: sess, sel_state: None, layer_slider: gr.Slider(minimum=0, maximum=L - 1, value=layer, step=1),
                    crop_in: gr.Dropdown(choices=crop_choices(trace), value=0, visible=VN(trace) > 1),
                    trace_files: files, status: f"**Done:** vanilla and MustDrop ({trace.meta['config'].get('preset')}) "
                                               f"on `{trace.meta['model']['id']}`" + ("" if gt is None else
                                                                                      " · ground-truth outlines available"),
                    inspect_md: "Click a patch on any overlay (or enter row / column) to see its lifecycle."})
        return out

    def on_layer(sess, layer, sel, show_gt):
        if not sess:
            return {}
        return draw_layer(sess, layer, tuple(sel) if sel else None, show_gt)

    def on_select(sess, layer, show_gt, evt: gr.SelectData):
        if not sess:
            return warn("run an analysis or upload a trace first")
        x, y = evt.index[0], evt.index[1]
        rc = vis.geometry(sess["trace"], CANVAS).patch_at(x, y)
        if rc is None:
            return {}
        return select_patch(sess, layer, rc, show_gt)

    def select_patch(sess, layer, rc, show_gt):
        out = draw_views(sess, layer, rc, show_gt)
        out.update({sel_state: list(rc), row_in: rc[0], col_in: rc[1]})
        return out

    def on_inspect(sess, layer, row, col, show_gt):
        if not sess:
            return warn("run an analysis or upload a trace first")
        rc = (_num(row, "row", int), _num(col, "column", int))
        vis.patch_lifecycle(sess["trace"], *rc, crop=sess.get("crop", 0))   # validates the range, clear message
        return select_patch(sess, layer, rc, show_gt)

    def on_redraw(sess, layer, sel, show_gt):
        if not sess:
            return {}
        return draw_all(sess, layer, tuple(sel) if sel else None, show_gt)

    def on_upload(files, image, show_gt=True):
        paths = _payload_path(files)
        if not paths:
            return {}
        if not isinstance(paths, list):
            paths = [paths]
        traces = []
        for p in paths:
            if isinstance(p, bytes):
                raise TraceError("upload a trace file (.safetensors)")
            traces.append(load_trace(p))
        if len(traces) > 2:
            raise TraceError("upload one MustDrop trace, optionally with its vanilla trace (two files at most)")
        is_vanilla = [not any(t.meta["config"].get(k) for k in ("merge", "key_set", "filter", "kv_trim")) for t in traces]
        if len(traces) == 2 and is_vanilla[0] == is_vanilla[1]:
            raise TraceError("two traces of the same kind: upload one MustDrop trace and one vanilla trace")
        md = next((t for t, v in zip(traces, is_vanilla) if not v), traces[0])
        va = next((t for t, v in zip(traces, is_vanilla) if v), None)
        if va is not None and (va.grid != md.grid or va.meta["input"].get("input_hash") != md.meta["input"].get("input_hash")):
            raise TraceError("the vanilla trace is of another image, question or model than the MustDrop trace")
        sha = md.meta["input"]["image"]["sha256"]
        views, note = None, "drawn on grey: the trace holds no pixels; put the same image in the image box to see it under the overlays"
        src = _payload_path(image)
        if src is not None:
            try:
                img = load_image(src)
                if hashlib.sha256(np.asarray(img).tobytes()).hexdigest() == sha:
                    views = [vis.model_view(img, md, crop=c) for c in range(VN(md))]
                    note = "drawn on the matching image from the image box"
            except ImageInputError:
                pass
        sess = new_session(md, va, views, ground_truth(md), [str(p) for p in paths], note)
        L = md.num_layers
        layer = md.prune_layers[0] if md.prune_layers else 0
        out = draw_all(sess, layer, None, bool(show_gt))
        out.update({state: sess, sel_state: None,
                    layer_slider: gr.Slider(minimum=0, maximum=L - 1, value=layer, step=1),
                    crop_in: gr.Dropdown(choices=crop_choices(md), value=0, visible=VN(md) > 1),
                    status: f"**Replaying** the trace of `{md.meta['model']['id']}` (preset {md.meta['config'].get('preset')}"
                            f"{', with vanilla' if va is not None else ', no vanilla trace'}) without the model; {note}"})
        return out

    def on_slides(sess, layer, show_gt):
        if not sess:
            return warn("run an analysis or upload a trace first")
        tr = sess["trace"]
        folder = workdir / f"slides-{tr.meta['input']['input_hash']}-{int(time.time() * 1000) % 10**8}"
        c = sess.get("crop", 0)
        views = sess.get("views")
        png, pdf = vis.save_slides(tr, folder, vanilla=sess["vanilla"], layer=int(layer or 0),
                                   gt_masks=gt_for(sess, show_gt), view=views[c] if views else None, crop=c)
        return {slides_files: [str(png), str(pdf)], slides_img: str(png), status: "**Done:** slides exported (PNG and PDF)"}

    def on_crop(sess, crop, layer, show_gt):
        if not sess:
            return {}
        c = int(crop or 0)
        if not 0 <= c < VN(sess["trace"]):
            raise ValueError(f"crop {c} is not in this trace")
        sess["crop"] = c
        out = draw_views(sess, layer, None, show_gt)
        out.update({state: sess, sel_state: None})
        return out

    def on_preset(preset):
        """Fill the advanced panel with a named preset's knobs (the model's own defaults)."""
        if preset == "custom" or lens.runner is None:
            return {}
        c = lens.runner.config_for(preset)
        return {k_window: c.window, k_merge_thr: c.merge_threshold, k_key_rate: c.key_keep_rate,
                k_prune: ", ".join(str(x) for x in c.prune_layers), k_gthr: c.global_thr, k_ithr: c.individual_thr,
                k_positions: c.positions, k_1a: c.merge, k_1b: c.key_set, k_2: c.filter, k_3: c.kv_trim}

    def api_analyze(image, question, preset):
        """/analyze: (image, question, preset) -> trace file, vanilla answer, MustDrop answer."""
        try:
            src = _payload_path(image)
            if src is None:
                raise ImageInputError("no image given")
            config = lens.config(str(preset))
            vanilla, trace, img = lens.analyze(src, question, config, 16)
        except _user_errors() as e:
            raise gr.Error(str(e)) from None
        folder = workdir / f"api-{trace.meta['input']['input_hash']}-{int(time.time() * 1000) % 10**8}"
        path = trace.save(folder / f"mustdrop-{trace.meta['config'].get('preset')}.safetensors")
        return str(path), vanilla.answer, trace.answer

    # ------------------------------------------------------------------ layout
    model_note = ("" if lens.load_error is None else
                  f"\n\n**The model could not be loaded:** {lens.load_error}\n\nTrace upload and replay still work.")
    with gr.Blocks(title="MustDrop Lens", delete_cache=(3600, 7200)) as demo:   # hourly: files older than 2 h
        state = gr.State(None, time_to_live=3 * 3600)      # traces + canvases of one visitor, freed after 3 h
        sel_state = gr.State(None, time_to_live=3 * 3600)
        gr.Markdown("# MustDrop Lens\nWhat multi-stage vision token dropping "
                    "([MustDrop](https://arxiv.org/abs/2411.10803)) does to every image patch inside a LLaVA model: "
                    "**1a** local spatial merge · **1b** key token set · **2** dual-attention filter · "
                    f"**3** output-aware KV trim. Model: `{lens.model_label}`." + model_note)
        status = gr.Markdown("Choose an example or upload an image, ask a question, press **Run**.", elem_id="status")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                image_in = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                    elem_id="image_in", height=300)
                question_in = gr.Textbox(label="Question", value="What color is the square?", max_lines=3,
                                         elem_id="question_in")
                preset_in = gr.Radio(PRESETS, value="64", label="Preset (average vision-token budget)",
                                     elem_id="preset_in")
                with gr.Accordion("Advanced: every MustDrop knob (used when the preset is 'custom')", open=False):
                    defaults = lens.runner.config_for("64") if lens.runner is not None else MustDropConfig()
                    with gr.Row():
                        k_window = gr.Number(defaults.window, label="window (w x w)", precision=0)
                        k_merge_thr = gr.Number(defaults.merge_threshold, label="merge threshold (cosine)")
                        k_key_rate = gr.Number(defaults.key_keep_rate, label="key keep rate")
                    k_prune = gr.Textbox(", ".join(str(x) for x in defaults.prune_layers), label="prune layers (0-indexed)")
                    with gr.Row():
                        k_gthr = gr.Number(defaults.global_thr, label="global threshold")
                        k_ithr = gr.Number(defaults.individual_thr, label="individual threshold")
                    k_positions = gr.Radio(["reference", "original"], value=defaults.positions, label="positions")
                    with gr.Row():
                        k_1a = gr.Checkbox(True, label="1a merge")
                        k_1b = gr.Checkbox(True, label="1b key set")
                        k_2 = gr.Checkbox(True, label="2 filter")
                        k_3 = gr.Checkbox(True, label="3 KV trim")
                with gr.Accordion("Decoding", open=False):
                    max_new_in = gr.Number(16, label="max new tokens", precision=0, minimum=1, maximum=1024)
                    mode_in = gr.Radio(["greedy", "sampling"], value="greedy", label="decoding")
                    with gr.Row():
                        temp_in = gr.Number(0.7, label="temperature")
                        top_p_in = gr.Number(0.9, label="top p")
                        seed_in = gr.Number(0, label="seed", precision=0)
                run_btn = gr.Button("Run vanilla + MustDrop", variant="primary", elem_id="run_btn")
                if examples:
                    rows = [[ex.image, q] for ex in examples for q in ex.questions[:2]]
                    gr.Examples(rows, inputs=[image_in, question_in], label="Scene-world examples",
                                examples_per_page=12, elem_id="examples")
                with gr.Accordion("Trace files and slides", open=True):
                    trace_files = gr.File(label="Download traces (.safetensors: JSON + arrays, one file per run)",
                                          file_count="multiple", interactive=False, elem_id="trace_files")
                    trace_upload = gr.File(label="Upload trace(s) to replay without a model (MustDrop, optional vanilla)",
                                           file_count="multiple", file_types=[".safetensors"], elem_id="trace_upload")
                    slides_btn = gr.Button("Export slides (PNG + PDF)", elem_id="slides_btn")
                    slides_files = gr.File(label="Slides", file_count="multiple", interactive=False, elem_id="slides_files")
                    slides_img = gr.Image(label="Slide preview", interactive=False, format="png", visible=True,
                                          elem_id="slides_img", height=200)
            with gr.Column(scale=2, min_width=520):
                q_md = gr.Markdown(elem_id="q_md")
                with gr.Row():
                    ans_vanilla = gr.HighlightedText(label="Vanilla answer", color_map={"differs": "#E69F00"},
                                                     show_inline_category=False, show_legend=False, elem_id="ans_vanilla")
                    ans_md = gr.HighlightedText(label="MustDrop answer", color_map={"differs": "#E69F00"},
                                                show_inline_category=False, show_legend=False, elem_id="ans_md")
                diff_md = gr.Markdown(elem_id="diff_md")
                with gr.Accordion("Each token's probability (under the run that chose it)", open=False):
                    prob_md = gr.Markdown()
                with gr.Row():
                    layer_slider = gr.Slider(0, 31, value=0, step=1, label="LLM layer", elem_id="layer_slider",
                                             scale=3)
                    crop_in = gr.Dropdown(choices=[("image", 0)], value=0, label="crop (LLaVA-NeXT: base image, tiles)",
                                          visible=False, elem_id="crop_in", scale=1)
                    show_gt = gr.Checkbox(True, label="ground-truth objects (scene-world examples; yellow = the one asked about)",
                                          elem_id="show_gt", scale=1)
                layer_md = gr.Markdown(elem_id="layer_md")
                img_kw = dict(format="png", interactive=False, height=CANVAS, buttons=["download", "fullscreen"])
                with gr.Tabs():
                    with gr.Tab("1a merge", elem_id="tab_1a"):
                        with gr.Row():
                            img_merge = gr.Image(label="1a: merge groups", elem_id="img_merge", **img_kw)
                            img_sim = gr.Image(label="1a: window similarity", elem_id="img_sim", **img_kw)
                        leg_1a = gr.HTML()
                    with gr.Tab("1b key set", elem_id="tab_1b"):
                        img_key = gr.Image(label="1b: CLS attention, key tokens outlined", elem_id="img_key", **img_kw)
                        leg_1b = gr.HTML()
                    with gr.Tab("2 filter", elem_id="tab_2"):
                        img_filter = gr.Image(label="2: kept vs dropped (and why)", elem_id="img_filter", **img_kw)
                        with gr.Row():
                            img_gs = gr.Image(label="2: global share", elem_id="img_gs", **img_kw)
                            img_im = gr.Image(label="2: individual max", elem_id="img_im", **img_kw)
                        leg_2 = gr.HTML()
                    with gr.Tab("3 KV cache", elem_id="tab_3"):
                        img_kv = gr.Image(label="3: patches in this layer's KV cache", elem_id="img_kv", **img_kw)
                        leg_3 = gr.HTML()
                        plot_kv = gr.Plot(label="KV bytes per layer")
                    with gr.Tab("Counts and cost", elem_id="tab_counts"):
                        plot_curve = gr.Plot(label="Vision tokens per LLM layer", elem_id="plot_curve")
                        summary_md = gr.Markdown(elem_id="summary_md")
                with gr.Group():
                    gr.Markdown("### Patch inspector — click a patch on any overlay, or give row / column")
                    with gr.Row():
                        row_in = gr.Number(0, label="row", precision=0, elem_id="row_in")
                        col_in = gr.Number(0, label="column", precision=0, elem_id="col_in")
                        inspect_btn = gr.Button("Inspect", elem_id="inspect_btn")
                    inspect_md = gr.Markdown(elem_id="inspect_md")
        # hidden components of the /analyze API endpoint
        api_trace = gr.File(visible="hidden", label="trace")
        api_vanilla = gr.Textbox(visible="hidden", label="vanilla answer")
        api_md = gr.Textbox(visible="hidden", label="MustDrop answer")
        api_btn = gr.Button(visible="hidden")

        views = [img_merge, img_sim, img_key, img_filter, img_gs, img_im, img_kv, leg_1a, leg_1b, leg_2, leg_3,
                 layer_md, plot_curve, plot_kv, summary_md, ans_vanilla, ans_md, diff_md, prob_md, q_md, inspect_md]
        layer_views = [img_filter, img_gs, img_im, img_kv, leg_2, leg_3, layer_md]
        knobs = [k_window, k_merge_thr, k_key_rate, k_prune, k_gthr, k_ithr, k_positions, k_1a, k_1b, k_2, k_3]
        run_inputs = [image_in, question_in, preset_in] + knobs + [max_new_in, mode_in, temp_in, top_p_in, seed_in, show_gt]
        run_btn.click(guarded(on_run), run_inputs,
                      views + [state, sel_state, layer_slider, crop_in, trace_files, status],
                      api_name="run", api_visibility="undocumented", preprocess=False, concurrency_limit=1,
                      concurrency_id="model")
        layer_slider.change(guarded(on_layer), [state, layer_slider, sel_state, show_gt], layer_views + [status],
                            api_name="layer", api_visibility="undocumented", trigger_mode="always_last",
                            queue=False, show_progress="hidden")
        show_gt.change(guarded(on_redraw), [state, layer_slider, sel_state, show_gt], views + [status],
                       api_visibility="undocumented", queue=False, show_progress="hidden")
        for im in (img_merge, img_sim, img_key, img_filter, img_gs, img_im, img_kv):
            im.select(guarded(on_select), [state, layer_slider, show_gt],
                      views + [sel_state, row_in, col_in, status], api_visibility="undocumented",
                      queue=False, show_progress="hidden")
        inspect_btn.click(guarded(on_inspect), [state, layer_slider, row_in, col_in, show_gt],
                          views + [sel_state, row_in, col_in, status], api_visibility="undocumented",
                          queue=False)
        trace_upload.upload(guarded(on_upload), [trace_upload, image_in, show_gt],
                            views + [state, sel_state, layer_slider, crop_in, status], api_name="replay",
                            api_visibility="undocumented", preprocess=False, queue=False)
        slides_btn.click(guarded(on_slides), [state, layer_slider, show_gt], [slides_files, slides_img, status],
                         api_visibility="undocumented", concurrency_limit=2)
        crop_in.input(guarded(on_crop), [state, crop_in, layer_slider, show_gt], views + [state, sel_state, status],
                      api_visibility="undocumented", queue=False, show_progress="hidden")
        preset_in.change(guarded(on_preset), [preset_in], knobs + [status], api_visibility="undocumented",
                         queue=False, show_progress="hidden")
        api_btn.click(api_analyze, [image_in, question_in, preset_in], [api_trace, api_vanilla, api_md],
                      api_name="analyze", api_description="Run vanilla and MustDrop on (image, question, preset "
                      "off|192|128|64); returns the MustDrop trace file and both answers.", preprocess=False,
                      concurrency_limit=1, concurrency_id="model")
    demo.lens = lens
    demo.workdir = workdir
    return demo


def launch(demo: gr.Blocks, host="127.0.0.1", port=7860, **kw):
    demo.queue(default_concurrency_limit=1, max_size=64)
    kw.setdefault("state_session_capacity", 500)     # at most 500 visitors' view states (a few MB each) kept
    return demo.launch(server_name=host, server_port=port, share=False, max_file_size=MAX_FILE_SIZE,
                       show_error=False, footer_links=["api"],
                       allowed_paths=[str(EXAMPLES_DIR)] + list(kw.pop("allowed_paths", [])), **kw)


def main(argv=None):
    ap = argparse.ArgumentParser(description="MustDrop Lens: see what MustDrop does to every image patch.")
    env = os.environ
    ap.add_argument("--model", default=env.get("MUSTDROP_MODEL", DEFAULT_MODEL),
                    help="LLaVA checkpoint: a local folder or a hub id (default: $MUSTDROP_MODEL, else the shipped "
                         "toy model assets/toy-llava)")
    ap.add_argument("--device", default=env.get("MUSTDROP_DEVICE"), help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ap.add_argument("--dtype", default=env.get("MUSTDROP_DTYPE"), help="float32, float16 or bfloat16 (default: per device)")
    ap.add_argument("--host", default=env.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                    help="address to bind (default 127.0.0.1; a HuggingFace Space sets GRADIO_SERVER_NAME)")
    ap.add_argument("--port", type=int, default=int(env.get("GRADIO_SERVER_PORT", 7860)))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    lens = Lens(args.model, args.device, args.dtype)
    try:
        lens.load()
    except _user_errors() as e:
        log.warning("model not loaded (%s); the app still replays uploaded traces", e)
    demo = build_app(lens)
    launch(demo, args.host, args.port)


if __name__ == "__main__":
    main()
