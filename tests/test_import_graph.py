"""The package's modules import each other in one direction: no circle (a circle makes import order
matter and forces imports into function bodies). Read statically from the source, counting imports
inside functions too."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mustdrop"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)




def import_graph() -> dict:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[: len(up) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + "."):   # a package's own __init__ is not a dependency
                    graph[name].add(t)
    return graph


def cycle_through(graph, start):
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_config_stages_trace_form_no_circle():
    graph = import_graph()
    for m in ("mustdrop.config", "mustdrop.stages", "mustdrop.trace", "mustdrop.statuses"):
        assert cycle_through(graph, m) is None, " -> ".join(cycle_through(graph, m))


def test_no_module_of_the_package_is_on_a_circle():
    """Hosts, the shared run machinery and the compatibility layer (mustdrop.adapters) included:
    a host imports neither mustdrop.adapters nor the runner."""
    graph = import_graph()
    circles = [" -> ".join(c) for m in sorted(graph) if (c := cycle_through(graph, m))]
    assert not circles, circles
