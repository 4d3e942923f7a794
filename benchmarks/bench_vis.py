"""How long the layer slider's redraw takes: the four overlays drawn from a trace (filter, both score
heatmaps, KV), best of --repeats, on the tiny random LLaVA of mustdrop.testing, and its ratio to the
100 ms a slider step may take. A benchmark, not a test: on shared cores the figure moves with the
load, so it is printed, never asserted.

    python3 benchmarks/bench_vis.py --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TARGET_S = 0.100


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--canvas", type=int, default=480)
    args = ap.parse_args(argv)

    from conftest import half_textured_image
    from mustdrop import vis
    from mustdrop.adapters import LlavaMustDrop, load_llava
    from mustdrop.testing import build_tiny_llava

    folder = build_tiny_llava(Path(tempfile.mkdtemp(prefix="bench-vis-")))
    model, processor = load_llava(str(folder))
    runner = LlavaMustDrop(model, processor, str(folder))
    img = half_textured_image()
    md = runner.run(img, "what color is the square?", runner.config_for("64"), max_new_tokens=4).trace
    geom = vis.geometry(md, args.canvas)
    base = vis.base_canvas(img, md, geom)
    vis.filter_overlay(md, md.prune_layers[0], base=base)     # warm caches
    layer = md.prune_layers[-1]
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        vis.filter_overlay(md, layer, base=base, selected=(1, 1))
        vis.heatmap_overlay(md, "global_share", layer=layer, base=base)
        vis.heatmap_overlay(md, "individual_max", layer=layer, base=base)
        vis.kv_overlay(md, layer, base=base)
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"redraw of four overlays (canvas {args.canvas}, best of {args.repeats}): {best * 1000:.1f} ms; "
          f"ratio to the {TARGET_S * 1000:.0f} ms target: {best / TARGET_S:.3f}")


if __name__ == "__main__":
    main()
