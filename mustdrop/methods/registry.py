"""The one list of methods: every command line, the app, analysis specs, lmms-eval and config
validation read it.

Built-ins register on first use, in the order the app's Compare choice shows them. A researcher's
method comes from a Python file (``--method-file PATH``, :func:`load_file`) or from an installed
package's entry point in the group ``mustdrop.methods`` (:func:`load_entry_points`, read on first
use). Either defines ``METHOD`` (a Method subclass or instance) or ``METHODS`` (a list of them).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path

from .base import STAGES, VISION_NEEDS, Method, MethodError, Words

ENTRY_POINT_GROUP = "mustdrop.methods"
DEFAULT = "mustdrop"
BUILTIN_MODULES = ("mustdrop", "fastv", "visionzip", "fastervlm", "pdrop", "random_drop", "pool")
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")

_methods: dict[str, Method] = {}
_builtin: set[str] = set()
_state = {"builtins": False, "entry_points": False}


def _ensure() -> None:
    if not _state["builtins"]:
        _state["builtins"] = True
        for mod in BUILTIN_MODULES:
            m = importlib.import_module(f"{__package__}.{mod}")
            for method in _declared(m, f"mustdrop.methods.{mod}"):
                register(method, _builtin_ok=True)
                _builtin.add(method.name)
    if not _state["entry_points"]:
        _state["entry_points"] = True
        load_entry_points()


def _instance(obj, source: str) -> Method:
    if isinstance(obj, type) and issubclass(obj, Method):
        try:
            obj = obj()
        except Exception as e:  # noqa: BLE001 - a plug-in's fault
            raise MethodError(f"{source}: cannot create method {obj.__name__}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, Method):
        raise MethodError(f"{source}: {obj!r} is not a mustdrop.methods.Method (subclass it)")
    return obj


def _declared(module, source: str) -> list[Method]:
    if hasattr(module, "METHODS"):
        items = list(module.METHODS)
    elif hasattr(module, "METHOD"):
        items = [module.METHOD]
    else:
        raise MethodError(f"{source} defines neither METHOD nor METHODS: set METHOD = YourMethod")
    return [_instance(x, source) for x in items]


def register(method, _builtin_ok: bool = False) -> Method:
    """Add a method (a Method subclass or instance). Refused: a name that is not a short lower-case
    identifier, one that a registered method has (a built-in's above all), or a method without the
    parts its stages need."""
    if not _builtin_ok:
        _ensure()
    method = _instance(method, "register")
    name = method.name
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise MethodError(f"method name {name!r} must be 1-32 characters a-z, 0-9, _ starting with a letter")
    if name in _methods and _methods[name] is not method:
        kind = "built-in" if name in _builtin else "registered"
        raise MethodError(f"method {name!r} clashes with the {kind} method of that name; rename it")
    if not isinstance(method.label, str) or not method.label.strip() or len(method.label) > 60:
        raise MethodError(f"method {name!r}: label must be a short non-empty string")
    bad = [s for s in method.stages if s not in STAGES or (s in ("merge", "key_set") and not _builtin_ok)]
    if bad or not ({"vision", "llm"} & set(method.stages)):
        raise MethodError(f"method {name!r}: stages must include 'vision' or 'llm' (of vision, llm, kv_trim), "
                          f"got {method.stages!r}")
    if "llm" in method.stages and type(method).decide is Method.decide:
        raise MethodError(f"method {name!r} drops in the LLM but defines no decide (or score)")
    if "vision" in method.stages and type(method).select_vision is Method.select_vision:
        raise MethodError(f"method {name!r} selects before the LLM but defines no select_vision")
    needs = method.requires
    if not isinstance(needs, dict) or any(k not in VISION_NEEDS or not isinstance(v, str) or not v.strip()
                                          for k, v in needs.items()):
        raise MethodError(f"method {name!r}: requires must map names of {', '.join(VISION_NEEDS)} to what the "
                          f"method does with each (one line), got {needs!r}"[:400])
    try:
        method.words.to_dict()
    except Exception as e:  # noqa: BLE001
        raise MethodError(f"method {name!r}: its words (statuses, scores) are malformed: {e}") from None
    _methods[name] = method
    return method


def get(name: str) -> Method:
    """The method of that name, or a MethodError that lists the registered ones."""
    _ensure()
    if not isinstance(name, str) or name not in _methods:
        raise MethodError(f"method must be one of {', '.join(_methods)}, got {name!r}"[:400])
    return _methods[name]


def is_builtin(name: str) -> bool:
    _ensure()
    return name in _builtin


def names() -> tuple[str, ...]:
    """Every registered method, MustDrop first, built-ins in the app's order, then plug-ins."""
    _ensure()
    return tuple(_methods)


def baselines() -> tuple[str, ...]:
    """Every method but MustDrop: what a same-budget comparison may run."""
    return tuple(n for n in names() if n != DEFAULT)


def labels() -> dict[str, str]:
    """name -> label of every registered method."""
    _ensure()
    return {n: m.label for n, m in _methods.items()}


def words_of(trace) -> Words:
    """How a trace's decisions are explained: the words it stores (meta["method_info"]), else, for
    traces written before they were stored, the registered method's, else MustDrop's."""
    meta = getattr(trace, "meta", trace) or {}
    info = meta.get("method_info")
    if info is not None:
        try:
            return Words.from_dict(info)
        except (TypeError, ValueError):
            pass
    name = meta.get("method") or (meta.get("config") or {}).get("method") or DEFAULT
    try:
        return get(str(name)).words
    except MethodError:
        return Words(name=str(name)[:64], label=str(name)[:64])


def load_file(path) -> list[Method]:
    """Import a Python file and register the methods it declares. The module is named after a hash of
    its resolved path (mustdrop_plugin_<hash>), so that two files of one name cannot clash with each
    other or with any installed module. Loading the same file again registers nothing new."""
    _ensure()
    p = Path(path).expanduser()
    if not p.is_file() or p.suffix != ".py":
        raise MethodError(f"method file {str(path)!r} is not a .py file")
    p = p.resolve()
    mod_name = "mustdrop_plugin_" + hashlib.sha256(str(p).encode()).hexdigest()[:16]
    module = sys.modules.get(mod_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(mod_name, p)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - a plug-in's fault
            del sys.modules[mod_name]
            raise MethodError(f"method file {p.name}: importing it failed: {type(e).__name__}: {e}") from None
    out = []
    for m in _declared(module, f"method file {p.name}"):
        if _methods.get(m.name) is not None and type(_methods[m.name]) is type(m):
            out.append(_methods[m.name])
            continue
        out.append(register(m))
    return out


def load_files(paths) -> list[Method]:
    out = []
    for p in paths or ():
        out += load_file(p)
    return out


def load_entry_points() -> list[Method]:
    """Register the methods installed packages declare in the entry-point group ``mustdrop.methods``.
    A broken entry point is refused with a warning naming it; the others still load."""
    import warnings
    from importlib.metadata import entry_points

    out = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            items = obj if isinstance(obj, (list, tuple)) else [obj]
            for x in items:
                m = _instance(x, f"entry point {ep.name!r}")
                if _methods.get(m.name) is not None and type(_methods[m.name]) is type(m):
                    continue
                out.append(register(m))
        except Exception as e:  # noqa: BLE001 - one broken package must not stop the others
            warnings.warn(f"mustdrop: entry point {ep.name!r} ({ep.value}) not loaded: {e}", stacklevel=2)
    return out


def unregister(name: str) -> None:
    """Remove a plug-in (tests); built-ins stay."""
    if name in _builtin:
        raise MethodError(f"method {name!r} is built in")
    _methods.pop(name, None)
