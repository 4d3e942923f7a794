"""The app in Debian's chromium, driven by Playwright: the whole visitor path on the tiny model.

Run: pytest -m browser tests/test_browser.py
Screenshots for docs/: python tests/test_browser.py --screenshots [--model assets/toy-llava]
"""

import io
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lens_app.app import build_app, launch  # noqa: E402
from lens_app.engine import Lens  # noqa: E402
from lens_app.examples import load_examples  # noqa: E402
from lens_app.session import CANVAS  # noqa: E402
from mustdrop import vis  # noqa: E402
from conftest import free_port  # noqa: E402
from mustdrop.trace import DROPPED  # noqa: E402
from mustdrop.trace import Trace  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")]


def make_examples(folder: Path):
    """A scene-world-like example: an image, questions, and object patch masks."""
    from conftest import half_textured_image

    folder.mkdir(parents=True, exist_ok=True)
    half_textured_image().save(folder / "scene.png")
    masks = np.zeros((1, 24, 24), np.float32)
    masks[0, 14:20, 15:21] = 1.0                      # the yellow square (pixels 200-280, 220-300)
    np.savez_compressed(folder / "scene.npz", patch_masks=masks,
                        meta=np.array(json.dumps({"objects": [{"color": "yellow", "shape": "square"}]})))
    (folder / "examples.json").write_text(json.dumps(
        [{"file": "scene.png", "question": "what color is the square?", "masks": "scene.npz", "target_ids": [0]}]))
    return load_examples(folder)


class ServerErrors:
    """What went wrong on the server during a test: tracebacks gradio printed, ERROR log records (the
    app logs its internal errors so), and HTTP responses >= 500 that a page received."""

    def __init__(self):
        self.items: list[str] = []

    def take(self) -> list[str]:
        items, self.items = self.items, []
        return items

    def watch(self, page):
        page.on("response", lambda r: r.status >= 500 and self.items.append(f"HTTP {r.status} {r.url}"))
        return page


SERVER_ERRORS = ServerErrors()


@pytest.fixture(scope="module", autouse=True)
def watch_server():
    import logging
    import traceback

    print_exc = traceback.print_exc

    def recording_print_exc(*args, **kwargs):
        SERVER_ERRORS.items.append(traceback.format_exc())
        return print_exc(*args, **kwargs)

    class Recorder(logging.Handler):
        def emit(self, record):
            SERVER_ERRORS.items.append(f"{record.name}: {record.getMessage()}")

    handler = Recorder(level=logging.ERROR)
    traceback.print_exc = recording_print_exc
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        traceback.print_exc = print_exc
        logging.getLogger().removeHandler(handler)


@pytest.fixture(autouse=True)
def no_server_errors():
    """Every test fails on a server-side traceback or HTTP 500 during it (or during the set-up it used)."""
    yield
    errors = SERVER_ERRORS.take()
    assert not errors, "server errors:\n" + "\n".join(e[-1500:] for e in errors)


def new_page(browser, **kw):
    return SERVER_ERRORS.watch(browser.new_page(**kw))


def start(lens, examples):
    demo = build_app(lens, examples=examples)
    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def app(tiny, tmp_path_factory):
    examples = make_examples(tmp_path_factory.mktemp("examples"))
    demo, url = start(Lens(runner=tiny), examples)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def image_pixels(page, elem_id):
    """The PNG the app rendered into an output image (fetched from its src, decoded losslessly)."""
    src = page.locator(f"#{elem_id} img").first.get_attribute("src")
    assert src, f"{elem_id} shows no image"
    response = page.request.get(src)
    assert response.ok, f"{elem_id}: GET {src} answered {response.status}"
    # lmms-eval's import (tests/test_lmms.py, collected in the same run) turns PIL's
    # LOAD_TRUNCATED_IMAGES on for the whole process: a file cut short must fail here, not decode as black.
    truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(io.BytesIO(response.body())) as img:
            return np.asarray(img.convert("RGB")), src
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


