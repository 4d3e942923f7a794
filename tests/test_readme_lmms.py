"""The README's "Paper benchmarks with lmms-eval" commands name what the code registers: ``--model``
is the model the package's ``lmms_eval.models`` entry point gives lmms-eval, every ``--model_args``
key (and every model arg the section names) is one the model takes, and the values go through the
model's own parser on the shipped toy model (the hub ids the README names are not downloaded).

Skipped only where lmms-eval is not installed (the lmms extra: requirements-lmms.txt)."""

import inspect
import re
import shlex
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the lmms extra: requirements-lmms.txt)")

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "assets" / "toy-llava")
SECTION = "## Paper benchmarks with lmms-eval"


def section(readme: str) -> str:
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    return readme[start:end if end >= 0 else len(readme)]


def commands(text: str) -> list[list[str]]:
    """Every lmms-eval command line in the section's indented code, continuations joined, as argv."""
    code = "\n".join(line[4:] for line in text.splitlines() if line.startswith("    "))
    code = code.replace("\\\n", " ")
    out = []
    for line in code.splitlines():
        argv = shlex.split(line, comments=True)
        if "lmms-eval" in argv:
            out.append(argv[argv.index("lmms-eval"):])
    return out


def option(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, (name, argv)
    return argv[argv.index(name) + 1]


def model_args(argv: list[str], loop_values=("192", "128", "64")) -> list[dict]:
    """--model_args parsed by lmms-eval's own parser, once per value of the README's shell loop."""
    from lmms_eval.utils import simple_parse_args_string

    raw = option(argv, "--model_args")
    return [simple_parse_args_string(raw.replace("$P", v)) for v in (loop_values if "$P" in raw else ("",))]


def registered_models() -> dict:
    """model id -> class, for every lmms_eval.models entry point this package declares in pyproject.toml."""
    from importlib.metadata import entry_points

    from lmms_eval import models

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    installed = {ep.name: ep for ep in entry_points().select(group="lmms_eval.models")}
    out = {}
    for name, target in declared.items():
        assert name in installed and installed[name].value == target, \
            f"entry point {name} = {target} is declared but not installed (pip install --no-deps -e .)"
        manifest = installed[name].load()()
        out[manifest.model_id] = models.get_model(manifest.model_id)
    return out


def accepted_args(cls, runner) -> set:
    """The keys the model class takes: its named constructor parameters, and, through its **kwargs,
    whatever its config parser does not refuse as unknown (tried one key at a time)."""
    from mustdrop import lmms

    params = inspect.signature(cls.__init__).parameters
    named = {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}

    def takes(key):
        try:
            lmms.build_config(runner, knobs={key: "1"})
        except ValueError as e:
            return "unknown model arg" not in str(e)
        return True

    return named, takes


@pytest.fixture(scope="module")
def readme_section():
    return section((ROOT / "README.md").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def runner():
    from analysis.common import load_runner
    return load_runner(TOY)


def test_the_section_has_a_command_per_table(readme_section):
    cmds = commands(readme_section)
    assert len(cmds) >= 3, cmds
    assert any("$P" in option(c, "--model_args") for c in cmds)


def test_readme_model_is_the_registered_one(readme_section):
    from mustdrop.lmms import MustDropLMMS

    registered = registered_models()
    assert registered, "pyproject.toml declares no lmms_eval.models entry point"
    for argv in commands(readme_section):
        name = option(argv, "--model")
        assert name in registered, f"README names --model {name}; registered: {sorted(registered)}"
        assert registered[name] is MustDropLMMS


def test_readme_model_args_are_taken_by_the_model(readme_section, runner):
    registered = registered_models()
    for argv in commands(readme_section):
        cls = registered[option(argv, "--model")]
        named, takes = accepted_args(cls, runner)
        for args in model_args(argv):
            for key in args:
                assert key in named or takes(key), f"README's --model_args key {key!r} is not a model arg"


def test_readme_model_args_values_go_through_the_models_parser(readme_section, runner):
    """The README's values (presets, methods, budget) pass build_config, as the model calls it,
    on the toy model in place of the hub id; the methods its baseline comment lists run too."""
    from mustdrop.lmms import build_config

    config_keys = set(inspect.signature(build_config).parameters) - {"runner", "knobs"}
    for argv in commands(readme_section):
        for args in model_args(argv):
            cfg_args = {k: v for k, v in args.items() if k in config_keys}
            knobs = {k: v for k, v in args.items() if k not in config_keys and k not in
                     ("pretrained", "layout", "device", "dtype", "trace_dir", "traces", "batch_size")}
            cfg = build_config(runner, knobs=knobs, **cfg_args)
            assert cfg.method == args.get("method", "mustdrop")
    listed = re.search(r"method=(\w+(?: \| \w+)+)", readme_section)
    assert listed, "the section lists the baselines as method=a | b | ..."
    for method in listed.group(1).split(" | "):
        assert build_config(runner, method=method, budget=64).method == method


def test_every_model_arg_the_section_names_is_taken(readme_section, runner):
    """The "Other model args" sentence: every backquoted name (or name=value) is a model arg."""
    from mustdrop.lmms import MustDropLMMS

    m = re.search(r"Other model args:(.*?)A bad value is refused", readme_section, re.S)
    assert m, "the section's 'Other model args: ...' sentence"
    names = [n.split("=")[0] for n in re.findall(r"`([a-z_]+(?:=[^`]*)?)`", m.group(1))]
    assert len(names) >= 15, names
    named, takes = accepted_args(MustDropLMMS, runner)
    missing = [n for n in names if not (n in named or takes(n))]
    assert not missing, f"README names model args the model does not take: {missing}"
