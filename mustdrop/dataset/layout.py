"""The run folder: the one layout analysis.batch, analysis.sweep compare and the lmms-eval model write.

    RUN/
      run.json                     settings (schema "mustdrop-run/1"):
                                     producer   "analysis.batch" | "analysis.sweep" | "lmms-eval"
                                     model      model id or folder
                                     configs    [{"name": "64", "method": "mustdrop"}, {"name": "fastv@64", ...}]
                                                (name: the config spec the rows and trace folders use)
                                     vanilla    the config name of the unpruned run ("off"), or null
                                     dataset    what the samples are (e.g. {"kind": "scene", "split": "test",
                                                "n": 200, "seed": 0}, or a folder / task description)
                                     table      the table's JSONL file(s) in RUN (names, or one glob such as
                                                "samples.rank*.jsonl")
                                     created    UTC date and time; versions {mustdrop-lens, torch,
                                                transformers, python}
      summary.jsonl (or table)     one row per (sample, config), JSON lines (pandas.read_json(lines=True)):
                                     id, config, method, status ("ok" | "failed"), question, qtype,
                                     answer (reference, null if none), prediction, correct (1 / 0 / null),
                                     agrees_vanilla, eq_tokens_authors, eq_tokens_compute,
                                     flops_ratio_image, flops_ratio_full, kv_bytes, kv_ratio,
                                     trace (path relative to RUN), image (see below)
                                   optional, where the dataset locates the asked objects (read by
                                   mustdrop.dataset.objects for the recall and the failure attribution;
                                   a sample's first row that gives them counts; else the scene world's):
                                     object_boxes  [[x0, y0, x1, y1], ...] in the original image's pixels
                                                   (finite numbers, x0 < x1, y0 < y1; clipped to the
                                                   image; at most 256 boxes)
                                     object_mask   path relative to RUN of a PNG of the original image's
                                                   size, nonzero where the asked objects are
                                   (both given: their union; an unusable value: no mask for the sample,
                                   named in TraceSet.problems)
      traces/<config>/<id>.safetensors   one Trace per (sample, config)
      images/<id>.png              stored copies of the images that cannot be regenerated

    image column: {"kind": "scene", "split": "test", "index": 12}  the scene world regenerates it
                  {"kind": "stored", "path": "images/x.png"}     a copy inside RUN
                  {"kind": "path", "path": "..."}                 a file (opened only inside RUN)
                  null                                            unknown: views draw on the trace alone

Folders written before this layout still open as they are (mustdrop.dataset.traceset reads them):
an analysis.batch folder (summary.jsonl + traces/, no run.json; scene-world ids "test-0000012" give
the image) and an lmms-eval output folder (OUTPUT/mustdrop/ with samples.rank*.jsonl).
"""

from __future__ import annotations

import json
import platform
import re
from datetime import datetime, timezone
from pathlib import Path

from ..jsonfile import write_json_atomic

RUN_SCHEMA = "mustdrop-run/1"
SETTINGS = "run.json"
TABLE = "summary.jsonl"
IMAGES = "images"
SCENE_ID = re.compile(r"(train|val|test)-(\d{7})")


def versions() -> dict:
    """Versions of the packages a run's numbers depend on (those that are installed)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("mustdrop-lens", "torch", "transformers", "safetensors", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def settings(producer: str, model: str, configs: list[dict], dataset: dict, table: str | list[str] = TABLE,
             vanilla: str | None = "off") -> dict:
    """The run.json document (see the module doc)."""
    return {"schema": RUN_SCHEMA, "producer": producer, "model": str(model), "configs": configs,
            "vanilla": vanilla, "dataset": dataset, "table": table,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "versions": versions()}


def write_settings(out, doc: dict) -> Path:
    """Write run.json atomically; an existing one (a resumed run, another shard) is kept unless it
    lists fewer configs than this run adds."""
    out = Path(out)
    path = out / SETTINGS
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            have = {c.get("name") for c in old.get("configs", []) if isinstance(c, dict)}
            if {c["name"] for c in doc["configs"]} <= have:
                return path
            doc = dict(doc, configs=old.get("configs", []) + [c for c in doc["configs"] if c["name"] not in have])
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    return write_json_atomic(path, doc)


def scene_ref(split: str, index: int) -> dict:
    return {"kind": "scene", "split": str(split), "index": int(index)}


def store_image(out, sample_id: str, image) -> dict:
    """Keep a PNG copy of a sample's image inside the run (written once) and return its reference.
    ``image``: anything mustdrop.images.load_image takes, or a callable returning it (called only
    when the copy does not exist yet)."""
    from ..images import load_image

    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(sample_id))[:120] or "image"
    rel = f"{IMAGES}/{name}.png"
    path = Path(out) / rel
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        load_image(image() if callable(image) else image).save(path)
    return {"kind": "stored", "path": rel}


def item_image_ref(item, out, write: bool = True) -> str | None:
    """The image column of an analysis item, as a JSON string (CSV-friendly): the scene world's
    split and index, else a stored copy (None when nothing may be written)."""
    if getattr(item, "split", None) is not None and getattr(item, "index", None) is not None:
        return json.dumps(scene_ref(item.split, item.index))
    return json.dumps(store_image(out, item.id, item.load_image)) if write else None


def image_ref_of_id(sample_id: str) -> dict | None:
    """A scene-world sample id ("test-0000012", as analysis.batch names them) -> its scene reference."""
    m = SCENE_ID.fullmatch(str(sample_id))
    return scene_ref(m.group(1), int(m.group(2))) if m else None
