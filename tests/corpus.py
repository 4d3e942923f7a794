"""The bad-input corpus: files and values a public demo or a long batch run meets.

Each entry builds its input inside a folder given by the test and names the words the error
message must contain. Used by the library, CLI and app tests alike.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_header_only(path: Path, w: int, h: int):
    """A PNG whose header claims w x h pixels, with almost no data (a decompression-bomb probe)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
                     + chunk(b"IEND", b""))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _bomb(path: Path) -> Path:
    _png_header_only(path, 12000, 12000)
    return path


def _save(img: Image.Image, path: Path, **kw):
    img.save(path, **kw)
    return path


def _scene(w=336, h=336, seed=0):
    rng = np.random.default_rng(seed)
    a = np.full((h, w, 3), 200, np.uint8)
    a[: h // 2, : w // 2] = rng.integers(0, 255, (h // 2, w // 2, 3))
    return Image.fromarray(a)


# name -> (builder(folder) -> path, words the message must contain)
BAD_IMAGES = {
    "text_renamed_png": (lambda d: _write(d / "a.png", b"just text, renamed to .png"), ["not an image"]),
    "zero_bytes": (lambda d: _write(d / "z.png", b""), ["empty"]),
    "truncated_png": (lambda d: _truncate(_save(_scene(), d / "t.png"), 0.5), ["truncated"]),
    "truncated_jpeg": (lambda d: _truncate(_save(_scene(), d / "t.jpg", quality=90), 0.4), ["truncated"]),
    "one_by_one": (lambda d: _save(Image.new("RGB", (1, 1)), d / "1.png"), ["1 x 1", "at least"]),
    "bomb_12000": (lambda d: _bomb(d / "bomb.png"), ["too large"]),
    # issue 24 (images): a few hundred bytes that the processor's shortest-edge resize makes gigabytes of
    "thin_2x100000": (lambda d: thin_strip(d / "thin-2x100000.png", 2, 100000), ["aspect ratio", "20:1"]),
    "thin_2x3000": (lambda d: thin_strip(d / "thin-2x3000.png", 2, 3000), ["aspect ratio", "20:1"]),
    # 308:1; CLIP-336 would make it 336 x 103,384 pixels (35 M, 417 MB as float32) and crop the middle 1/308
    "thin_13x4000": (lambda d: _save(_scene(13, 4000), d / "thin.png"), ["aspect ratio"]),
}
GOOD_ODD_IMAGES = {   # must be accepted (converted), not refused
    "rgba": lambda d: _save(Image.new("RGBA", (200, 120), (255, 0, 0, 100)), d / "rgba.png"),
    "grayscale": lambda d: _save(_scene().convert("L"), d / "l.png"),
    "palette": lambda d: _save(_scene().convert("P"), d / "p.png"),
    "cmyk": lambda d: _save(_scene().convert("CMYK"), d / "c.jpg"),
    "sixteen_bit": lambda d: _save(Image.fromarray((np.arange(300 * 200).reshape(200, 300) % 65535)
                                                   .astype(np.uint16)), d / "16.png"),
    "panorama_20to1": lambda d: _save(_scene(2000, 100), d / "pano.png"),     # the aspect limit itself
    "animated_gif": lambda d: _gif(d / "anim.gif"),
    "exif_rotated": lambda d: exif_rotated(d / "rot.jpg"),
}


def thin_strip(path: Path, w: int, h: int) -> Path:
    """A real (decodable) w x h PNG: flat grey, so it compresses to a few hundred bytes."""
    Image.new("RGB", (w, h), (128, 128, 128)).save(path)
    return path


def _truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _gif(path: Path) -> Path:
    frames = [Image.new("P", (120, 80), i * 40) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def exif_rotated(path: Path) -> Path:
    """A 200 x 100 landscape JPEG stored sideways with EXIF orientation 6 (rotate 90 CW to view).

    Viewed upright it is 100 wide x 200 tall with a red band along its TOP edge."""
    upright = np.full((200, 100, 3), 220, np.uint8)
    upright[:30] = (255, 0, 0)
    stored = Image.fromarray(np.rot90(upright, k=1))          # rotated 90 CCW as a camera stores it
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif.tobytes(), quality=95)
    return path


BAD_QUESTIONS = {
    "empty": ("", ["empty"]),
    "whitespace": ("   \n\t ", ["empty"]),
    "very_long": ("why " * 1250, ["characters", "limit"]),
    "image_token": ("what is <image> in this", ["image placeholder"]),
    # issue 24 (questions): what an API payload or a command line can hand over
    "list": (["what", "colour"], ["must be text"]),
    "dict": ({"q": "what colour"}, ["must be text"]),
    "lone_surrogate": ("what \udcff colour", ["not valid UTF-8"]),     # invalid UTF-8 in argv arrives so
}

# issue 24 (decoding): Sampling(**kw) -> words. Each one crashed a run or was recorded wrong before.
BAD_SAMPLING = {
    "temperature_1e-300": ({"temperature": 1e-300, "top_p": 1.0}, ["temperature"]),
    "temperature_bool": ({"temperature": True}, ["temperature"]),
    "top_p_1e-300": ({"temperature": 1.0, "top_p": 1e-300}, ["top p"]),
    "seed_10^30": ({"temperature": 1.0, "seed": 10 ** 30}, ["seed"]),
    "seed_2^53+1": ({"temperature": 1.0, "seed": 2 ** 53 + 1}, ["seed", "9007199254740993"]),
    "seed_negative": ({"seed": -1}, ["seed"]),
    "seed_float": ({"seed": 1.5}, ["seed"]),
}

BAD_KNOBS = {   # MustDropConfig.replace(**kw) -> words
    "global_nan": ({"global_thr": float("nan")}, ["global threshold"]),
    "global_inf": ({"global_thr": float("inf")}, ["global threshold"]),
    "individual_negative": ({"individual_thr": -0.5}, ["individual threshold"]),
    "individual_above_one": ({"individual_thr": 1.5}, ["individual threshold"]),
    "key_rate_above_one": ({"key_keep_rate": 2.0}, ["key keep rate"]),
    "window_zero": ({"window": 0}, ["window"]),
    "window_larger_than_grid": ({"window": 48}, ["larger than"]),
    "window_not_dividing": ({"window": 5}, ["does not divide"]),
    "prune_out_of_order": ({"prune_layers": (3, 1)}, ["ascending"]),
    "prune_duplicated": ({"prune_layers": (1, 1, 2)}, ["ascending"]),
    "prune_beyond_depth": ({"prune_layers": (1, 99)}, ["prune layer 99"]),
}

BAD_MAX_NEW_TOKENS = {"zero": 0, "huge": 100000}


def bad_trace_files(folder: Path, good) -> dict:
    """name -> (path, words): hostile or broken trace files, made from a good Trace."""
    from safetensors.numpy import save_file

    def write(name, meta, arrays):
        p = folder / f"{name}.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(p),
                  metadata={"mustdrop_trace": meta if isinstance(meta, str) else json.dumps(meta)})
        return p

    meta = json.loads(json.dumps(good.meta))
    out = {}
    out["malformed_json"] = (write("malformed", "{not json", good.arrays), ["malformed JSON"])
    m = json.loads(json.dumps(meta)); m["schema"] = "mustdrop-trace/0"
    out["unknown_schema"] = (write("schema", m, good.arrays), ["unknown trace schema"])
    m = json.loads(json.dumps(meta)); m["stage1b"]["key_tokens"] = [99999]
    out["index_out_of_range"] = (write("range", m, good.arrays), ["outside"])
    arrays = dict(good.arrays); layer = good.prune_layers[0]
    arrays[f"stage2.L{layer}.global_share"] = np.zeros(3, np.float32)
    out["mismatched_shapes"] = (write("shapes", meta, arrays), ["global_share"])
    m = json.loads(json.dumps(meta)); m["model"]["id"] = "../../../../etc/passwd"
    m["input"]["question"] = "../../x"
    out["path_traversal_names"] = (write("traversal", m, good.arrays), None)   # loads; names are never paths
    huge = folder / "huge.safetensors"
    with open(huge, "wb") as f:
        f.truncate(70 * 1024 * 1024)
    out["huge"] = (huge, ["limited"])
    junk = folder / "junk.safetensors"
    junk.write_bytes(b"PK\x03\x04 pickle? no")
    out["not_safetensors"] = (junk, ["not a MustDrop trace"])
    return out


