"""Code shape of the library and the app (issue 25, section 3): no function longer than about 120
lines and no module longer than about 700 in mustdrop/ and lens_app/, so that each does one job and a
new method, model family or view arrives as a new file rather than as edits inside a long one.

Measured with ``ast`` (a function's span from its ``def`` line, decorators excluded, to its last line;
nested functions count inside their parent too); ``python tests/test_code_shape.py`` prints the
longest of each."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mustdrop", "lens_app")
MAX_FUNCTION_LINES = 120
MAX_MODULE_LINES = 700
# No file is excluded: the adapter split of issue 25 section 2 (i25-host) has landed, and
# mustdrop/adapters/ and mustdrop/stages.py are within the limits.
EXCLUDED: tuple[str, ...] = ()


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                  if not (EXCLUDED and str(p.relative_to(ROOT)).startswith(EXCLUDED)))


def module_lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def function_lengths(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines) of every function and method in a module."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out.append((name, child.end_lineno - child.lineno + 1))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text()), "")
    return out


def offenders() -> tuple[list[str], list[str]]:
    long_modules, long_functions = [], []
    for p in modules():
        rel = p.relative_to(ROOT)
        n = module_lines(p)
        if n > MAX_MODULE_LINES:
            long_modules.append(f"{rel}: {n} lines")
        long_functions += [f"{rel}::{name}: {k} lines" for name, k in function_lengths(p) if k > MAX_FUNCTION_LINES]
    return long_modules, long_functions


def test_the_measure_sees_a_long_function_and_counts_its_lines(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(130))
    f = tmp_path / "m.py"
    f.write_text(f"def outer():\n{body}\n    def inner():\n        return 1\n    return inner\n")
    lengths = dict(function_lengths(f))
    assert lengths["outer"] == 134 and lengths["outer.inner"] == 2


def test_no_function_or_module_in_mustdrop_and_lens_app_is_too_long():
    long_modules, long_functions = offenders()
    assert not long_modules and not long_functions, (
        f"modules over {MAX_MODULE_LINES} lines: {long_modules}; functions over {MAX_FUNCTION_LINES} lines: "
        f"{long_functions}")


if __name__ == "__main__":
    rows = [(module_lines(p), str(p.relative_to(ROOT))) for p in modules()]
    print("longest modules:", sorted(rows, reverse=True)[:5])
    funcs = [(k, f"{p.relative_to(ROOT)}::{name}") for p in modules() for name, k in function_lengths(p)]
    print("longest functions:", sorted(funcs, reverse=True)[:8])
