"""A trace with script, markup, links and LaTeX in its strings, uploaded through the page in Debian's
chromium: no script runs, no link to the attacker appears, and the strings show as text.

Run: pytest -m browser tests/test_browser_xss.py
"""

import pytest

from test_browser import browser, new_page, no_server_errors, start, wait_status, watch_server  # noqa: F401
from test_xss import IMG, SCRIPT, traces  # noqa: F401

from lens_app.engine import Lens

pytestmark = [pytest.mark.browser]


@pytest.fixture(scope="module")
def app(tiny):
    demo, url = start(Lens(runner=tiny), [])
    yield url
    demo.close()


def test_an_uploaded_hostile_trace_runs_no_script_and_shows_its_text(app, browser, traces):
    _, paths = traces
    page = new_page(browser, viewport={"width": 1400, "height": 1200})
    page.goto(app)
    page.wait_for_selector("#run_btn")
    page.locator("#trace_upload input[type=file]").set_input_files([str(p) for p in paths])
    wait_status(page, "Replaying")
    for tab in ("1a merge", "1b key set", "2 filter", "Compare"):
        page.get_by_role("tab", name=tab).click()
    page.wait_for_timeout(1500)                        # onerror of a broken <img> fires asynchronously
    assert page.evaluate("() => window.__xss") is None
    assert page.locator("a[href*='evil']").count() == 0
    assert page.locator("img[src='x'], script:has-text('__xss')").count() == 0
    status = page.locator("#status").inner_text()
    assert "[sign in again](https://evil.example)" in status and SCRIPT in status
    assert IMG in page.locator("#q_md").inner_text()
    page.get_by_role("tab", name="1a merge").click()
    assert "merge threshold" in page.content() and "window.__xss=1" in page.locator("body").inner_text()
    page.close()