# ---- hostile traces (issue 24): sizes a real model cannot produce, fields of the wrong type ----
def _rewrite(folder: Path, name: str, meta, arrays) -> Path:
    """A trace file of ``meta`` (a dict, or a raw header string) and ``arrays``, written as is."""
    from safetensors.numpy import save_file

    p = folder / f"{name}.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(p),
              metadata={"mustdrop_trace": meta if isinstance(meta, str) else json.dumps(meta)})
    return p


def _claims(good, **seq) -> tuple[dict, dict]:
    """A copy of a good trace's token-level records (no patch maps: the reader rebuilds those)."""
    meta = json.loads(json.dumps(good.meta))
    meta["sequence"].update(seq)
    return meta, {k: v for k, v in good.arrays.items() if not k.startswith("patch.")}


def _grid_bomb(good, side):
    meta, arrays = _claims(good)
    meta["model"]["vision"]["grid"] = side
    meta["sequence"]["N"] = side * side * len(meta["crops"])
    return meta, {k: v for k, v in arrays.items() if not k.startswith("stage1a.")}   # optional maps


def _crops_bomb(good, n):
    meta, arrays = _claims(good)
    meta["crops"] = [dict(meta["crops"][0], name=f"tile {i}") for i in range(n)]
    meta["sequence"]["N"] = n * good.grid ** 2
    return meta, arrays


