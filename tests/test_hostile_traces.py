"""Hostile traces (issue 24): a few KB claiming sizes no supported model produces, and fields of the
wrong type, get one TraceError naming the field through the library, the app's /replay and both
CLIs (exit code 2, no traceback), before anything is allocated from the claims; the server keeps
serving, and four bombs replayed at once stay within 100 MB of the server's memory before."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import corpus
from test_app import md_plain
from mustdrop.trace import STATUS_NAMES, Trace, TraceError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
HOSTILE = {**corpus.TRACE_BOMBS, **corpus.TRACE_WRONG_TYPES}


@pytest.fixture(scope="module")
def good():
    """A real trace (LLaVA-1.5 layout, toy model) as the base of every hostile rewrite."""
    return Trace.load(FIXTURES / "v1-llava-64.safetensors")


@pytest.fixture(scope="module")
def hostile(good, tmp_path_factory):
    return corpus.hostile_trace_files(tmp_path_factory.mktemp("hostile"), good)


def assert_names(msg, words):
    msg = md_plain(msg)                       # the status line is escaped Markdown
    assert any(w in msg for w in words), f"message {msg!r} names none of {words}"


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_library_refuses_with_the_field_named(hostile, name):
    path, words = hostile[name]
    with pytest.raises(TraceError) as e:
        Trace.load(path)
    msg = str(e.value)
    assert_names(msg, words)
    assert "Error:" not in msg and "broadcast" not in msg, f"raw exception text in {msg!r}"


def test_mistyped_counts_are_named_not_contradicted(hostile):
    """'kv.L0 has 45 entries, metadata says 45' came from comparing an int with the string '45'."""
    path, _ = hostile["kv_entries_as_text"]
    with pytest.raises(TraceError) as e:
        Trace.load(path)
    assert "metadata says" not in str(e.value) and "must be an integer" in str(e.value)


def test_bombs_are_refused_before_their_arrays_are_read(hostile, monkeypatch):
    """The claims are checked on the header alone: no tensor of a bomb is ever read."""
    from safetensors import safe_open

    reads = []
    real = safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, k):
            reads.append(k)
            return self.inner.get_tensor(k)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr("safetensors.safe_open", Spy)
    for name in corpus.TRACE_BOMBS:
        with pytest.raises(TraceError):
            Trace.load(hostile[name][0])
    assert reads == []


def test_status_codes_checked_are_the_trace_codes():
    assert sorted(STATUS_NAMES) == list(range(6))


def test_deep_nesting_is_refused_without_recursion():
    from mustdrop import trace_checks

    for text in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        with pytest.raises(TraceError, match="nested"):
            trace_checks.parse_meta(text)
    # brackets inside strings do not count as nesting
    assert trace_checks.parse_meta('{"q": "' + "[" * 1000 + '\\" {{"}')["q"].startswith("[[")


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.safetensors")), ids=lambda p: p.name)
def test_every_fixture_still_loads_unchanged(path):
    from mustdrop import trace_checks

    t = Trace.load(path)
    t.validate()
    assert t.grid <= trace_checks.MAX_GRID and t.n_crops <= trace_checks.MAX_CROPS


def test_bounds_leave_room_for_the_supported_models():
    """LLaVA-1.5 (24), SigLIP (27 x 27), NeXT (5 crops), OneVision anyres_max_9 (37 crops of 27 x 27)
    at 80 LLM layers all fit; a 512 or 1024 grid does not."""
    from mustdrop import trace_checks

    assert 27 <= trace_checks.MAX_GRID and 512 * 512 > trace_checks.MAX_PATCHES
    assert 37 * 27 * 27 <= trace_checks.MAX_PATCHES
    assert 37 * 27 * 27 * 80 <= trace_checks.MAX_PATCH_LAYERS
    assert 37 * 384 * 384 <= trace_checks.MAX_VIEW_PIXELS


# ---------------------------------------------------------------- the app
@pytest.fixture(scope="module")
def server(tiny):
    from conftest import serving
    from lens_app import app as lens_app_app, engine

    with serving(lens_app_app.build_app(engine.Lens(runner=tiny), examples=[])) as url:
        yield url


def replay(url, *paths):
    from gradio_client import Client, handle_file
    res = Client(url, verbose=False).predict([handle_file(str(p)) for p in paths], None, True, api_name="/replay")
    return next((x for x in res if isinstance(x, str) and x.startswith(("**Problem", "**Replaying"))), None)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_app_replay_gives_a_message_and_keeps_serving(server, hostile, name):
    path, words = hostile[name]
    status = replay(server, path)
    assert status is not None and status.startswith("**Problem:**"), status
    assert "internal error" not in status and "Traceback" not in status, status
    assert_names(status, words)


def test_app_still_replays_good_traces_after_hostile_ones(server, hostile):
    for name in ("grid_1024", "stage2_as_string"):
        replay(server, hostile[name][0])
    status = replay(server, FIXTURES / "v1-llava-64.safetensors", FIXTURES / "v1-llava-off.safetensors")
    assert status.startswith("**Replaying**") and "with vanilla" in status, status


def rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def test_four_bombs_at_once_stay_within_100_mb(server, hostile):
    """The small-trace bombs through /replay, four users at once: each refused, and the server's
    memory (sampled every 5 ms while they run) within 100 MB of before. Unbounded, one 1024 grid
    cost ~4 GB."""
    bombs = list(corpus.TRACE_BOMBS)
    assert len(bombs) == 4
    replay(server, hostile["grid_512"][0])        # warm the client and server paths once
    base, peak, done = rss(), [rss()], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    statuses = {}

    def user(name):
        statuses[name] = replay(server, hostile[name][0])

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    users = [threading.Thread(target=user, args=(n,)) for n in bombs]
    for t in users:
        t.start()
    for t in users:
        t.join(300)
    elapsed = time.perf_counter() - t0
    done.set()
    sampler.join()
    growth = (peak[0] - base) / 2 ** 20
    print(f"\nfour bombs at once: {elapsed:.2f} s, peak RSS {peak[0] / 2 ** 20:.0f} MB "
          f"(+{growth:.1f} MB over {base / 2 ** 20:.0f} MB before)")
    assert all(not t.is_alive() for t in users), "a bomb replay did not finish"
    for name in bombs:
        assert statuses[name] and statuses[name].startswith("**Problem:**"), (name, statuses[name])
        assert_names(statuses[name], HOSTILE[name][1])
    assert growth < 100, f"peak RSS grew {growth:.0f} MB replaying four small-trace bombs"


# ---------------------------------------------------------------- the CLIs
CLI_CASES = ["grid_1024", "crops_400", "stage2_as_string", "token_ids_of_strings", "timings_as_text",
             "kv_entries_as_text", "empty_scores_full_status", "nested_100000_deep"]


def run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_show_and_vis_exit_2_without_a_traceback(hostile, name, tmp_path):
    path, words = hostile[name]
    for args in (("mustdrop", "show", str(path)), ("mustdrop.vis", str(path), "--out", str(tmp_path))):
        p = run(*args)
        assert p.returncode == 2, (args, p.returncode, p.stderr[-2000:])
        assert "Traceback" not in p.stderr and p.stderr.startswith("error: "), p.stderr[-2000:]
        assert_names(p.stderr, words)
    assert list(tmp_path.iterdir()) == [], "a refused trace draws nothing"


def test_cli_show_still_summarises_a_good_trace():
    p = run("mustdrop", "show", str(FIXTURES / "v1-llava-next-64.safetensors"))
    assert p.returncode == 0 and "stage 1a  2228 vision tokens -> 396 (2880 patches; base: 64 windows merged" in p.stdout


def test_a_refused_array_is_named_with_dtype_and_length(good, tmp_path):
    meta, arrays = corpus._claims(good)
    layer = good.prune_layers[2]
    arrays[f"stage2.L{layer}.global_share"] = np.arange(3)
    with pytest.raises(TraceError) as e:
        Trace.load(corpus._rewrite(tmp_path, "x", meta, arrays))
    V = good.meta["stage2"][2]["entering"]
    assert f"stage2.L{layer}.global_share must be a float (float32) array of {V} entries, got int64 of 3" in str(e.value)
