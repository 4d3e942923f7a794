"""The app's work folders: a stale one of a dead app is pruned at start, a live app's never; an app
removes its own at a clean exit, at Ctrl-C and at SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lens_app.workdir import MAX_AGE_S, OWNER, PREFIX, Workdir

ROOT = Path(__file__).resolve().parents[1]
OLD = time.time() - MAX_AGE_S - 600


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def folder(parent: Path, name: str, owner: dict | None, mtime: float) -> Path:
    d = parent / (PREFIX + name)
    (d / "run-abc-1").mkdir(parents=True)
    (d / "run-abc-1" / "slide.png").write_bytes(b"user image")
    if owner is not None:
        (d / OWNER).write_text(json.dumps(owner))
    for p in (d / "run-abc-1", d / OWNER, d):
        if p.exists():
            os.utime(p, (mtime, mtime))
    return d


def test_start_prunes_stale_folders_of_dead_apps_only(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = folder(tmp_path, "dead", {"pid": dead_pid(), "started": None}, OLD)
        unowned = folder(tmp_path, "unowned", None, OLD)            # an older version's folder
        alive = folder(tmp_path, "alive", {"pid": live.pid, "started": None}, OLD)
        recent = folder(tmp_path, "recent", {"pid": dead_pid(), "started": None}, time.time())
        other = tmp_path / "not-ours"
        other.mkdir()
        os.utime(other, (OLD, OLD))
        w = Workdir(parent=tmp_path)
        assert not dead.exists() and not unowned.exists()
        assert alive.exists() and recent.exists() and other.exists() and w.root.exists()
    finally:
        live.kill()
        live.wait()


def test_a_reused_pid_does_not_keep_a_dead_apps_folder(tmp_path):
    """The owner file records when its process started: another process given the same id later
    does not count as the app."""
    me = json.loads((Workdir(parent=tmp_path).root / OWNER).read_text())
    if me["started"] is None:
        pytest.skip("no /proc: the start time is not recorded here")
    reused = folder(tmp_path, "reused", {"pid": os.getpid(), "started": str(int(me["started"]) - 1)}, OLD)
    Workdir(parent=tmp_path)
    assert not reused.exists()


def test_own_run_folders_are_pruned_but_not_the_owner_file(tmp_path):
    w = Workdir(parent=tmp_path)
    old = w.root / "run-x-1"
    old.mkdir()
    os.utime(old, (OLD, OLD))
    os.utime(w.root / OWNER, (OLD, OLD))
    w.prune()
    assert not old.exists() and (w.root / OWNER).exists()


APP = """
import sys, time
sys.path.insert(0, {root!r})
from lens_app.workdir import Workdir, remove_on_sigterm
remove_on_sigterm()
w = Workdir(parent={parent!r})
(w.root / 'run-x-1').mkdir()
print(w.root, flush=True)
{end}
"""


@pytest.mark.parametrize("end,stop", [
    ("", None),                                                   # returns normally
    ("time.sleep(60)", signal.SIGINT),                             # Ctrl-C
    ("time.sleep(60)", signal.SIGTERM),                            # a service manager stopping it
])
def test_an_app_removes_its_own_folder_at_exit(tmp_path, end, stop):
    code = APP.format(root=str(ROOT), parent=str(tmp_path), end=end)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = Path(p.stdout.readline().strip())
    assert root.is_dir() and root.parent == tmp_path
    if stop is not None:
        p.send_signal(stop)
    p.communicate(timeout=60)
    assert not root.exists()


def test_the_app_installs_the_sigterm_exit(monkeypatch):
    """lens_app.cli.main makes SIGTERM end the app the way Ctrl-C does."""
    from lens_app import cli

    seen = []
    monkeypatch.setattr("lens_app.workdir.remove_on_sigterm", lambda: seen.append(1))
    monkeypatch.setattr("lens_app.app.launch", lambda *a, **k: None)
    monkeypatch.setattr("lens_app.app.build_app", lambda lens, **kw: None)   # kw: runs_dir (the Dataset tab)
    cli.main(["--model", "/nonexistent-model"])
    assert seen == [1]
