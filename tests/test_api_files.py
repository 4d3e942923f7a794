"""File payloads of the API, sent as an attacker would: raw HTTP calls to a live app.

A request may name only a file Gradio received or wrote for this app, an example image or a file of
the app's work folder; anything else is refused with one message, the same whether the file exists
or not. A data: URL image is held to the upload cap.
"""

import json
import os
import uuid
from pathlib import Path

import httpx
import pytest

from lens_app import app as lens_app_app, engine
from lens_app.examples import EXAMPLES_DIR
from lens_app.uploads import MAX_DATA_URL_CHARS, REFUSED, UploadGate, data_url_bytes
from mustdrop.trace import Trace
from conftest import serving
from test_app import RUN_DEFAULTS, status_of

QUESTION = "what color is the square?"
META = {"_type": "gradio.FileData"}


@pytest.fixture(scope="module")
def app(tiny):
    demo = lens_app_app.build_app(engine.Lens(runner=tiny), examples=[])
    with serving(demo) as url:
        yield demo, url.rstrip("/")


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """An image on the server, outside every folder a request may name, and a path that does not exist."""
    from conftest import half_textured_image

    d = tmp_path_factory.mktemp("server-files")
    half_textured_image().save(d / "secret.png")
    return d / "secret.png", d / "no-such-file.png"


def call(url: str, api: str, data: list) -> tuple[str, object]:
    """(event, data) of one call through Gradio's HTTP API (/gradio_api/call/<api>)."""
    r = httpx.post(f"{url}/gradio_api/call/{api}", json={"data": data}, timeout=60)
    r.raise_for_status()
    event_id = r.json()["event_id"]
    stream = httpx.get(f"{url}/gradio_api/call/{api}/{event_id}", timeout=300).text
    event, payload = None, None
    for line in stream.splitlines():
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: ") and event in ("complete", "error"):
            payload = json.loads(line[len("data: "):])
    return event, payload


def upload(url: str, path: Path) -> dict:
    """A file sent as the page and gradio_client send it: /upload, then its FileData."""
    with open(path, "rb") as f:
        r = httpx.post(f"{url}/gradio_api/upload", files={"files": (path.name, f)}, timeout=60)
    r.raise_for_status()
    return {"path": r.json()[0], "meta": META, "orig_name": path.name}


def analyze(url, image, preset="64"):
    return call(url, "analyze", [image, QUESTION, preset, "none"])


def run(url, image):
    return call(url, "run", [image, QUESTION, "64", *RUN_DEFAULTS.values()])


def replay(url, traces, image=None):
    return call(url, "replay", [traces, image, True])


def problem(result) -> str:
    """The message of a refused call: the error of an API endpoint, or the page's status line."""
    event, data = result
    if event == "error":
        return str((data or {}).get("error"))
    status = status_of(data)
    assert status is not None and status.startswith("**Problem:**"), f"not refused: {str(data)[:300]}"
    return status


def status(data) -> str:
    return next(x for x in data if isinstance(x, str) and x.startswith(("**Replaying", "**Done", "**Problem")))


def accepted(result) -> list:
    event, data = result
    assert event == "complete", data
    assert not any(isinstance(x, str) and x.startswith("**Problem:**") for x in data), data
    return data


# ---------------------------------------------------------------------------- refused


@pytest.mark.parametrize("endpoint", [analyze, run])
def test_image_outside_the_upload_folder_is_refused_alike_existing_or_not(app, outside, endpoint):
    secret, missing = outside
    said = [problem(endpoint(app[1], {"path": str(p)})) for p in (secret, missing)]
    assert said[0] == said[1] and REFUSED in said[0], said
    assert str(secret) not in said[0] and "not found" not in said[0]


@pytest.mark.parametrize("endpoint", [analyze, run])
def test_image_as_a_bare_path_string_is_refused_alike_existing_or_not(app, outside, endpoint):
    said = [problem(endpoint(app[1], str(p))) for p in outside]
    assert said[0] == said[1] and "secret" not in said[0], said


def test_replay_refuses_a_trace_the_app_was_not_given(app, outside):
    """With Gradio's meta marker, a path inside Gradio's upload folder passes Gradio's own check; a
    file there that was not uploaded to this app (another app's, or planted) is still refused, alike
    whether it exists."""
    from gradio.utils import get_upload_folder

    url = app[1]
    planted = Path(get_upload_folder()) / uuid.uuid4().hex / "planted.safetensors"
    planted.parent.mkdir(parents=True)
    stored = Path(accepted(analyze(url, upload(url, outside[0])))[0]["path"])
    planted.write_bytes(stored.read_bytes())
    try:
        said = [problem(replay(url, [{"path": str(p), "meta": META}]))
                for p in (planted, planted.with_name("missing.safetensors"))]
    finally:
        planted.unlink()
        planted.parent.rmdir()
    assert said[0] == said[1] and REFUSED in said[0], said


