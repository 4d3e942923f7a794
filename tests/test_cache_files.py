"""Concurrent visitors get the same overlay: Gradio's cached copy of it must never be rewritten in
place while another download reads it (seen as "peer closed connection without sending complete
message body" in tests/test_concurrency.py)."""

from pathlib import Path

import numpy as np

import lens_app  # noqa: F401  (installs the atomic copy)
from gradio import image_utils, processing_utils


def test_gradio_image_caching_goes_through_the_atomic_copy():
    from lens_app import cache_files

    assert processing_utils.save_pil_to_cache is cache_files.save_pil_to_cache


def test_an_existing_copy_is_never_rewritten_in_place(tmp_path, monkeypatch):
    """The same image returned twice: the second return must not open the first copy for writing
    (Gradio's own function rewrites it with Path.write_bytes, truncating it under a reader)."""
    arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    first = Path(image_utils.save_image(arr, str(tmp_path), format="webp"))
    writes = []
    real = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: (writes.append(self), real(self, data))[1])
    opened = []
    real_open = open

    def spy_open(file, mode="r", *a, **k):
        if "w" in mode or "a" in mode or "+" in mode:
            opened.append(str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr("builtins.open", spy_open)
    inode = first.stat().st_ino
    again = Path(image_utils.save_image(arr, str(tmp_path), format="webp"))
    assert again == first and first.stat().st_ino == inode
    assert first not in [p.resolve() for p in writes] and str(first) not in opened


def test_a_copy_cut_short_is_replaced_not_served(tmp_path):
    """A cached copy truncated by a process killed mid-write (the cache folder is shared by every
    Gradio process of the machine, across runs) must not be served again as the image's copy."""
    arr = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    first = Path(image_utils.save_image(arr, str(tmp_path), format="png"))
    whole = first.read_bytes()
    first.write_bytes(whole[: len(whole) // 3])
    again = Path(image_utils.save_image(arr, str(tmp_path), format="png"))
    assert again == first and again.read_bytes() == whole
    same_size_other_bytes = bytes(len(whole))
    first.write_bytes(same_size_other_bytes)
    assert Path(image_utils.save_image(arr, str(tmp_path), format="png")).read_bytes() == whole
