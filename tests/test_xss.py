"""Hostile strings in a trace (and from a user or an example file) reach the page as text: no markup,
no link, no LaTeX, no mathtext. A real trace of the tiny model has its metadata strings replaced by
payloads; every value the app returns for it into gr.HTML / gr.Markdown is rendered here with a
GFM Markdown renderer and must hold none of the payloads' elements. Also: a one-layer model's trace
replays (gradio refuses a slider whose minimum equals its maximum)."""

import re
from pathlib import Path

import numpy as np
import pytest

from lens_app import app as lens_app_app, engine
from mustdrop import vis
from mustdrop.config import ModelDefaults, MustDropConfig
from mustdrop.trace import Trace
from mustdrop.vis import compare as vc
from mustdrop.vis.text import html_text, md_code, md_text, md_value

IMG = '<img src=x onerror="window.__xss=1">'
SCRIPT = "<script>window.__xss=1</script>"
LINK = "`x` [sign in again](https://evil.example)"
MATH = "$\\over$"
LATEX = "$$\\href{https://evil.example}{x}$$"
PAYLOADS = (IMG, SCRIPT, LINK, MATH, LATEX)


def hostile_meta(meta: dict, n: int = 0) -> dict:
    """``meta`` with every string field the readers show replaced by a payload (``n`` rotates them)."""
    p = lambda k: PAYLOADS[(k + n) % len(PAYLOADS)] + " " + IMG   # noqa: E731
    m = {k: (dict(v) if isinstance(v, dict) else v) for k, v in meta.items()}
    m["model"] = dict(m["model"], id=LINK + " " + SCRIPT, device=p(1))
    m["input"] = dict(m["input"], question=p(2))
    m["config"] = dict(m["config"], preset=p(3))
    m["stage1b"] = dict(m["stage1b"], score=p(5))
    gen = dict(m["generation"], answer=p(6))
    gen["tokens"] = [p(7)] + list(gen["tokens"][1:])
    m["generation"] = gen
    return m