def decoded_until(page, elem_id, geom, palette, expected, seconds=20, view=lambda codes: codes):
    """The image's decoded categories (through ``view``), re-read until they equal ``expected`` or
    the time is up. Gradio resolves an <img>'s new URL asynchronously, so the picture may lag the
    status line or caption that arrived in the same response; under load by a second or more."""
    deadline = time.time() + seconds
    while True:
        px, src = image_pixels(page, elem_id)
        got = view(vis.decode_categories(px, geom, palette))
        if np.array_equal(got, expected):
            return got
        if time.time() > deadline:
            colours = np.unique(px.reshape(-1, 3), axis=0)
            print(f"{elem_id}: {src} is {px.shape[1]} x {px.shape[0]} px, {len(colours)} colours "
                  f"(first: {colours[:8].tolist()}); status: {page.locator('#status').inner_text()!r}")
            return got
        time.sleep(0.2)


def wait_status(page, text, timeout=90_000):
    page.wait_for_function(
        "t => { const e = document.querySelector('#status'); return e && e.innerText.includes(t); }",
        arg=text, timeout=timeout)


def open_tab(page, name):
    page.get_by_role("tab", name=name).click()


def kept_from_records(trace, layer):
    toks = trace.arrays[f"stage2.L{layer}.tokens"]
    status = trace.arrays[f"stage2.L{layer}.status"]
    groups = trace.arrays["tokens.groups"]
    kept = np.zeros(trace.grid * trace.grid, bool)
    for t in toks[status != DROPPED]:
        kept[groups[t][groups[t] >= 0]] = True
    return kept.reshape(trace.grid, trace.grid)


def run_example(page):
    page.locator("#examples").get_by_text("what color is the square?").first.click()
    page.wait_for_function("() => document.querySelector('#image_in img') !== null", timeout=30_000)
    page.click("#run_btn")
    wait_status(page, "Done:")


