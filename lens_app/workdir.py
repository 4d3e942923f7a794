"""The server's folder for trace files and slides, one sub-folder per run, emptied of old ones."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

MAX_AGE_S = 7200                            # files older than two hours are removed (a long-running Space)


class Workdir:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="mustdrop-lens-"))

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
        now = time.time()
        for d in self.root.iterdir():
            try:
                if now - d.stat().st_mtime > max_age_s:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass
