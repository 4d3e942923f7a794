"""A same-budget comparison in the page (Debian's chromium, Playwright, the tiny model): choose
"compare with FastV", run, and the Compare view shows the kept patches both traces record, at the
layer on the slider.

Run: pytest -m browser tests/test_browser_compare.py
"""


import numpy as np

from test_browser import (CANVAS, Trace, app, browser, decoded_until, download_traces, new_page, no_server_errors,  # noqa: F401
                          open_tab, pytestmark, run_example, vis, wait_layer_caption, wait_status, watch_server)
from test_compare_view import kept_from_records


def test_a_comparison_runs_and_draws_both_kept_sets(app, browser, tmp_path):  # noqa: F811
    from mustdrop.vis import compare as vc

    page = new_page(browser, viewport={"width": 1500, "height": 1300}, accept_downloads=True)
    page.goto(app)
    page.wait_for_selector("#run_btn")
    page.locator("#compare_in input").click()
    page.get_by_role("option", name="FastV").click()
    run_example(page)
    assert "and fastv@64" in page.locator("#status").inner_text()
    traces = [Trace.load(p) for p in download_traces(page, tmp_path)]
    assert len(traces) == 3
    other = next(t for t in traces if t.meta["config"]["method"] == "fastv")
    md = next(t for t in traces if t.meta["config"]["method"] == "mustdrop" and not t.is_vanilla)
    geom = vis.geometry(md, CANVAS)
    open_tab(page, "Compare")
    for layer in (md.start_layer, md.num_layers - 1):
        if layer != md.start_layer:
            box = page.locator("#layer_slider input[type=number]")
            box.fill(str(layer))
            box.press("Enter")
            wait_layer_caption(page, layer)
        a, b = kept_from_records(md, layer), kept_from_records(other, layer)
        kept = np.where(b, vc.KEPT, vc.NOT_KEPT)
        assert np.array_equal(decoded_until(page, "img_cmp_other", geom, vc.kept_colours("other"), kept), kept)
        overlap = np.where(a & b, vc.BOTH, np.where(a, vc.ONLY_MUSTDROP, np.where(b, vc.ONLY_OTHER, vc.NEITHER)))
        assert np.array_equal(decoded_until(page, "img_cmp_overlap", geom, vc.OVERLAP_COLOURS, overlap), overlap)
        page.wait_for_function("t => document.querySelector('#compare_md').innerText.includes(t)",
                               arg=f"after LLM layer {layer}", timeout=20_000)
        text = page.locator("#compare_md").inner_text()
        counts = "\t".join(str(int(m.sum())) for m in (a & b, a & ~b, ~a & b, ~a & ~b))
        assert counts in text, text
        assert other.answer.strip()[:10] in text
    if __import__("os").environ.get("COMPARE_SCREENSHOT"):
        page.screenshot(path=__import__("os").environ["COMPARE_SCREENSHOT"], full_page=True)
    page.click("#slides_btn")                       # the slide of a session with a comparison exports too
    wait_status(page, "slides exported")
    page.close()