def download_traces(page, folder) -> list:
    """Click every trace link of the page; the paths of the files it downloaded into ``folder``."""
    links = page.locator("#trace_files a")
    links.first.wait_for()
    paths = []
    for i in range(links.count()):
        with page.expect_download() as dl:
            links.nth(i).click()
        p = folder / dl.value.suggested_filename
        dl.value.save_as(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def visit(app, browser, tmp_path_factory):
    """One visitor's page after running the example, with both traces downloaded from it."""
    page = new_page(browser, viewport={"width": 1500, "height": 1300}, accept_downloads=True)
    page.goto(app)
    page.wait_for_selector("#run_btn")
    run_example(page)
    paths = download_traces(page, tmp_path_factory.mktemp("downloads"))
    traces = [Trace.load(p) for p in paths]
    md = next(t for t in traces if t.meta["config"]["filter"])
    yield {"page": page, "paths": paths, "traces": traces, "md": md, "geom": vis.geometry(md, CANVAS)}
    page.close()


def wait_layer_caption(page, layer):
    page.wait_for_function("t => document.querySelector('#layer_md').innerText.includes(t)",
                           arg=f"LLM layer {layer} of", timeout=20_000)


def test_run_names_the_ground_truth(visit):
    page = visit["page"]
    assert "ground-truth outlines available" in page.locator("#status").inner_text()
    assert "The object the question asks about covers 36 patches" in page.locator("#layer_md").inner_text()


def test_both_traces_download(visit):
    assert len(visit["traces"]) == 2 and sum(t.is_vanilla for t in visit["traces"]) == 1


@pytest.mark.parametrize("tab,ids", [("1a merge", ["img_merge", "img_sim"]), ("1b key set", ["img_key"]),
                                     ("2 filter", ["img_filter", "img_gs", "img_im"]), ("3 KV cache", ["img_kv"])])
def test_every_stage_overlay_is_drawn(visit, tab, ids):
    page, geom = visit["page"], visit["geom"]
    open_tab(page, tab)
    for elem in ids:
        page.locator(f"#{elem} img").first.wait_for(state="visible")
        px, _ = image_pixels(page, elem)
        assert px.shape == (geom.size, geom.size, 3), elem


def test_counts_and_cost(visit):
    page = visit["page"]
    open_tab(page, "Counts and cost")
    page.locator("#plot_curve .js-plotly-plot").first.wait_for(timeout=30_000)
    assert "compute convention" in page.locator("#summary_md").inner_text()


def test_drawn_kept_mask_is_the_traced_kept_set(visit):
    """The kept mask drawn for the prune layer shown equals the trace's kept set."""
    page, md = visit["page"], visit["md"]
    open_tab(page, "2 filter")
    kept = kept_from_records(md, md.prune_layers[0])
    drawn = decoded_until(page, "img_filter", visit["geom"], vis.STATUS_COLOURS, kept,
                          view=lambda codes: np.isin(codes, vis.KEPT_STATUSES))
    assert np.array_equal(drawn, kept)


def test_layer_slider_redraws_the_kv_view_from_the_trace(visit):
    page, md = visit["page"], visit["md"]
    target = md.prune_layers[-1] + 1 if md.prune_layers[-1] + 1 < md.num_layers else md.num_layers - 1
    open_tab(page, "3 KV cache")
    box = page.locator("#layer_slider input[type=number]")
    box.fill(str(target))
    box.press("Enter")
    wait_layer_caption(page, target)
    expected = vis.kv_map(md, target)
    assert not np.array_equal(expected, vis.kv_map(md, 0)), "pick a layer whose KV view differs"
    assert np.array_equal(decoded_until(page, "img_kv", visit["geom"], vis.KV_COLOURS, expected), expected)
    ms = float(re.search(r"drawn from the trace in (\d+) ms", page.locator("#layer_md").inner_text()).group(1))
    assert ms < 500


def test_click_on_an_overlay_inspects_that_patch(visit):
    page, md = visit["page"], visit["md"]
    open_tab(page, "2 filter")
    img = page.locator("#img_filter img").first
    bb = img.bounding_box()
    r, c = 5, 7
    img.click(position={"x": (c + 0.5) / md.grid * bb["width"], "y": (r + 0.5) / md.grid * bb["height"]})
    page.wait_for_function("t => document.querySelector('#inspect_md').innerText.includes(t)",
                           arg=f"Patch ({r}, {c})", timeout=20_000)
    text = page.locator("#inspect_md").inner_text()
    assert "Stage 1a" in text and "Stage 3" in text


def test_row_and_column_inspect_a_patch(visit):
    page = visit["page"]
    page.locator("#row_in input").fill("20")
    page.locator("#col_in input").fill("3")
    page.click("#inspect_btn")
    page.wait_for_function("t => document.querySelector('#inspect_md').innerText.includes(t)",
                           arg="Patch (20, 3)", timeout=20_000)


def test_slides_export(visit):
    page = visit["page"]
    page.click("#slides_btn")
    wait_status(page, "slides exported")
    names = page.locator("#slides_files").inner_text()
    assert ".png" in names and ".pdf" in names


def test_uploaded_traces_replay_every_view(visit):
    """Upload the downloaded traces again: every view replays, no model call."""
    page, md = visit["page"], visit["md"]
    layer = md.prune_layers[0]
    page.locator("#trace_upload input[type=file]").set_input_files([str(p) for p in visit["paths"]])
    wait_status(page, "Replaying")
    open_tab(page, "2 filter")
    wait_layer_caption(page, layer)
    kept = kept_from_records(md, layer)
    drawn = decoded_until(page, "img_filter", visit["geom"], vis.STATUS_COLOURS, kept,
                          view=lambda codes: np.isin(codes, vis.KEPT_STATUSES))
    assert np.array_equal(drawn, kept)
    assert "matching image" in page.locator("#status").inner_text()


def test_hostile_upload_gets_a_message(visit, tmp_path):
    """A hostile file: a clear message, and the app keeps working."""
    page = visit["page"]
    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(b"\xff" * 100)
    page.locator("#trace_upload input[type=file]").set_input_files([str(bad)])
    wait_status(page, "not a MustDrop trace")
    assert "Traceback" not in page.content()


# ----------------------------------------------------------------------------- screenshots
def screenshots(model: str, out: Path, examples_dir: Path | None = None):
    """Take the docs/ screenshots of the main views with the given model."""
    from playwright.sync_api import sync_playwright

    lens = Lens(model)
    lens.load()
    import tempfile
    examples = load_examples(examples_dir) if examples_dir and examples_dir.exists() \
        else make_examples(Path(tempfile.mkdtemp()))
    demo, url = start(lens, examples)
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = b.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url)
            page.wait_for_selector("#run_btn")
            page.locator("#examples").get_by_text(examples[0].questions[0]).first.click()
            time.sleep(1)
            page.click("#run_btn")
            wait_status(page, "Done:", 300_000)
            time.sleep(1)
            page.screenshot(path=str(out / "app-overview.png"), full_page=False)
            for tab, name in [("2 filter", "app-stage2-filter.png"), ("3 KV cache", "app-stage3-kv.png")]:
                open_tab(page, tab)
                time.sleep(1.5)
                page.locator(".tabs").last.screenshot(path=str(out / name))
            open_tab(page, "2 filter")
            img = page.locator("#img_filter img").first
            bb = img.bounding_box()
            img.click(position={"x": bb["width"] * 0.6, "y": bb["height"] * 0.5})
            time.sleep(1.5)
            page.screenshot(path=str(out / "app-inspector.png"), full_page=True)
            b.close()
    finally:
        demo.close()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--screenshots", action="store_true")
    ap.add_argument("--model", default="assets/toy-llava")     # resolved by the app against its folder
    ap.add_argument("--out", default=str(ROOT / "docs"))
    a = ap.parse_args()
    if a.screenshots:
        screenshots(a.model, Path(a.out), ROOT / "assets" / "examples")


