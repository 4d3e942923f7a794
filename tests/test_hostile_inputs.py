"""Issue 24, inputs: what a public endpoint or a command line receives from someone who means harm.

Thin strips are refused from the PNG header (nothing decoded, memory flat); decoding knobs, presets
and questions are typed and bounded at the edge (the app's input functions, the API handlers, the
library); text typed into a question stays text (no special tokens); the CLI says what went wrong
(invalid UTF-8, a full disk) with exit code 2 and no traceback.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import corpus
from mustdrop.images import ImageInputError, load_image

ROOT = Path(__file__).resolve().parents[1]
Q = "what colour is the square?"

# Runs in a fresh interpreter: the tiny model, one good run (the warm state of a server), then the
# thin strip through runner.run with PIL's decoder watched. The address space is capped 2 GB above the
# warm state, so the old code fails with MemoryError instead of taking the machine.
_PEAK_SCRIPT = r"""
import json, resource, sys
from PIL import ImageFile
from mustdrop.adapters import LlavaMustDrop, load_llava
from mustdrop.images import ImageInputError
sys.path.insert(0, sys.argv[3])
from conftest import half_textured_image

model, proc = load_llava(sys.argv[1])
runner = LlavaMustDrop(model, proc, sys.argv[1])
runner.run(half_textured_image(), "what colour is the square?", runner.config_for("64"), max_new_tokens=1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 2 * 1024 ** 3, resource.RLIM_INFINITY))
decoded = []
load = ImageFile.ImageFile.load
def watched(self):
    decoded.append(self.size)
    return load(self)
ImageFile.ImageFile.load = watched
try:
    runner.run(sys.argv[2], "what colour is the square?", runner.config_for("64"), max_new_tokens=1)
    outcome = "accepted"
except ImageInputError as e:
    outcome = "refused: " + str(e)
except BaseException as e:
    outcome = f"{type(e).__name__}: {e}"[:300]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "decoded": decoded, "before_kb": before, "after_kb": after}))
"""


@pytest.mark.parametrize("name", ["thin_2x100000", "thin_2x3000"])
def test_thin_strip_is_refused_from_the_header_with_flat_memory(name, tiny_dir, tmp_path):
    path = corpus.BAD_IMAGES[name][0](tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tiny_dir), str(path), str(ROOT / "tests")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    grew_mb = (r["after_kb"] - r["before_kb"]) / 1024
    note = (f"{path.name} ({path.stat().st_size} bytes): {r['outcome']}; decoded {r['decoded']}; peak RSS "
            f"{r['before_kb'] / 1024:.0f} MB warm -> {r['after_kb'] / 1024:.0f} MB (+{grew_mb:.1f} MB)")
    assert r["outcome"].startswith("refused") and "aspect ratio" in r["outcome"], note
    assert r["decoded"] == [], "refused before PIL decoded a pixel: " + note
    assert grew_mb < 100, note
    print(note)


def test_processed_size_limit_uses_the_processors_own_settings(tmp_path):
    """A processor whose resize would make more than MAX_PROCESSED_PIXELS is refused before decoding, with
    the sizes named; the published processors accept every photo shape within the aspect limit."""
    import shutil

    from transformers import AutoImageProcessor

    from mustdrop.images import MAX_PROCESSED_PIXELS, processed_sizes

    img = tmp_path / "photo.png"
    from PIL import Image
    Image.new("RGB", (4000, 3000), (10, 20, 30)).save(img)
    for name in ("llava-1.5-7b-hf", "llava-v1.6-mistral-7b-hf", "llava-interleave-qwen-0.5b-hf"):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(ROOT / "tests" / "published" / name / "preprocessor_config.json", d)
        ip = AutoImageProcessor.from_pretrained(d)
        for w, h in [(4000, 3000), (3000, 4000), (2000, 100), (100, 2000), (336, 336)]:
            assert sum(a * b for a, b in processed_sizes(ip, w, h)) <= MAX_PROCESSED_PIXELS
        assert load_image(img, ip).size == (4000, 3000)
    clip = AutoImageProcessor.from_pretrained(tmp_path / "llava-1.5-7b-hf")
    assert processed_sizes(clip, 40, 800) == [(336, 6720)]
    big = AutoImageProcessor.from_pretrained(tmp_path / "llava-1.5-7b-hf", size={"shortest_edge": 4096})
    with pytest.raises(ImageInputError, match=r"resize it to 5461 x 4096 .*above the limit"):
        load_image(img, big)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    qwen = Qwen2VLImageProcessorPil(max_pixels=12845056)          # the published Qwen2-VL setting
    (w, h), = processed_sizes(qwen, 4000, 3000)
    assert w * h <= 12845056 and abs(w / h - 4 / 3) < 0.01
    from mustdrop.images import MAX_ASPECT
    assert MAX_ASPECT == 20
