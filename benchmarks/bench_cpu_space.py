"""CPU-Space benchmark (issue 27): one app click at the real shapes of the CPU-Space checkpoints.

    python benchmarks/bench_cpu_space.py [--models interleave qwen2vl onevision] [--dtypes float32 bfloat16]
                                         [--clicks 2] [--threads 2] [--tiny]

For each checkpoint recommended for a free CPU Space (llava-interleave-qwen-0.5b, Qwen2-VL-2B,
llava-onevision-qwen2-0.5b) and each dtype, the model is built from its published config.json as is
(tests/published/<name>: real widths, depths and vocabulary) with seeded random weights
(``_from_config`` then run; nothing is saved or loaded, which only leaves out the load time). The
processor and tokenizer come from ``mustdrop.testing.build_published_tiny_any`` (published image
processor, chat template, special-token ids and vocabulary size; its shrunk model is thrown away),
loaded back with ``mustdrop.adapters.processors.load_processor`` (torchvision-free). Random weights
are fine for timing: the work per token does not depend on the values, and the MustDrop token counts
come from the run itself (with random weights stage 2 drops what its thresholds say of random
scores, so the drop counts are those of this run, not of the trained model).

One click is what the app does: the vanilla run (preset "off") and the MustDrop run (preset "64",
the defaults shipped for the hub id where there are any), each through ``make_runner(...).run`` with
16 new tokens on one 640 x 480 photo-like image and the question "What is in the image?". Printed
per click and run: the seconds of vision / prefill / decode from ``trace.meta['timings']``, the
tokens generated (random weights rarely hit the end token, so all 16 are decoded), MustDrop's prefill
speed-up (vanilla prefill / MustDrop prefill) and the analytic one (1 / ``flops.ratio_full_sequence``
of ``mustdrop.accounting.summarize`` on the MustDrop trace). Click 1 is the first click after the
model is built (cold: first-call allocations and kernel choices); later clicks are warm. For
bfloat16 the answer is compared with float32's on the same seeded weights.

``--tiny`` swaps the real shapes for the shrunk copies (a quick check of the script, not a
measurement).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {  # short name -> (published folder, the hub id the app would be given)
    "interleave": ("llava-interleave-qwen-0.5b-hf", "llava-hf/llava-interleave-qwen-0.5b-hf"),
    "qwen2vl": ("Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-2B-Instruct"),
    "onevision": ("llava-onevision-qwen2-0.5b-ov-hf", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"),
}
QUESTION = "What is in the image?"
NEW_TOKENS = 16


def photo_like(width=640, height=480, seed=0):
    """A 640 x 480 image with photo-like structure: smooth sky/ground gradients, a few solid shapes and
    mild sensor noise (the token counts depend only on the size; the content only moves MustDrop's
    random-weight drops)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    sky = y < height * 0.55
    img[..., 0] = np.where(sky, 110 + 60 * y / height, 70 + 50 * x / width)
    img[..., 1] = np.where(sky, 160 + 50 * y / height, 120 + 40 * y / height)
    img[..., 2] = np.where(sky, 230 - 30 * y / height, 60 + 20 * x / width)
    for cx, cy, r, col in ((180, 300, 70, (200, 40, 40)), (450, 330, 90, (240, 200, 60)), (540, 90, 40, (250, 250, 230))):
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = col
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def build(name: str, dtype: str, tiny: bool, tmp: Path):
    """(model, processor, parameter count) for checkpoint ``name`` in ``dtype``."""
    import transformers
    from transformers import AutoConfig

    from mustdrop.adapters.loading import pick_dtype
    from mustdrop.adapters.processors import load_processor
    from mustdrop.loading import load_llava
    from mustdrop.testing import build_published_tiny_any

    published = ROOT / "tests" / "published" / MODELS[name][0]
    folder = tmp / f"{name}-tiny"
    if not (folder / "config.json").is_file():
        build_published_tiny_any(folder, published)
    if tiny:
        model, processor = load_llava(str(folder), "cpu", dtype)
    else:
        cfg = json.loads((published / "config.json").read_text())
        processor = load_processor(str(folder), cfg["model_type"])
        config = AutoConfig.from_pretrained(published)
        torch.manual_seed(0)
        model = getattr(transformers, cfg["architectures"][0])._from_config(config, dtype=pick_dtype(dtype, "cpu"))
        model = model.eval()
        if hasattr(model.model, "image_newline"):  # zero-initialised in transformers; a trained one is not
            with torch.no_grad():
                model.model.image_newline.normal_()
    return model, processor, sum(p.numel() for p in model.parameters())


