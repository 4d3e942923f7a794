"""The Dataset tab in Debian's chromium: open a run -> filter the lost answers -> click a row -> the
sample's 2 filter tab, drawn from its traces (pixels read back against the trace).

Run: pytest -m browser tests/test_browser_dataset.py
"""

import shutil

import numpy as np
import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, SERVER_ERRORS, browser, decoded_until, new_page, wait_status  # noqa: F401
from test_browser import no_server_errors, watch_server  # noqa: F401 - the autouse fixtures apply here too

from conftest import free_port, serving
from lens_app.app import build_app, launch
from lens_app.engine import Lens
from lens_app.session import CANVAS
from mustdrop import vis
from mustdrop.dataset import TraceSet

pytestmark = [pytest.mark.browser]


@pytest.fixture(scope="module")
def dataset_app(dataset_run, tmp_path_factory):
    runs = tmp_path_factory.mktemp("browser-runs")
    shutil.copytree(dataset_run, runs / "toy6")
    with serving(build_app(Lens(runner=None), examples=[], runs_dir=runs)) as url:
        yield url, runs / "toy6"


def open_run(page, name):
    page.get_by_role("tab", name="Dataset").click()
    page.locator("#ds_run input").click()
    page.get_by_role("option", name=name).click()
    page.wait_for_function("() => document.querySelector('#ds_info').innerText.includes('rows')", timeout=90_000)


ROWS = "#ds_table .virtual-body [role=row]"          # gradio's virtual table: one div row per shown row


def table_ids(page):
    return page.locator(ROWS).evaluate_all(
        "rows => rows.map(r => Array.from(r.querySelectorAll('[role=gridcell]')).slice(0, 2)"
        ".map(c => c.innerText.trim()))")


def test_open_run_filter_lost_click_opens_the_samples_filter_tab(dataset_app, browser):
    url, run = dataset_app
    ts = TraceSet.open(run)
    from mustdrop.dataset import aggregate as A
    flips = A.flips(ts)
    lost = sorted(zip(flips["id"][flips["lost"]], flips["config"][flips["lost"]]))
    assert lost, "the run must have lost answers"
    page = new_page(browser, viewport={"width": 1500, "height": 1300})
    page.goto(url)
    open_run(page, "toy6")
    page.locator("#ds_verdict").get_by_text("lost", exact=True).click()
    page.wait_for_function("([sel, n]) => document.querySelectorAll(sel).length === n",
                           arg=[ROWS, len(lost)], timeout=30_000)
    rows = table_ids(page)
    assert sorted(tuple(r) for r in rows) == lost
    sid, cfg = rows[0]
    page.locator(ROWS).filter(has_text=sid).first.locator("[role=gridcell]").nth(3).click()
    wait_status(page, "Opened")
    assert page.get_by_role("tab", name="2 filter").get_attribute("aria-selected") == "true"
    md = ts.trace(sid, "64")                     # methods A / B are 64 / fastv@64: the MustDrop trace is shown
    expected = vis.status_map(md, md.start_layer)
    codes = decoded_until(page, "img_filter", vis.geometry(md, CANVAS),
                          {**vis.STATUS_COLOURS, vis.NO_TOKEN_CODE: vis.NO_TOKEN}, expected)
    np.testing.assert_array_equal(codes, expected)
    assert sid in page.locator("#status").inner_text()
    page.close()


def screenshot(runs_dir, run: str, out: str) -> None:
    """docs/app-dataset.png: the Dataset tab on a run under ``runs_dir``, lost answers listed."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from playwright.sync_api import sync_playwright

    demo = build_app(Lens(runner=None), examples=[], runs_dir=runs_dir)
    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = b.new_page(viewport={"width": 1440, "height": 2200})
            page.goto(f"http://127.0.0.1:{port}/")
            open_run(page, run)
            page.locator("#ds_verdict").get_by_text("lost", exact=True).click()
            page.wait_for_timeout(3000)
            page.locator("#tab_dataset").screenshot(path=out)
            b.close()
    finally:
        demo.close()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="screenshot of the Dataset tab for docs/")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--run", default="toy-llava-test-n200")
    ap.add_argument("--out", default="docs/app-dataset.png")
    a = ap.parse_args()
    screenshot(a.runs, a.run, a.out)
