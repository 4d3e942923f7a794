"""Many visitors at once: 8 users x 3 /analyze requests in parallel against one live app are all
served, and each MustDrop trace equals the trace of the same request run alone (bit for bit, all
but the timings). Replays run through their own bounded queue beside them."""

import threading

import numpy as np
import pytest

from lens_app import app as lens_app_app, engine
from mustdrop.trace import Trace
from conftest import serving

USERS, REQUESTS = 8, 3
QUESTIONS = ["what color is the square?", "how many shapes are there?", "what shape is on the left?",
             "is there a circle?"]
PRESETS = ["192", "128", "64"]


@pytest.fixture(scope="module")
def url(tiny):
    with serving(lens_app_app.build_app(engine.Lens(runner=tiny), examples=[])) as url:
        yield url


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from conftest import half_textured_image

    path = tmp_path_factory.mktemp("concurrency") / "scene.png"
    half_textured_image().save(path)
    return path


def request(client, image, question, preset) -> Trace:
    from gradio_client import handle_file

    path = client.predict(handle_file(str(image)), question, preset, api_name="/analyze")[0]
    return Trace.load(path)


def same_run(a: Trace, b: Trace) -> bool:
    """Equal traces, but for how long the run took."""
    strip = lambda t: {k: v for k, v in t.meta.items() if k != "timings"}   # noqa: E731
    return (strip(a) == strip(b) and a.arrays.keys() == b.arrays.keys()
            and all(np.array_equal(a.arrays[k], b.arrays[k], equal_nan=True) for k in a.arrays))


def test_eight_users_three_requests_each_get_their_solo_traces(url, image):
    from gradio_client import Client

    plan = {u: [(QUESTIONS[u % len(QUESTIONS)], PRESETS[r]) for r in range(REQUESTS)] for u in range(USERS)}
    solo_client = Client(url, verbose=False)
    solo = {req: request(solo_client, image, *req) for req in sorted({r for reqs in plan.values() for r in reqs})}
    first, second = sorted(solo)[:2]
    assert not same_run(solo[first], solo[second])         # the comparison tells two runs apart

    got, errors = {}, []

    def user(u):
        try:
            c = Client(url, verbose=False)
            for r, req in enumerate(plan[u]):
                got[u, r] = request(c, image, *req)
        except Exception as e:  # noqa: BLE001 - reported below, with the user
            errors.append((u, repr(e)))

    threads = [threading.Thread(target=user, args=(u,)) for u in range(USERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert len(got) == USERS * REQUESTS
    for (u, r), trace in got.items():
        assert same_run(trace, solo[plan[u][r]]), (u, r, plan[u][r])


def test_replays_in_parallel_are_all_served(url, image):
    """Replay goes through the queue now (concurrency 2): parallel replays wait their turn, and all
    are answered."""
    from gradio_client import Client, handle_file

    c = Client(url, verbose=False)
    path = c.predict(handle_file(str(image)), QUESTIONS[0], "64", api_name="/analyze")[0]
    statuses, errors = [], []

    def user():
        try:
            res = Client(url, verbose=False).predict([handle_file(path)], None, True, api_name="/replay")
            statuses.append(next(x for x in res if isinstance(x, str) and x.startswith("**Replaying")))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=user) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(statuses) == 6, errors