def click(runner, image):
    """One app click: the vanilla run, then the MustDrop-64 run; their traces and wall seconds."""
    out = {}
    for label, preset in (("vanilla", "off"), ("mustdrop", "64")):
        t = time.perf_counter()
        res = runner.run(image, QUESTION, runner.config_for(preset), max_new_tokens=NEW_TOKENS)
        out[label] = (res.trace, time.perf_counter() - t)
    return out


def bench_one(name, dtype, args, tmp, image):
    from mustdrop.accounting import summarize
    from mustdrop.adapters import make_runner

    t = time.perf_counter()
    model, processor, n_params = build(name, dtype, args.tiny, tmp)
    t_build = time.perf_counter() - t
    runner = make_runner(model, processor, MODELS[name][1])
    print(f"\n== {name} ({MODELS[name][0]}) {dtype}: {n_params / 1e6:.1f} M parameters, built in {t_build:.1f} s",
          flush=True)
    rows = []
    for i in range(1, args.clicks + 1):
        runs = click(runner, image)
        van, md = runs["vanilla"][0], runs["mustdrop"][0]
        tv, tm = van.meta["timings"], md.meta["timings"]
        acc = summarize(md)
        analytic = 1 / acc["flops"]["ratio_full_sequence"]
        measured = tv["prefill_s"] / tm["prefill_s"]
        row = {"model": name, "dtype": dtype, "click": i, "params_m": n_params / 1e6,
               "click_s": runs["vanilla"][1] + runs["mustdrop"][1],
               "vanilla": {k: tv[k] for k in ("vision_s", "prefill_s", "decode_s", "total_s")},
               "mustdrop": {k: tm[k] for k in ("vision_s", "prefill_s", "decode_s", "total_s")},
               "vanilla_wall_s": runs["vanilla"][1], "mustdrop_wall_s": runs["mustdrop"][1],
               "tokens": (len(van.meta["generation"]["token_ids"]), len(md.meta["generation"]["token_ids"])),
               "answers": (van.answer, md.answer),
               "prefill_speedup": measured, "analytic_speedup": analytic, "n_sys": acc["flops"]["n_sys"],
               "n_text": acc["flops"]["n_text"]}
        for label in ("vanilla", "mustdrop"):
            s = row[label]
            print(f"  click {i} {label:8s} vision {s['vision_s']:6.2f}  prefill {s['prefill_s']:6.2f}  "
                  f"decode {s['decode_s']:6.2f}  total {s['total_s']:6.2f} s (wall {row[label + '_wall_s']:.2f})",
                  flush=True)
        print(f"  click {i} = {row['click_s']:.2f} s; prefill speed-up {measured:.2f}x measured / {analytic:.2f}x "
              f"analytic = {measured / analytic:.2f}; tokens generated {row['tokens'][0]} / {row['tokens'][1]}",
              flush=True)
        rows.append(row)
    del runner, model, processor
    gc.collect()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    ap.add_argument("--clicks", type=int, default=2, help="clicks per model and dtype; click 1 is the cold one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="shrunk widths: checks the script, measures nothing real")
    ap.add_argument("--json", type=Path, help="also write every row here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{'TINY shapes (not a measurement)' if args.tiny else 'published shapes, random weights'}", flush=True)
    image = photo_like()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for dtype in args.dtypes:
                rows += bench_one(name, dtype, args, Path(tmp), image)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))

    print("\n| model | dtype | click | vanilla vision / prefill / decode (s) | MustDrop-64 vision / prefill / decode (s) "
          "| click (s) | prefill speed-up measured / analytic | same answer as float32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next((q for q in rows if q["model"] == r["model"] and q["dtype"] == "float32" and q["click"] == r["click"]),
                   None)
        same = "" if r["dtype"] == "float32" or ref is None else (
            "yes" if r["answers"] == ref["answers"] else "no")
        v, m = r["vanilla"], r["mustdrop"]
        print(f"| {r['model']} | {r['dtype']} | {r['click']} | {v['vision_s']:.2f} / {v['prefill_s']:.2f} / "
              f"{v['decode_s']:.2f} | {m['vision_s']:.2f} / {m['prefill_s']:.2f} / {m['decode_s']:.2f} | "
              f"{r['click_s']:.2f} | {r['prefill_speedup']:.2f}x / {r['analytic_speedup']:.2f}x "
              f"({r['prefill_speedup'] / r['analytic_speedup']:.2f}) | {same} |")


if __name__ == "__main__":
    main()