def rendered(markdown: str) -> str:
    """HTML of ``markdown`` as a GFM renderer with raw HTML allowed (the page's renderer) makes it;
    bare links, which GFM also turns into anchors, are checked in ``assert_inert``."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).render(markdown)


def assert_inert(value: str, where: str = "") -> None:
    """No element of a payload survives in ``value`` (HTML, or Markdown rendered to HTML)."""
    for html in (value, rendered(value)):
        low = html.lower()
        assert "<img" not in low and "<script" not in low, (where, value)
        assert not re.search(r"<[a-z][^>]*\bon\w+\s*=", low), (where, value)
        assert not re.search(r"<a\b[^>]*evil", low), (where, value)
    if not value.startswith("<div"):                   # Markdown (a legend is HTML: no autolinks, no KaTeX)
        assert "$$" not in value, (where, value)       # gradio renders $$...$$ with KaTeX
        assert not re.search(r"(?i)(https?://|www\.|(?<!\\)@)evil", value), (where, value)   # GFM autolinks


@pytest.fixture(scope="module")
def traces(tiny, tmp_path_factory):
    """(MustDrop, vanilla, pool baseline) traces of one input, with hostile strings, saved and loaded."""
    from conftest import half_textured_image

    d = tmp_path_factory.mktemp("xss")
    img, q = half_textured_image(), "what color is the square?"
    runs = [tiny.run(img, q, tiny.config_for("64"), max_new_tokens=3).trace,
            tiny.run(img, q, tiny.config_for("off"), max_new_tokens=3).trace,
            tiny.run(img, q, MustDropConfig.baseline("pool", 36), max_new_tokens=3).trace]
    paths = []
    for i, (t, name) in enumerate(zip(runs, ("md", "vanilla", "pool"))):
        m = hostile_meta(t.meta, i)
        m["input"]["input_hash"] = t.meta["input"]["input_hash"]
        paths.append(Trace(m, t.arrays).save(d / f"{name}.safetensors"))
    return [Trace.load(p) for p in paths], paths


# ----------------------------------------------------------------------------- the helpers
@pytest.mark.parametrize("payload", PAYLOADS + ("# heading", "1. item", "> quote", "- item", "www.evil.example",
                                                "a@evil.example", "https://evil.example", "**bold** _it_ ~~s~~",
                                                "| a | b |", "\\[x](y)", "&lt;img src=x onerror=1&gt;"))
def test_escaped_markdown_renders_as_the_text_itself(payload):
    from html import unescape

    for md, tag in ((md_text(payload), "p"), (md_code(payload), "code")):
        out = rendered(md).strip()
        assert_inert(md)
        inner = re.fullmatch(rf"<p>(?:<{tag}>)?(.*?)(?:</{tag}>)?</p>", out, re.S)
        assert inner and unescape(inner.group(1)) == payload, (payload, md, out)


def test_html_text_and_numbers():
    assert html_text(IMG) == "&lt;img src=x onerror=&quot;window.__xss=1&quot;&gt;"
    assert md_value(0.8) == "0.8" and md_value(3) == "3" and md_value(True) == "True"
    assert md_value("tiny-llava") == "tiny-llava" and md_text("what color is the square?") == "what color is the square?"


# ----------------------------------------------------------------------------- the vis layer
def test_every_readout_and_legend_of_a_hostile_trace_is_inert(traces):
    (md, va, pool), _ = traces
    gt = vis.GroundTruth(np.ones((1, md.grid, md.grid), np.float32), (0,))
    out = {"summary": vis.summary_markdown(md, va), "lifecycle": vis.lifecycle_markdown(md, 3, 4),
           "compare": vc.compare_markdown(md, pool, md.start_layer, vanilla=va), "compare_legend": vc.legend_html(pool)}
    for layer in range(md.num_layers):
        out[f"layer {layer}"] = vis.layer_markdown(md, layer, gt)
    d = vis.answer_diff(va, md)
    out["diff"], out["table"] = d["text"], d["table"]
    for kind in ("merge", "similarity", "key_score", "filter", "kv", "compare", "global_share", "individual_max"):
        out[f"legend {kind}"] = vis.legend_html(kind, md, md.prune_layers[0], gt=True)
    for where, value in out.items():
        assert_inert(value, where)
    assert "sign in again" in out["summary"] and "window.\\_\\_xss" in out["summary"]   # shown, as text


def test_a_slide_of_a_hostile_trace_renders(traces, tmp_path):
    """Matplotlib reads $...$ as mathtext: '$\\over$' in a title or answer raised at savefig."""
    (md, va, pool), _ = traces
    png, pdf = vis.save_slides(md, tmp_path, vanilla=va, compare=pool)
    assert png.stat().st_size and pdf.stat().st_size
    assert re.fullmatch(r"[A-Za-z0-9._-]+", png.stem)


# ----------------------------------------------------------------------------- the app
@pytest.fixture(scope="module")
def client(tiny):
    from gradio_client import Client

    from conftest import serving

    with serving(lens_app_app.build_app(engine.Lens(runner=tiny), examples=[])) as url:
        yield Client(url, verbose=False)


def replay(client, *paths):
    from gradio_client import handle_file
    return client.predict([handle_file(str(p)) for p in paths], None, True, api_name="/replay")


def strings(result):
    return [x for x in result if isinstance(x, str)]


def test_replay_of_a_hostile_trace_returns_only_inert_markup(client, traces):
    _, paths = traces
    res = replay(client, *paths)
    status = next(s for s in strings(res) if s.startswith(("**Replaying", "**Problem")))
    assert status.startswith("**Replaying**"), status
    assert "sign in again" in status and "<code>" in status
    for value in strings(res):
        assert_inert(value)
    for layer in (0, 2):
        for value in strings(client.predict(layer, True, api_name="/layer")):
            assert_inert(value, f"layer {layer}")


def test_a_hostile_file_name_in_a_problem_message_is_inert(client, tmp_path):
    bad = tmp_path / "[sign in again](https:⁄⁄evil.example) <img src=x onerror=1>.safetensors"
    bad.write_bytes(b"\x00" * 64)
    status = next(s for s in strings(replay(client, bad)) if s.startswith("**Problem"))
    assert_inert(status)


def test_a_script_in_a_numeric_field_is_refused_without_echo(client, traces, tmp_path):
    """A number field holding markup (the stage-1a threshold) is refused by the trace checks, and
    the message names the field without repeating the string."""
    (md, *_), _ = traces
    meta = dict(md.meta, stage1a=dict(md.meta["stage1a"], threshold=SCRIPT + IMG))
    bad = Trace(meta, md.arrays).save(tmp_path / "threshold.safetensors")
    status = next(s for s in strings(replay(client, bad)) if s.startswith(("**Problem", "**Replaying")))
    assert status.startswith("**Problem") and "threshold" in status and "window.__xss" not in status, status
    assert_inert(status)


def test_a_one_layer_model_trace_replays(client, tmp_path):
    """Gradio refuses a slider with minimum == maximum: a one-layer trace failed with 'Slider minimum
    must be less than maximum'."""
    from conftest import half_textured_image
    from mustdrop.adapters import LlavaMustDrop, load_llava
    from mustdrop.testing import build_tiny_llava

    folder = build_tiny_llava(tmp_path / "one-layer", text_layers=1)
    model, processor = load_llava(str(folder))
    runner = LlavaMustDrop(model, processor, str(folder), defaults=ModelDefaults(prune_layers=(0,)))
    assert runner.num_layers == 1
    t = runner.run(half_textured_image(), "what color is the square?", runner.config_for("64"), max_new_tokens=2).trace
    path = t.save(tmp_path / "one.safetensors")
    res = replay(client, path)
    status = next(s for s in strings(res) if s.startswith(("**Replaying", "**Problem")))
    assert status.startswith("**Replaying**"), status
    assert any("**LLM layer 0** of 1" in s for s in strings(res))
    assert any(s.startswith("<div") and "threshold" in s for s in strings(res))   # stage 2 ran at layer 0


