"""The app on a tiny copy of Qwen2.5-VL-3B-Instruct (tests/published), without a browser: a Run draws the
trace of a non-square image (the pictures decode, at the image's aspect), reference positions get the
message that says why, a same-budget comparison runs, and the trace written replays on its image."""

import numpy as np
import pytest
from PIL import Image

from lens_app import app as lens_app_app, engine
from mustdrop.trace import Trace

from conftest import serving
from test_app import RUN_DEFAULTS, status_of
from test_qwen_vl_host import QUESTION, textured

NAME = "Qwen2.5-VL-3B-Instruct"


@pytest.fixture(scope="module")
def lens(tmp_path_factory):
    from mustdrop.adapters import make_runner
    from mustdrop.loading import load_llava
    from mustdrop.testing import build_published_tiny_any
    from test_published_new_families import PUBLISHED
    folder = build_published_tiny_any(tmp_path_factory.mktemp(NAME), PUBLISHED / NAME, text_layers=8)
    model, proc = load_llava(str(folder))
    return engine.Lens(runner=make_runner(model, proc, f"Qwen/{NAME}", defaults_from=str(folder)))


@pytest.fixture(scope="module")
def served(lens, tmp_path_factory):
    from gradio_client import Client

    image = tmp_path_factory.mktemp("qwen-inputs") / "wide.png"
    textured().save(image)
    with serving(lens_app_app.build_app(lens, examples=[])) as url:
        yield Client(url, verbose=False), image


def run_ui(client, path, preset="custom", **kw):
    from gradio_client import handle_file
    v = dict(RUN_DEFAULTS, **dict(dict(positions="original", prune="0, 2, 4"), **kw))
    return client.predict(handle_file(str(path)), QUESTION, preset, *v.values(), api_name="/run")


def pictures(result):
    """The pictures a result names (file paths that decode as images)."""
    out = []
    for x in result:
        path = x.get("path") if isinstance(x, dict) else x
        if isinstance(path, str) and path.lower().endswith((".png", ".webp", ".jpg")):
            try:
                out.append(np.asarray(Image.open(path).convert("RGB")))
            except OSError:
                pass
    return out


def test_a_run_draws_the_non_square_trace(served):
    client, image = served
    res = run_ui(client, image, preset="64")
    assert status_of(res).startswith("**Done:**"), status_of(res)
    pics = pictures(res)
    assert pics, "the run shows pictures"
    wide = [p for p in pics if abs(p.shape[1] / p.shape[0] - 36 / 22) < 0.05]
    assert wide and all(p.std() > 0 for p in wide), [p.shape for p in pics]


def test_reference_positions_get_the_reason(served):
    client, image = served
    status = status_of(run_ui(client, image, positions="reference"))
    assert status.startswith("**Problem:**") and "3-D" in status, status


def test_comparison_and_replay(served):
    from gradio_client import handle_file
    client, image = served
    path, vanilla, answer, other = client.predict(handle_file(str(image)), QUESTION, "64", "fastv", api_name="/analyze")[:4]
    t = Trace.load(path)
    assert t.crop_grid(0) == (22, 36) and t.meta["config"]["positions"] == "original"
    res = client.predict([handle_file(path)], handle_file(str(image)), True, api_name="/replay")
    assert "matching image" in status_of(res)
    assert pictures(res)


def test_compare_offers_only_the_methods_this_model_runs(lens):
    """Pooling and VisionZip require what Qwen-VL lacks (a square grid, a one-token projector): the
    "compare with" list leaves them out and a note under it says why, in each one's own words."""
    from mustdrop import methods

    demo = lens_app_app.build_app(lens, examples=[])
    comps = {c["props"].get("elem_id"): c["props"] for c in demo.config["components"]}
    offered = [value for _, value in comps["compare_in"]["choices"]]
    refused = [m for m in methods.baselines() if set(methods.get(m).requires) & set(lens.runner.host.vision_lacks)]
    assert refused == ["visionzip", "pool"]
    assert offered == ["none"] + [m for m in methods.baselines() if m not in refused]
    note = comps["compare_refused"]["value"]
    for m in refused:
        assert methods.get(m).label in note and next(iter(methods.get(m).requires.values())) in note
    demo.close()
