"""The server's folder for trace files and slides, one sub-folder per run, emptied of old ones.

Each running app owns one folder ``mustdrop-lens-*`` in the system's temp folder, with an owner
file naming its process. The folder is removed when the app exits cleanly (``atexit``; Ctrl-C and,
under ``lens_app.cli``, SIGTERM end the app that way), and its run folders older than two hours are
removed while it serves. A folder left by a crash (or ``kill -9``) is removed by the next app to
start, once it is older than two hours and its process is gone; the folder of a live app is never
touched.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

MAX_AGE_S = 7200                            # files older than two hours are removed (a long-running Space)
PREFIX = "mustdrop-lens-"
OWNER = ".owner.json"                       # {"pid": ..., "started": ...} of the app that made the folder


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), to tell it from a later
    process given the same id; None where /proc does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the process that wrote an owner file still runs."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                    # exists, owned by another user
    except OSError:
        return False
    started = owner.get("started")
    return started is None or _process_start(pid) in (None, started)


def _last_change(folder: Path) -> float:
    """The newest modification time of a folder and its entries."""
    times = [folder.stat().st_mtime]
    for entry in folder.iterdir():
        try:
            times.append(entry.stat().st_mtime)
        except OSError:
            pass
    return max(times)


def prune_stale(parent: Path, keep: Path | None = None, max_age_s: float = MAX_AGE_S) -> list[Path]:
    """Remove the work folders in ``parent`` of apps that are gone, unchanged for ``max_age_s``
    (a folder without an owner file, from an older version, by age alone); the removed folders."""
    removed = []
    for d in Path(parent).glob(PREFIX + "*"):
        try:
            if keep is not None and d.resolve() == keep.resolve():
                continue
            if d.is_symlink() or not d.is_dir() or time.time() - _last_change(d) <= max_age_s:
                continue
            try:
                owner = json.loads((d / OWNER).read_text())
            except (OSError, ValueError):
                owner = {}
            if isinstance(owner, dict) and _alive(owner):
                continue
            shutil.rmtree(d)
            removed.append(d)
        except OSError:
            pass                                # another app removed it first, or not ours to remove
    return removed


def remove_on_sigterm() -> None:
    """Make SIGTERM end the app as Ctrl-C does (so ``atexit`` removes the work folder); only in the
    main thread and only where nobody has set a SIGTERM handler."""
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:
        pass                                    # not the main thread


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class Workdir:
    def __init__(self, root: Path | None = None, parent: Path | None = None):
        """``root``: a folder to use as it is (kept at exit); else a new folder in ``parent``
        (the system's temp folder), owned by this process and removed at exit."""
        if root is not None:
            self.root = Path(root)
            return
        parent = Path(parent or tempfile.gettempdir())
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
        (self.root / OWNER).write_text(json.dumps({"pid": os.getpid(), "started": _process_start(os.getpid())}))
        atexit.register(shutil.rmtree, self.root, True)
        prune_stale(parent, keep=self.root)

    def folder(self, kind: str, trace) -> Path:
        """A new folder for one run's files, named after its input hash."""
        self.prune()
        stamp = int(time.time() * 1000) % 10 ** 8
        return self.root / f"{kind}-{trace.meta['input']['input_hash']}-{stamp}"

    def save_traces(self, trace, vanilla=None) -> list[str]:
        """The MustDrop trace (and the vanilla one, when it is another run) as files to download."""
        folder = self.folder("run", trace)
        files = [str(trace.save(folder / f"mustdrop-{trace.meta['config'].get('preset')}.safetensors"))]
        if vanilla is not None and vanilla is not trace:
            files.append(str(vanilla.save(folder / "vanilla.safetensors")))
        return files

    def prune(self, max_age_s: float = MAX_AGE_S) -> None:
        """Remove this app's run folders older than ``max_age_s``."""
        now = time.time()
        for d in self.root.iterdir():
            if d.name == OWNER:
                continue
            try:
                if now - d.stat().st_mtime > max_age_s:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass
