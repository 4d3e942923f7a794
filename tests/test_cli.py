"""The CLI prints the answer and a per-stage summary and writes a loadable trace."""

import os
import subprocess
import sys
from pathlib import Path

from mustdrop.trace import Trace

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mustdrop", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_cli_run_writes_trace(tiny_dir, image, tmp_path):
    img = tmp_path / "img.png"
    image.save(img)
    out = tmp_path / "trace.safetensors"
    p = run_cli("run", "--model", str(tiny_dir), "--image", str(img), "--question", "what colour is the square?",
                "--preset", "128", "--max-new-tokens", "3", "--out", str(out))
    assert p.returncode == 0, p.stderr
    for word in ("answer", "stage 1a", "stage 1b", "stage 2", "stage 3", "equivalent", "FLOPs", "vanilla"):
        assert word in p.stdout
    t = Trace.load(out)
    assert t.meta["config"]["preset"] == "128"
    shown = run_cli("show", str(out))
    assert shown.returncode == 0 and "stage 2" in shown.stdout


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    bad = tmp_path / "notimage.png"
    bad.write_text("hello")
    p = run_cli("run", "--model", "llava-hf/llava-1.5-7b-hf", "--image", str(bad), "--question", "q")
    assert p.returncode == 2 and "offline" in p.stderr and "Traceback" not in p.stderr
    assert run_cli("--help").returncode == 0
