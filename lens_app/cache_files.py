"""Gradio's cached copies of returned images, written so that a visitor never downloads half a file.

Gradio 6.31 names the copy of a returned image by the hash of its bytes and rewrites it in place
(``Path.write_bytes``) on every return, even when the same bytes are already there. Two visitors who
get the same overlay at once (the same example, the same shared trace) then race: one download reads
the file while the other request truncates and rewrites it, and the client gets "peer closed
connection without sending complete message body". The copy is content-addressed, so an existing
file that holds these bytes is only touched (``delete_cache`` ages files by their time); anything else
at that path (a copy cut short by a process killed mid-write, in a cache folder shared by every
Gradio process of the machine) is replaced, and every new copy is written under a temporary name
and renamed into place, as Gradio already does for files (``processing_utils.save_file_to_cache``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gradio import processing_utils


def save_pil_to_cache(img, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """``gradio.processing_utils.save_pil_to_cache`` with an atomic, write-once copy."""
    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    path = (folder / f"{name}.{format}").resolve()
    if _holds(path, data):
        try:
            os.utime(path)
        except OSError:
            pass
        return str(path)
    fd, staging = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return str(path)


def _holds(path: Path, data: bytes) -> bool:
    """Whether ``path`` is a complete copy of ``data`` (read only when the size already matches)."""
    try:
        if path.stat().st_size != len(data):
            return False
        with open(path, "rb") as f:
            return f.read() == data
    except OSError:
        return False


def install() -> None:
    """Route Gradio's image caching (gr.Image, gr.Gallery, gr.AnnotatedImage) through the atomic copy."""
    processing_utils.save_pil_to_cache = save_pil_to_cache