def _layers_bomb(good, depth):
    meta, arrays = _claims(good)
    L = good.num_layers
    meta["model"]["llm"]["num_layers"] = depth
    for key in ("vision_tokens_per_layer",):
        meta[key] = meta[key] + [meta[key][-1]] * (depth - L)
    for key in ("entries_per_layer", "vision_entries_per_layer"):
        meta["kv"][key] = meta["kv"][key] + [0] * (depth - L)
    arrays.update({f"kv.L{i}": np.zeros(0, np.int64) for i in range(L, depth)})
    return meta, arrays


def _edit(good, fn):
    meta, arrays = _claims(good)
    fn(meta, arrays)
    return meta, arrays


def _set(path: str, value):
    """An edit that puts ``value`` at the dotted meta path (stage2.0.kept: list index 0)."""
    def fn(meta, arrays):
        *head, last = path.split(".")
        node = meta
        for k in head:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[int(last) if isinstance(node, list) else last] = value
    return fn


def _arrays(**changes):
    """An edit that replaces arrays: name (with '_' for '.') -> function of the good array."""
    def fn(meta, arrays):
        for key, f in changes.items():
            name = key.replace("__", ".")
            arrays[name] = f(arrays[name])
    return fn


# The small-trace bombs: a few KB claiming sizes no supported model produces. Replayed without
# bounds they cost gigabytes (grid 1024: ~4 GB, 33 s); each must be refused before allocating.
TRACE_BOMBS = {   # name -> (build(good) -> (meta, arrays), words)
    "grid_512": (lambda g: _grid_bomb(g, 512), ["grid"]),
    "grid_1024": (lambda g: _grid_bomb(g, 1024), ["grid"]),
    "crops_400": (lambda g: _crops_bomb(g, 400), ["crops"]),
    "layers_1024": (lambda g: _layers_bomb(g, 1024), ["num_layers"]),
}

# Fields of the wrong type or shape: each gets one message naming the field.
TRACE_WRONG_TYPES = {
    "stage2_as_string": (lambda g: _edit(g, _set("stage2", "L0 L1 L2")), ["stage2"]),
    "token_ids_of_strings": (lambda g: _edit(g, _set("generation.token_ids", ["117", "117"])),
                             ["generation.token_ids"]),
    "tokens_of_numbers": (lambda g: _edit(g, lambda m, a: m["generation"].update(
        tokens=list(range(len(m["generation"]["tokens"]))))), ["generation.tokens"]),
    "timings_as_text": (lambda g: _edit(g, _set("timings.prefill_s", "1.8 s")), ["timings.prefill_s"]),
    "kv_entries_as_text": (lambda g: _edit(g, lambda m, a: m["kv"].update(
        entries_per_layer=[str(x) for x in m["kv"]["entries_per_layer"]])), ["kv.entries_per_layer"]),
    "grid_as_text": (lambda g: _edit(g, _set("model.vision.grid", "24")), ["model.vision.grid"]),
    "question_as_list": (lambda g: _edit(g, _set("input.question", ["what?"])), ["input.question"]),
    "mapping_scale_text": (lambda g: _edit(g, lambda m, a: [c["mapping"].update(scale="big") for c in m["crops"]]),
                           ["mapping.scale"]),
    "stage2_kept_as_text": (lambda g: _edit(g, _set("stage2.0.kept", "31")), ["stage2[0].kept"]),
    "empty_scores_full_status": (lambda g: _edit(g, _arrays(stage2__L0__global_share=lambda v: v[:0])),
                                 ["stage2.L0.global_share"]),
    "scores_as_int64": (lambda g: _edit(g, _arrays(stage2__L1__individual_max=lambda v: v.astype(np.int64))),
                        ["stage2.L1.individual_max"]),
    "status_code_99": (lambda g: _edit(g, _arrays(stage2__L0__status=lambda v: np.full_like(v, 99))),
                       ["stage2.L0.status"]),
    "groups_as_float": (lambda g: _edit(g, _arrays(tokens__groups=lambda v: v.astype(np.float32))),
                        ["tokens.groups"]),
    "similarity_wrong_shape": (lambda g: _edit(g, _arrays(stage1a__similarity=lambda v: v[:3])),
                               ["stage1a.similarity"]),
    "config_without_positions": (lambda g: _edit(g, lambda m, a: m["config"].pop("positions")), ["config.positions"]),
    "nan_timing": (lambda g: _edit(g, _set("timings.total_s", float("nan"))), ["timings.total_s"]),
    "meta_is_a_list": (lambda g: ([1, 2, 3], _claims(g)[1]), ["JSON object"]),
    "nested_100000_deep": (lambda g: ("[" * 100000 + "]" * 100000, _claims(g)[1]), ["nested"]),
    "metadata_10_mb": (lambda g: (json.dumps(dict(g.meta, pad="x" * 10_000_000)), _claims(g)[1]), ["metadata"]),
}


