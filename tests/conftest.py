"""Shared fixtures: a tiny LLaVA-1.5-layout model built offline, and test images."""

import os
import socket
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(demo):
    """Serve a built app on 127.0.0.1 at a free port without blocking; yield its URL (with the trailing
    slash), close it afterwards."""
    from lens_app.app import launch

    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def half_textured_image(seed=0, size=336):
    """Left half noise (windows stay apart), right half flat colour with a square (windows merge)."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:, : size // 2] = rng.integers(0, 256, (size, size // 2, 3))
    img[:, size // 2:] = (40, 120, 200)
    img[200:280, 220:300] = (250, 200, 20)
    return Image.fromarray(img)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from mustdrop.testing import build_tiny_llava
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from mustdrop.adapters import LlavaMustDrop, load_llava
    model, processor = load_llava(str(tiny_dir))
    return LlavaMustDrop(model, processor, str(tiny_dir))


@pytest.fixture
def image():
    return half_textured_image()


DATASET_CONFIGS = ["64", "fastv@64", "fastervlm@64"]


@pytest.fixture(scope="session")
def dataset_run(tmp_path_factory):
    """A small real run folder (mustdrop.dataset layout): 6 scene-world samples x vanilla, MustDrop 64
    and two same-budget baselines of the shipped toy model, written by analysis.batch."""
    from analysis.batch import run_batch
    from analysis.common import load_runner, scene_items

    out = tmp_path_factory.mktemp("runs") / "toy6"
    runner = load_runner("assets/toy-llava", threads=1)
    run_batch(runner, scene_items("test", 6, 0), DATASET_CONFIGS, out, progress=False,
              dataset={"kind": "scene", "split": "test", "seed": 0, "n": 6})
    return out
