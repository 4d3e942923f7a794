"""The package's modules import each other in one direction: no circle (a circle makes import order
matter and forces imports into function bodies). Read statically from the source, counting imports
inside functions too."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mustdrop"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# Known, left to the methods registry's owner: MustDropConfig validates its method through the
# registry (config -> methods), and Method.make_config builds a MustDropConfig with an import inside
# the function (methods.base -> config). Any other circle fails the tests below.
KNOWN = {("mustdrop.methods.base", "mustdrop.config")}


def import_graph(drop_known: bool = True) -> dict:
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
    for a, b in KNOWN if drop_known else ():
        graph[a].discard(b)
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


def test_the_known_exception_is_still_there():
    """When the registry stops importing the config inside make_config, drop KNOWN."""
    a, b = next(iter(KNOWN))
    assert b in import_graph(drop_known=False)[a]


def test_status_codes_live_in_a_leaf_module():
    assert import_graph()["mustdrop.statuses"] == set()


def test_the_shared_run_machinery_knows_no_model_family():
    """mustdrop/run/ reaches a family only through the Host interface: none of its modules imports a
    host module other than hosts.base (a new family is one host module, no edit here)."""
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("mustdrop.run"):
            families = {d for d in deps if d.startswith("mustdrop.hosts.") and d != "mustdrop.hosts.base"}
            assert not families, (name, families)
            assert not any(d.startswith("mustdrop.adapters") for d in deps), name


def test_a_host_module_needs_only_the_interface_and_the_pure_stages():
    graph = import_graph()
    for name in ("mustdrop.hosts.llava", "mustdrop.hosts.llava_next"):
        assert not any(d.startswith(("mustdrop.run", "mustdrop.adapters")) for d in graph[name]), graph[name]