def test_the_layer_slider_of_a_one_layer_model_is_fixed():
    from lens_app.views.layer import slider_range

    assert slider_range(1) == dict(minimum=0, maximum=1, interactive=False)
    assert slider_range(32) == dict(minimum=0, maximum=31, interactive=True)


# ----------------------------------------------------------------------------- static: every sink escaped
SAFE_CALLS = {"md_text", "md_code", "md_value", "html_text", "skip"}   # escapers, and gr.skip()
VIS_MODULES = {"vis", "vc", "vis_compare"}
STATUS_METHODS = {"show_session": 2}              # App methods writing an argument into the status line        # mustdrop.vis builders: their output is tested above
ALLOWED = {"offered.note": "examples.offer: the model label through md_code (test_app's photo-note tests)"}


class SinkChecker:
    """Every value a module returns into a gr.Markdown / gr.HTML (a dict entry or ``out[c] = ...`` keyed
    by such a component, or the component's first argument) is a constant, a mustdrop.vis builder's
    result, an escaper's result, or built (f-string, +, if/else, local names, parameters at their call
    sites, local functions' returns) from those; a formatted value with a numeric format is a number."""

    def __init__(self, source: str, markup_attrs=frozenset(), path: Path | None = None):
        import ast

        self.ast, self.tree, self.path = ast, ast.parse(source), path
        self.parents = {c: p for p in ast.walk(self.tree) for c in ast.iter_child_nodes(p)}
        self.markup = {ast.unparse(t) for n in ast.walk(self.tree) if isinstance(n, ast.Assign)
                       and self._is_markup_ctor(n.value) for t in n.targets}
        # components built as markup on the page in another module of the app (page.status ...): a key
        # ending in such an attribute of anything but self is a markup sink here too
        self.markup_attrs = set(markup_attrs)
        self.funcs = {n.name: n for n in ast.walk(self.tree) if isinstance(n, ast.FunctionDef)}
        self.imported = {a.asname or a.name: n.module for n in ast.walk(self.tree)
                         if isinstance(n, ast.ImportFrom) and n.level and n.module for a in n.names}
        self.problems: list[str] = []

    def is_markup(self, key) -> bool:
        a = self.ast
        return a.unparse(key) in self.markup or (isinstance(key, a.Attribute) and key.attr in self.markup_attrs
                                                 and a.unparse(key.value) != "self")

    def follow_import(self, name, seen) -> bool:
        """Check the returns of a function imported from another module of the app (from .stale import ...)."""
        module = self.imported.get(name)
        if module is None or self.path is None:
            return False
        root = Path(__file__).resolve().parents[1] / "lens_app"
        target = next((p for p in (root / f"{module.split('.')[-1]}.py", root / "views" / f"{module.split('.')[-1]}.py")
                       if p.exists()), None)
        if target is None:
            return False
        other = SinkChecker(target.read_text(), self.markup_attrs, target)
        fn = other.funcs.get(name)
        if fn is None:
            return False
        for r in self.ast.walk(fn):
            if isinstance(r, self.ast.Return) and r.value is not None:
                other.check(r.value, set())
        self.problems += [f"{target.name} {p}" for p in other.problems]
        return True

    def _is_markup_ctor(self, node):
        a = self.ast
        return isinstance(node, a.Call) and isinstance(node.func, a.Attribute) and node.func.attr in ("Markdown", "HTML")

    def sinks(self):
        a = self.ast
        for n in a.walk(self.tree):
            if isinstance(n, a.Dict):
                yield from (v for k, v in zip(n.keys, n.values) if k is not None and self.is_markup(k))
            elif isinstance(n, a.Assign) and isinstance(n.targets[0], a.Subscript) \
                    and self.is_markup(n.targets[0].slice):
                yield n.value
            elif self._is_markup_ctor(n):
                yield from n.args[:1]
                yield from (k.value for k in n.keywords if k.arg == "value")
            elif isinstance(n, a.Call) and isinstance(n.func, a.Attribute) and n.func.attr in STATUS_METHODS \
                    and a.unparse(n.func.value) != "self":
                # another module hands the status line's text to lens_app.handlers.App
                i = STATUS_METHODS[n.func.attr]
                yield from n.args[i:i + 1]
                yield from (k.value for k in n.keywords if k.arg == "message")

    def run(self) -> list[str]:
        for s in self.sinks():
            self.check(s, set())
        return self.problems

    def enclosing(self, node):
        while node in self.parents and not isinstance(node, self.ast.FunctionDef):
            node = self.parents[node]
        return node if isinstance(node, self.ast.FunctionDef) else None

    def assigned(self, target, value, name):
        """The values ``target = value`` gives ``name`` (also ``a, b = x, y``; unpacking a call: the call)."""
        a = self.ast
        if isinstance(target, a.Name):
            return [value] if target.id == name else []
        if isinstance(target, a.Tuple):
            if isinstance(value, a.Tuple) and len(value.elts) == len(target.elts):
                return [v for t, x in zip(target.elts, value.elts) for v in self.assigned(t, x, name)]
            return [value] if any(isinstance(t, a.Name) and t.id == name for t in target.elts) else []
        return []

    def check(self, e, seen) -> None:
        a = self.ast
        if id(e) in seen:
            return
        seen = seen | {id(e)}
        if isinstance(e, a.Constant):
            return
        if isinstance(e, a.JoinedStr):
            for v in e.values:
                if isinstance(v, a.FormattedValue):
                    spec = "".join(str(c.value) for c in v.format_spec.values
                                   if isinstance(c, a.Constant)) if v.format_spec else ""
                    if not re.search(r"[bdoxXeEfFgGn%]$", spec):      # a numeric format: a number
                        self.check(v.value, seen)
            return
        if isinstance(e, a.BinOp):
            return self.check(e.left, seen) or self.check(e.right, seen)
        if isinstance(e, a.IfExp):
            return self.check(e.body, seen) or self.check(e.orelse, seen)
        if isinstance(e, a.Call):
            f = e.func
            name = f.attr if isinstance(f, a.Attribute) else getattr(f, "id", "")
            if name == "join" and isinstance(f.value, a.Constant) and len(e.args) == 1 \
                    and isinstance(e.args[0], (a.GeneratorExp, a.ListComp)):
                return self.check(e.args[0].elt, seen)          # "sep".join(part for ...): each part
            if name in SAFE_CALLS or (isinstance(f, a.Attribute) and a.unparse(f.value) in VIS_MODULES):
                return
            is_self_call = isinstance(f, a.Attribute) and a.unparse(f.value) == "self"
            if (isinstance(f, a.Name) or is_self_call) and name in self.funcs:
                for r in a.walk(self.funcs[name]):
                    if isinstance(r, a.Return) and r.value is not None:
                        self.check(r.value, seen)
                return
            if isinstance(f, a.Name) and self.follow_import(name, seen):
                return
        if isinstance(e, a.Subscript) and isinstance(e.value, a.Name):
            return self.check(e.value, seen)
        if isinstance(e, a.Name):
            fn = self.enclosing(e)
            scope = fn if fn is not None else self.tree
            values = [v for n in a.walk(scope) if isinstance(n, a.Assign) for t in n.targets
                      for v in self.assigned(t, n.value, e.id)]
            if not values:
                values = [n.value for n in self.tree.body if isinstance(n, a.Assign)
                          and any(isinstance(t, a.Name) and t.id == e.id for t in n.targets)]
            params = [p.arg for p in fn.args.args] if fn is not None else []
            if e.id in params:
                for c in a.walk(self.tree):
                    i = params.index(e.id)
                    if isinstance(c, a.Call) and isinstance(c.func, a.Attribute) and c.func.attr == fn.name \
                            and a.unparse(c.func.value) == "self" and params[0] == "self":
                        i -= 1                      # a method called as self.name(...)
                    elif not (isinstance(c, a.Call) and isinstance(c.func, a.Name) and c.func.id == fn.name):
                        continue
                    values += [c.args[i]] if i < len(c.args) else [k.value for k in c.keywords if k.arg == e.id]
            if values:
                for v in values:
                    self.check(v, seen)
                return
        if a.unparse(e) in ALLOWED:
            return
        self.problems.append(f"line {e.lineno}: {a.unparse(e)[:120]}")