def test_two_visitors_and_a_bad_image(app, browser, tmp_path):
    """Two sessions run at once and each sees its own question; a non-image gets a message."""
    from conftest import half_textured_image

    pages = [new_page(browser, viewport={"width": 1400, "height": 1000}) for _ in range(2)]
    img = tmp_path / "scene.png"
    half_textured_image(seed=1).save(img)
    questions = ["how many shapes are there?", "what shape is the yellow one?"]
    for page, q in zip(pages, questions):
        page.goto(app)
        page.wait_for_selector("#run_btn")
        page.locator("#image_in input[type=file]").set_input_files(str(img))
        page.wait_for_function("() => document.querySelector('#image_in img') !== null", timeout=30_000)
        page.locator("#question_in textarea").fill(q)
    for page in pages:
        page.click("#run_btn")
    for page, q in zip(pages, questions):
        wait_status(page, "Done:")
        assert q in page.locator("#q_md").inner_text()
    page = pages[0]
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    page.locator("#image_in button[aria-label='Remove Image']").first.click()
    page.locator("#image_in input[type=file]").set_input_files(str(bad))
    time.sleep(1)
    page.click("#run_btn")
    wait_status(page, "Problem:")
    assert "not an image" in page.locator("#status").inner_text()
    for p in pages:
        p.close()


def test_every_preset_can_be_chosen_before_and_after_a_run(app, browser):
    """Choosing a preset fills the advanced panel (or leaves it, for custom) without a server error."""
    page = new_page(browser, viewport={"width": 1400, "height": 1000})
    page.goto(app)
    page.wait_for_selector("#run_btn")
    for name in ["custom", "128", "custom", "off", "64"]:
        page.locator("#preset_in").get_by_label(name, exact=True).check()
        time.sleep(0.5)
    run_example(page)
    page.locator("#preset_in").get_by_label("custom", exact=True).check()
    time.sleep(1)
    assert "Problem" not in page.locator("#status").inner_text()
    page.close()


def wait_text(page, elem_id, text, present=True, timeout=20_000):
    page.wait_for_function(
        "([id, t, want]) => { const e = document.querySelector('#' + id);"
        " const has = !!e && e.innerText.includes(t); return has === want; }",
        arg=[elem_id, text, present], timeout=timeout)


