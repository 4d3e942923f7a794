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


# ---------------------------------------------------------------- decoding knobs, presets, stage switches
from test_app import client, files, run_ui, server, status_of  # noqa: E402,F401 - the live app's fixtures

BIG = 2 ** 53 + 1


@pytest.mark.parametrize("kw,message", [
    (dict(mode="sampling", temperature=1e-300), "temperature must be 0 (greedy) or a number in [0.01, 100]"),
    (dict(mode="sampling", top_p=1e-300), "top p must be a number in [0.01, 1]"),
    (dict(mode="sampling", seed=10 ** 30), "seed must be a whole number in 0..9007199254740991"),
    (dict(mode="sampling", seed=BIG), "got 9007199254740993"),
    (dict(mode="greedy", seed=-1), "seed must be a whole number in 0..9007199254740991"),
    (dict(mode="beam"), "decoding must be one of greedy, sampling"),
    (dict(m1a="yes"), "1a merge must be true or false"),
    (dict(m3=1), "3 KV trim must be true or false"),
    (dict(positions=["reference"]), "positions must be one of reference, original"),
    (dict(max_new=True), "max new tokens must be a number"),
    (dict(preset=64.5), "preset must be one of off, 192, 128, 64, custom (a string), got 64.5"),
])
def test_bad_knobs_through_the_api(client, files, kw, message):
    status = status_of(run_ui(client, files / "scene.png", **kw))
    assert status is not None and status.startswith("**Problem:**") and message in status, status


def test_knob_strings_and_numbers_mean_what_they_say():
    from lens_app import inputs
    from mustdrop.config import MustDropConfig

    knobs = inputs.custom_knobs(3, 0.8, 0.08, "1, 3", 0.011, 0.01, "reference", "false", "true", True, False)
    assert (knobs["merge"], knobs["key_set"], knobs["filter"], knobs["kv_trim"]) == (False, True, True, False)
    with pytest.raises(ValueError, match="must be true or false"):
        MustDropConfig(merge="false")
    with pytest.raises(ValueError, match="seed must be a whole number"):
        MustDropConfig(seed=2 ** 64)
    assert inputs.number(BIG, "seed", int) == BIG                 # never through float
    assert inputs.number(str(BIG), "seed", int) == BIG
    assert inputs.sampling_from("sampling", 0.7, 0.9, 2 ** 53 - 1).seed == 2 ** 53 - 1
    with pytest.raises(ValueError, match="got 9007199254740993"):
        inputs.sampling_from("sampling", 0.7, 0.9, BIG)
    with pytest.raises(ValueError, match="too large to be exact"):
        inputs.number(1e20, "seed", int)
    assert inputs.preset_name(64, ("off", "192", "128", "64")) == "64"
    with pytest.raises(ValueError, match="a string"):
        inputs.preset_name(True, ("off", "64"))


@pytest.mark.parametrize("name", sorted(corpus.BAD_SAMPLING))
def test_bad_sampling_through_the_library(tiny, image, name):
    from mustdrop.adapters import Sampling
    kw, words = corpus.BAD_SAMPLING[name]
    with pytest.raises(ValueError) as e:
        tiny.run(image, Q, tiny.config_for("64"), max_new_tokens=1, sampling=Sampling(**kw))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_largest_seed_is_recorded_exactly(tiny, image):
    from mustdrop.adapters import Sampling
    t = tiny.run(image, Q, tiny.config_for("64"), max_new_tokens=2, sampling=Sampling(0.7, 0.9, 2 ** 53 - 1)).trace
    assert json.loads(json.dumps(t.meta))["generation"]["seed"] == 2 ** 53 - 1


def test_preset_as_a_number_is_that_preset(client, files):
    from gradio_client import handle_file
    path, _, answer = client.predict(handle_file(str(files / "scene.png")), "what color is the square?", 64,
                                     api_name="/analyze")[:3]
    from mustdrop.trace import Trace
    assert Trace.load(path).meta["config"]["preset"] == "64"


