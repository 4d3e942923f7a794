"""House rules that keep user files from running code: no pickle, no unsafe torch.load, no share."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNSAFE = re.compile(r"\bimport pickle\b|pickle\.loads?\(|cloudpickle|\bdill\.|allow_pickle\s*=\s*True")


def tracked_python():
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    files = [ROOT / p for p in out if not p.startswith("tests/")]
    return files or sorted(ROOT.glob("mustdrop/**/*.py"))


def test_no_pickle_or_unsafe_torch_load():
    bad = []
    for f in tracked_python():
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if UNSAFE.search(line) or ("torch.load(" in line and "weights_only=True" not in line):
                bad.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_no_public_share_by_default():
    hits = [str(f) for f in tracked_python() if re.search(r"share\s*=\s*True", f.read_text())]
    assert not hits, hits