def test_results_are_marked_stale_until_the_next_run(app, browser):
    page = new_page(browser, viewport={"width": 1400, "height": 1000})
    page.goto(app)
    page.wait_for_selector("#run_btn")
    run_example(page)
    assert "Stale" not in page.locator("#stale_md").inner_text()
    page.locator("#preset_in").get_by_label("128", exact=True).check()
    wait_text(page, "stale_md", "shown: preset 64; press Run for 128")
    page.locator("#preset_in").get_by_label("64", exact=True).check()
    wait_text(page, "stale_md", "Stale", present=False)
    page.locator("#compare_in input").click()              # another comparison is another run, too
    page.get_by_role("option", name="FastV").click()
    wait_text(page, "stale_md", "shown: preset 64; press Run for 64 compared with fastv")
    page.locator("#compare_in input").click()
    page.get_by_role("option", name="none").click()
    wait_text(page, "stale_md", "Stale", present=False)
    page.close()


def test_editing_a_knob_switches_to_custom_and_runs_it(app, browser):
    page = new_page(browser, viewport={"width": 1400, "height": 1000})
    page.goto(app)
    page.wait_for_selector("#run_btn")
    run_example(page)
    page.get_by_text("Advanced: every MustDrop knob").click()
    box = page.get_by_label("global threshold")
    box.fill("0.02")
    box.press("Tab")
    page.wait_for_function("() => document.querySelector('#preset_in input[value=custom]').checked", timeout=20_000)
    wait_text(page, "stale_md", "shown: preset 64; press Run for custom")
    page.click("#run_btn")
    wait_status(page, "(custom)")
    wait_text(page, "stale_md", "Stale", present=False)
    page.close()


# ----------------------------------------------------------------------------- layout: desktop and phone
VIEWPORTS = {"1440x900": {"width": 1440, "height": 900}, "390x844": {"width": 390, "height": 844}}
TABS = ["1a merge", "1b key set", "2 filter", "3 KV cache", "Counts and cost"]

# Words of table cells, labels and tab buttons laid out over two lines, and boxes whose text is cut
# (scrollWidth > clientWidth: those, and any text shortened with an ellipsis, as gradio shortens file
# names); a break at a hyphen or slash is a break between words.
FIT_JS = """() => {
  const broken = [], clipped = [];
  for (const el of document.querySelectorAll('td, th, label, [data-testid=block-info], [role=tab]')) {
    if (!el.offsetParent) continue;
    if (el.scrollWidth > el.clientWidth + 1) clipped.push(el.innerText.slice(0, 60) + ` (${el.scrollWidth} > ${el.clientWidth} px)`);
    const walk = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    for (let n = walk.nextNode(); n; n = walk.nextNode()) {
      for (const m of n.data.matchAll(/[^\\s\\-\\/]+/g)) {
        const r = document.createRange();
        r.setStart(n, m.index); r.setEnd(n, m.index + m[0].length);
        const tops = new Set(Array.from(r.getClientRects()).filter(b => b.width > 0).map(b => Math.round(b.top)));
        if (tops.size > 1) broken.push(m[0]);
      }
    }
  }
  for (const el of document.querySelectorAll('*')) {          // text gradio shortens with an ellipsis
    if (el.offsetParent && el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).textOverflow === 'ellipsis')
      clipped.push(el.innerText.slice(0, 60) + ` (${el.scrollWidth} > ${el.clientWidth} px, ellipsis)`);
  }
  return {broken: [...new Set(broken)], clipped: [...new Set(clipped)],
          page_width: document.documentElement.scrollWidth, window_width: window.innerWidth};
}"""


def box(page, selector):
    return page.evaluate("s => { const r = document.querySelector(s).getBoundingClientRect();"
                         " return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, h: innerHeight}; }", selector)