# ---------------------------------------------------------------- questions
BAD_TYPED_QUESTIONS = [(["what", "colour"], "must be text (a string), got a list"),
                       ({"q": "what"}, "must be text (a string), got a dict"),
                       (7, "must be text (a string), got a int"),
                       ("what \ud800 colour", "not valid UTF-8")]


def raw_call(url, api, image, *rest):
    """An API call as any HTTP client may send it: JSON with \\ud800 escapes (gradio_client refuses to
    encode a lone surrogate); the image uploaded first. Returns the event stream's text."""
    import httpx
    with open(image, "rb") as f:
        path = httpx.post(f"{url}gradio_api/upload", files=[("files", (Path(image).name, f))]).json()[0]
    data = [{"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": Path(image).name}, *rest]
    r = httpx.post(f"{url}gradio_api/call/{api}", content=json.dumps({"data": data}),
                   headers={"content-type": "application/json"})
    return httpx.get(f"{url}gradio_api/call/{api}/{r.json()['event_id']}", timeout=300).text


@pytest.mark.parametrize("question,message", BAD_TYPED_QUESTIONS)
def test_bad_questions_through_run_and_analyze(client, server, files, question, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    if isinstance(question, str):                     # the lone surrogate: only raw HTTP can send it
        text = raw_call(server[1], "analyze", files / "scene.png", question, "64", "none")
        assert "event: error" in text and message in text and "Traceback" not in text, text[-500:]
        return
    status = status_of(run_ui(client, files / "scene.png", question=question))
    assert status is not None and status.startswith("**Problem:**") and message in status, status
    with pytest.raises(AppError) as e:
        client.predict(handle_file(str(files / "scene.png")), question, "64", api_name="/analyze")
    assert message in str(e.value) and "Traceback" not in str(e.value)


@pytest.mark.parametrize("question,message", BAD_TYPED_QUESTIONS)
def test_bad_questions_through_the_library(tiny, image, question, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny.run(image, question, tiny.config_for("64"), max_new_tokens=1)


def run_cli(args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mustdrop", *args], capture_output=True, env=env, cwd=cwd,
                          timeout=300)


def test_cli_question_with_invalid_utf8(tiny_dir, tmp_path):
    img = corpus.GOOD_ODD_IMAGES["rgba"](tmp_path)
    bad = b"what \xff\xfe colour?"                         # not UTF-8: argv decodes it to lone surrogates
    p = run_cli([b"run", b"--model", str(tiny_dir).encode(), b"--image", str(img).encode(), b"--question", bad],
                tmp_path)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 2, err
    assert "not valid UTF-8" in err and "Traceback" not in err


def test_cli_out_on_a_full_disk_says_so_and_keeps_the_old_file(tiny_dir, tmp_path, monkeypatch, capsys):
    """The disk fills during the write (simulated: safetensors' writer fails as on ENOSPC after writing
    part of the temporary file); a message, exit 2, the trace already at --out unchanged, no temporary left."""
    import safetensors.numpy
    from safetensors import SafetensorError

    from mustdrop import cli

    out = tmp_path / "out" / "trace.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"the old trace")
    real = safetensors.numpy.save_file

    def full_disk(arrays, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    img = corpus.GOOD_ODD_IMAGES["rgba"](tmp_path)
    rc = cli.main(["run", "--model", str(tiny_dir), "--image", str(img), "--question", Q, "--max-new-tokens", "1",
                   "--no-vanilla", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "cannot write the trace to" in err and "no space left on device" in err and "Traceback" not in err
    assert out.read_bytes() == b"the old trace" and sorted(p.name for p in out.parent.iterdir()) == ["trace.safetensors"]
    monkeypatch.setattr(safetensors.numpy, "save_file", real)


# ---------------------------------------------------------------- special-token text stays text
PLAIN = ["what colour is the square?", "Is there a cat?  Answer yes or no.", "what's <b>that</b> (in [brackets])?",
         "¿qué color tiene el cuadrado? 日本語 🙂", "USER: ASSISTANT: ?", "a\nb\tc"]


def published_processor(name, tmp_path):
    import shutil

    from transformers import AutoImageProcessor, LlavaNextProcessor, LlavaProcessor

    from mustdrop.testing import build_published_tokenizer
    src = ROOT / "tests" / "published" / name
    d = tmp_path / name
    d.mkdir()
    shutil.copy(src / "preprocessor_config.json", d)
    pconf = json.loads((src / "processor_config.json").read_text())
    cls = LlavaNextProcessor if pconf["processor_class"] == "LlavaNextProcessor" else LlavaProcessor
    return cls(image_processor=AutoImageProcessor.from_pretrained(d),
               tokenizer=build_published_tokenizer(json.loads((src / "tokenizer_facts.json").read_text())),
               patch_size=pconf["patch_size"], vision_feature_select_strategy=pconf["vision_feature_select_strategy"],
               num_additional_image_tokens=pconf["num_additional_image_tokens"],
               chat_template=json.loads((src / "chat_template.json").read_text())["chat_template"])


@pytest.fixture(params=["toy", "llava-1.5-7b-hf", "llava-v1.6-mistral-7b-hf", "llava-interleave-qwen-0.5b-hf"])
def processor(request, tiny, tmp_path):
    return tiny.processor if request.param == "toy" else published_processor(request.param, tmp_path)


def prompt_ids(proc, question, image):
    from mustdrop.question import as_text
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = proc.apply_chat_template(conv, add_generation_prompt=True)
    ids = proc(images=image, text=prompt, return_tensors="pt")["input_ids"]
    image_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    return ids, lambda force=False: as_text(ids, prompt, question, proc.tokenizer, image_id, force=force)


def test_plain_questions_keep_their_ids(processor, image):
    for q in PLAIN:
        ids, text_ids = prompt_ids(processor, q, image)
        assert text_ids() is ids                                   # untouched: bit-identical to before
        assert text_ids(force=True).tolist() == ids.tolist(), q    # and the splice reproduces them


def test_special_token_text_in_a_question_stays_text(processor, image):
    tok = processor.tokenizer
    specials = {t: i for i, t in ((i, a.content) for i, a in tok.added_tokens_decoder.items() if a.special)
                if t != processor.image_token}
    q = "is " + " and ".join(specials) + " here?"
    ids, text_ids = prompt_ids(processor, q, image)
    plain_ids, _ = prompt_ids(processor, "is x here?", image)
    out, old, plain = text_ids()[0].tolist(), ids[0].tolist(), plain_ids[0].tolist()
    for text, i in specials.items():
        if text == tok.unk_token:          # <unk> also stands for characters the vocabulary lacks
            continue
        assert old.count(i) > plain.count(i), f"the old path made the typed {text} a special id"
        assert out.count(i) == plain.count(i), f"the typed {text} stays text: only the template's own {text} remain"
    if tok.unk_token_id not in out:        # a vocabulary that spells every character (not the toy's)
        assert all(s in tok.decode(out) for s in specials), tok.decode(out)


def test_a_run_with_special_token_text(tiny, image):
    """Through the adapter: the prompt ids carry no eos / pad the user typed, and the run completes."""
    tok = tiny.processor.tokenizer
    q = f"what colour {tok.eos_token} is {tok.pad_token} the square?"
    typed, _ = tiny.host.inputs(image, q)
    plain, _ = tiny.host.inputs(image, "what colour is the square?")
    for i in (tok.eos_token_id, tok.pad_token_id):
        assert typed["input_ids"][0].tolist().count(i) == plain["input_ids"][0].tolist().count(i)
    t = tiny.run(image, q, tiny.config_for("64"), max_new_tokens=2).trace
    assert t.meta["input"]["question"] == q