def hostile_trace_files(folder: Path, good) -> dict:
    """name -> (path, words): the TRACE_BOMBS and TRACE_WRONG_TYPES written from a good Trace."""
    return {name: (_rewrite(folder, name, *build(good)), words)
            for name, (build, words) in {**TRACE_BOMBS, **TRACE_WRONG_TYPES}.items()}


def markdown_table() -> str:
    """Run every corpus entry through the library and list what each gets (for the README)."""
    import tempfile

    from mustdrop.adapters import LlavaMustDrop, ModelLoadError, load_llava
    from mustdrop.images import load_image
    from mustdrop.testing import build_tiny_llava
    from mustdrop.trace import Trace

    rows = []

    def attempt(kind, name, fn):
        try:
            fn()
            rows.append((kind, name, "accepted"))
        except Exception as e:  # noqa: BLE001 - the table shows whatever message a user would see
            rows.append((kind, name, f"{type(e).__name__}: {e}"))

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, (build, _) in BAD_IMAGES.items():
            attempt("image", name, lambda b=build: load_image(b(d)))
        for name, build in GOOD_ODD_IMAGES.items():
            attempt("image", name, lambda b=build: load_image(b(d)))
        folder = build_tiny_llava(d / "tiny")
        model, proc = load_llava(str(folder))
        runner = LlavaMustDrop(model, proc, str(folder))
        img = _scene()
        for name, (q, _) in BAD_QUESTIONS.items():
            attempt("question", name, lambda q=q: runner.run(img, q, runner.config_for("64"), max_new_tokens=1))
        for name, (kw, _) in BAD_KNOBS.items():
            attempt("knob", name, lambda kw=kw: runner.run(img, "q?", runner.config_for("64").replace(**kw),
                                                            max_new_tokens=1))
        from mustdrop.adapters import Sampling
        for name, (kw, _) in BAD_SAMPLING.items():
            attempt("decoding", name, lambda kw=kw: runner.run(img, "q?", runner.config_for("64"), 1, Sampling(**kw)))
        for name, n in BAD_MAX_NEW_TOKENS.items():
            attempt("max new tokens", name, lambda n=n: runner.run(img, "q?", runner.config_for("64"), n))
        attempt("model", "unknown hub id offline", lambda: load_llava("llava-hf/no-such-model"))
        (d / "empty").mkdir()
        attempt("model", "folder without config.json", lambda: load_llava(str(d / "empty")))
        good = runner.run(img, "what colour is the square?", runner.config_for("64"), max_new_tokens=1).trace
        (d / "traces").mkdir()
        for name, (path, _) in bad_trace_files(d / "traces", good).items():
            attempt("trace", name, lambda p=path: Trace.load(p))
        for name, (path, _) in hostile_trace_files(d / "traces", good).items():
            attempt("trace", name, lambda p=path: Trace.load(p))
    lines = ["| input | case | what it gets |", "|---|---|---|"]
    lines += [f"| {k} | {n} | {m.replace('|', '/')} |" for k, n, m in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    import os
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(markdown_table())