def wait_in_view(page, selector, upper_half=False, timeout=10_000):
    """Wait until the element's top is inside the window (in its upper half); False if it never is."""
    try:
        page.wait_for_function(
            "([s, half]) => { const e = document.querySelector(s); if (!e) return false;"
            " const t = e.getBoundingClientRect().top; return t >= 0 && t < (half ? innerHeight / 2 : innerHeight - 40); }",
            arg=[selector, upper_half], timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - playwright's timeout: the caller asserts
        return False


@pytest.fixture(scope="module", params=list(VIEWPORTS), ids=list(VIEWPORTS))
def fresh(request, app, browser):
    """One page per window size: what it showed before the first run, then the example run."""
    page = new_page(browser, viewport=VIEWPORTS[request.param])
    page.goto(app)
    page.wait_for_selector("#run_btn")
    before = page.evaluate("""() => ({
        question: document.querySelector('#question_in textarea').value,
        image: document.querySelector('#image_in img') !== null,
        slider_max: Number(document.querySelector('#layer_slider input[type=range]').max),
        examples_top: document.querySelector('#examples').getBoundingClientRect().top,
        first_example_bottom: document.querySelector('#examples tbody tr').getBoundingClientRect().bottom})""")
    page.locator("#examples").get_by_text("what color is the square?").first.click()
    page.wait_for_function("() => document.querySelector('#image_in img') !== null", timeout=30_000)
    chosen = page.locator("#question_in textarea").input_value()
    page.click("#run_btn")
    wait_status(page, "Done:")
    results_in_view = wait_in_view(page, "#results", upper_half=True)
    yield {"page": page, "size": VIEWPORTS[request.param], "before": before, "chosen": chosen,
           "results_in_view": results_in_view, "results": box(page, "#results")}
    page.close()


def test_before_the_first_run_the_page_fits_the_model(fresh, tiny):
    before = fresh["before"]
    assert before["question"] == "" and not before["image"]          # no question without an image
    assert fresh["chosen"] == "what color is the square?"           # the example brings its question
    assert before["slider_max"] == tiny.num_layers - 1               # layers count from 0
    if fresh["size"]["width"] == 1440:                               # the first example above the fold
        assert before["examples_top"] < 900 and before["first_example_bottom"] <= 900, before


def test_results_come_into_view_after_run(fresh):
    assert fresh["results_in_view"], f"results column at {fresh['results']} after Run"


def test_every_tab_can_be_reached(fresh):
    page, width = fresh["page"], fresh["size"]["width"]
    for name in TABS:
        tab = page.get_by_role("tab", name=name)
        tab.scroll_into_view_if_needed()
        bb = tab.bounding_box()
        assert bb and bb["x"] >= 0 and bb["x"] + bb["width"] <= width, (name, bb)
        tab.click()
        page.wait_for_function("n => [...document.querySelectorAll('[role=tab]')].some("
                               "b => b.innerText === n && b.getAttribute('aria-selected') === 'true')", arg=name)


def test_inspector_comes_into_view_after_a_click_on_an_overlay(fresh):
    page = fresh["page"]
    open_tab(page, "2 filter")
    img = page.locator("#img_filter img").first
    img.scroll_into_view_if_needed()
    bb = img.bounding_box()
    side = min(bb["width"], bb["height"])         # the square overlay, centred in its box (object-fit: contain)
    r, c = 6, 9
    img.click(position={"x": (bb["width"] - side) / 2 + (c + 0.5) / 24 * side,
                        "y": (bb["height"] - side) / 2 + (r + 0.5) / 24 * side})
    wait_text(page, "inspect_md", f"Patch ({r}, {c})")
    assert wait_in_view(page, "#inspect_md"), f"inspector at {box(page, '#inspect_md')}"


def test_tables_and_labels_fit_without_broken_words(fresh):
    page = fresh["page"]
    page.locator("#row_in input").fill("3")
    page.locator("#col_in input").fill("4")
    page.click("#inspect_btn")
    wait_text(page, "inspect_md", "Patch (3, 4)")
    assert page.locator("#inspect_md table").count() >= 1            # the lifecycle table is among those checked
    for accordion in ["Advanced: every MustDrop knob", "Decoding"]:  # and every knob's label
        page.get_by_text(accordion).first.click()
    page.get_by_label("individual threshold").wait_for()
    for name in TABS:
        open_tab(page, name)
        deadline = time.time() + 10
        while True:   # the tab strip and the panels settle a moment after a tab or an accordion opens
            fit = page.evaluate(FIT_JS)
            if (not fit["broken"] and not fit["clipped"]) or time.time() > deadline:
                break
            time.sleep(0.3)
        assert not fit["broken"] and not fit["clipped"], (name, fit)
        assert fit["page_width"] <= fit["window_width"], (name, fit)   # no sideways scrolling of the page