def app_modules():
    root = Path(__file__).resolve().parents[1] / "lens_app"
    return sorted(root.glob("*.py")) + sorted((root / "views").glob("*.py"))


def markup_attributes() -> set[str]:
    """Attribute names the app's modules give gr.Markdown / gr.HTML components on a shared object
    (page.status = ...; a view's own self.text is matched within its module): a module that writes
    ``page.status`` is checked even though another built it."""
    import ast

    out = set()
    for path in app_modules():
        c = SinkChecker(path.read_text())
        out |= {t.attr for n in ast.walk(c.tree) if isinstance(n, ast.Assign) and c._is_markup_ctor(n.value)
                for t in n.targets if isinstance(t, ast.Attribute) and ast.unparse(t.value) != "self"}
    return out


@pytest.mark.parametrize("path", app_modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_markdown_and_html_value_in_lens_app_is_escaped(path):
    problems = SinkChecker(path.read_text(), markup_attributes(), path).run()
    assert not problems, f"{path.name}: unescaped values into gr.Markdown / gr.HTML:\n" + "\n".join(problems)


def test_the_sink_checker_finds_unescaped_values():
    bad = SinkChecker('''
import gradio as gr
def build(lens, trace):
    status = gr.Markdown(f"model `{lens.model_label}`")
    def warn(msg):
        return {status: f"**Problem:** {msg}"}
    def ok(n):
        return {status: f"{n:.1f} " + md_text(trace.meta['x']) + vis.layer_markdown(trace, 0)}
    def listed(names):
        return {status: "; ".join(f"**{n}**" for n in names) + "; ".join(md_text(n) for n in names)}
    warn(str(trace))
    listed(trace.meta["names"])
    return {status: trace.meta["input"]["question"]}
''').run()
    assert len(bad) == 4, bad