def test_replay_without_meta_is_refused_alike_existing_or_not(app, outside):
    url = app[1]
    said = [problem(replay(url, [{"path": str(p)}])) for p in (outside[0], outside[1])]
    assert said[0] == said[1], said


def test_replay_refuses_an_image_from_outside_alike_existing_or_not(app, outside):
    """The image box of the replay (the overlays are drawn on it) follows the same rule."""
    url = app[1]
    trace = accepted(analyze(url, upload(url, outside[0])))[0]
    said = [problem(replay(url, [trace], {"path": str(p)})) for p in outside]
    assert said[0] == said[1] and REFUSED in said[0], said


def test_symlinks_and_dot_dot_out_of_an_allowed_folder_are_refused(app, outside):
    demo, url = app
    link = Path(demo.workdir) / "link.png"
    link.symlink_to(outside[0])
    try:
        assert REFUSED in problem(analyze(url, {"path": str(link)}))
    finally:
        link.unlink()
    climb = os.path.relpath(outside[0], EXAMPLES_DIR)           # examples/../../...secret.png
    assert REFUSED in problem(analyze(url, {"path": str(EXAMPLES_DIR / climb)}))


def test_data_url_over_the_upload_cap_is_refused(app):
    body = "A" * (MAX_DATA_URL_CHARS + 4)
    said = problem(analyze(app[1], {"url": "data:image/png;base64," + body}))
    assert "larger than the upload limit of 64 MB" in said, said


def test_a_remote_url_is_not_fetched(app):
    assert REFUSED in problem(analyze(app[1], {"url": "http://127.0.0.1:9/secret.png"}))


# ---------------------------------------------------------------------------- accepted


def test_uploaded_image_works_and_its_trace_replays_when_sent_back(app, outside):
    url = app[1]
    data = accepted(analyze(url, upload(url, outside[0])))
    assert Trace.load(data[0]["path"]).meta["config"]["preset"] == "64"
    assert status(accepted(replay(url, [data[0]]))).startswith("**Replaying**")
    assert status(accepted(run(url, upload(url, outside[0])))).startswith("**Done:**")


def test_example_folder_image_works_without_meta(app):
    example = sorted(EXAMPLES_DIR.glob("scene_*.png"))[0]
    data = accepted(analyze(app[1], {"path": str(example)}))
    assert Trace.load(data[0]["path"]).answer == data[2]


def test_small_data_url_works(app, outside):
    import base64

    url = "data:image/png;base64," + base64.b64encode(outside[0].read_bytes()).decode()
    data = accepted(analyze(app[1], {"url": url}))
    assert Trace.load(data[0]["path"]).meta["config"]["preset"] == "64"


# ---------------------------------------------------------------------------- the gate on its own


def test_gate_without_an_app_accepts_only_its_folders_and_files(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "c.png").write_bytes(b"x")
    gate = UploadGate([tmp_path / "ok"], [tmp_path / "c.png"])
    assert gate.payload({"path": str(tmp_path / "ok" / "a.png")}) == str((tmp_path / "ok" / "a.png").resolve())
    assert gate.payload(str(tmp_path / "c.png")) == str((tmp_path / "c.png").resolve())
    for bad in (str(tmp_path / "b.png"), str(tmp_path / "ok" / ".." / "b.png"), str(tmp_path / "ok-not"),
                {"path": 3}, {"path": "a\0b"}, 3.5, {"url": "file:///etc/passwd"}):
        with pytest.raises(ValueError, match="not uploaded to this app"):
            gate.payload(bad)
    assert gate.payload({"path": None}) is None and gate.payload(None) is None


def test_data_url_is_refused_before_decoding(monkeypatch):
    import base64

    calls = []
    monkeypatch.setattr(base64, "b64decode", lambda *a, **k: calls.append(1) or b"")
    with pytest.raises(ValueError, match="upload limit"):
        data_url_bytes("data:image/png;base64," + "A" * (MAX_DATA_URL_CHARS + 1))
    assert calls == []
    with pytest.raises(ValueError, match="base64"):
        data_url_bytes("data:image/png,%89PNG")
