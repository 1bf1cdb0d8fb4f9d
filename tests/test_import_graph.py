"""The package's import graph: every module imports on its own, the parts import only what the
layering below allows, and no bnfold module reaches itself through imports (lazy ones inside
functions included: they run later, but a cycle is a cycle).

Edges are read from the source (``import`` / ``from ... import`` anywhere in a module, except
under ``if TYPE_CHECKING:``). ``from pkg import name`` is an edge to ``pkg.name`` when that is a
module, and to ``pkg`` itself when some name is not a module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "bnfold"

CORE = {"bnfold._version", "bnfold.affine", "bnfold.errors", "bnfold.report"}
IO = {"bnfold.onnx_proto", "bnfold.onnx_wire", "bnfold.onnx_io", "bnfold.onnx_validate"}

# Which part may import which. A module belongs to the longest key its name starts with; a
# part may always import its own modules.
ALLOWED: Dict[str, Set[str]] = {
    "bnfold._version": set(),
    "bnfold.affine": set(),
    "bnfold.errors": set(),
    "bnfold.report": set(),
    "bnfold._onnx_ml_pb2": set(),
    "bnfold.onnx_proto": {"bnfold._onnx_ml_pb2"},
    "bnfold.onnx_wire": {"bnfold.errors", "bnfold.onnx_proto"},
    "bnfold.onnx_io": {"bnfold.errors", "bnfold.onnx_wire", "bnfold.onnx_proto"},
    "bnfold.onnx_validate": {"bnfold.errors"},
    "bnfold.verify": CORE | IO,
    "bnfold.onnx_pass": CORE | IO,
    "bnfold.torch_pass": CORE | IO | {"bnfold.verify"},
    "bnfold.bench": CORE | IO | {"bnfold.verify"},
    "bnfold.latency": CORE | IO | {"bnfold.verify"},
    "bnfold.pipeline": CORE | IO | {"bnfold.verify", "bnfold.onnx_pass", "bnfold.torch_pass"},
    "bnfold.testing": CORE | IO | {"bnfold.verify"},
    "bnfold.cli": CORE | IO | {"bnfold", "bnfold.verify", "bnfold.bench", "bnfold.latency", "bnfold.pipeline",
                               "bnfold.onnx_pass", "bnfold.torch_pass"},
    "bnfold": CORE | IO | {"bnfold.verify", "bnfold.bench", "bnfold.latency", "bnfold.pipeline",
                           "bnfold.onnx_pass", "bnfold.torch_pass"},
}

# Inside the ONNX pass: the public face and the engine sit on top, the rules below them, what
# each op knows below the rules. Nothing below imports what is above it.
ONNX_PASS_ABOVE: Dict[str, Set[str]] = {
    "bnfold.onnx_pass.ops": {"bnfold.onnx_pass", "bnfold.onnx_pass.engine", "bnfold.onnx_pass.rules",
                             "bnfold.onnx_pass.chain"},
    "bnfold.onnx_pass.rules": {"bnfold.onnx_pass", "bnfold.onnx_pass.engine"},
    "bnfold.onnx_pass.chain": {"bnfold.onnx_pass", "bnfold.onnx_pass.engine"},
}
ONNX_PASS_FOUNDATION = ("graph", "rewrite", "constants", "shapes", "layout")
for _name in ONNX_PASS_FOUNDATION:
    ONNX_PASS_ABOVE[f"bnfold.onnx_pass.{_name}"] = {
        "bnfold.onnx_pass", "bnfold.onnx_pass.engine", "bnfold.onnx_pass.rules", "bnfold.onnx_pass.ops",
        "bnfold.onnx_pass.chain",
    }


def modules() -> Dict[str, Path]:
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Import statements anywhere in ``tree``, skipping ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(child)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def edges() -> Dict[str, Set[str]]:
    mods = modules()
    graph: Dict[str, Set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        out: Set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.split(".")[0] == "bnfold")
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "bnfold":
                continue
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods}
            out |= subs
            if len(subs) < len(node.names):
                out.add(target)
        out.discard(name)
        graph[name] = out
    return graph


def part(name: str, keys) -> Optional[str]:
    best = None
    for key in keys:
        if (name == key or name.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    return best


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_parts_import_only_what_the_layering_allows() -> None:
    bad = []
    for name, targets in sorted(edges().items()):
        mine = part(name, ALLOWED)
        assert mine is not None, f"{name} belongs to no part: add it to ALLOWED"
        for target in sorted(targets):
            theirs = part(target, ALLOWED)
            if theirs != mine and theirs not in ALLOWED[mine]:
                bad.append(f"{name} -> {target}")
    assert not bad, "imports the layering does not allow:\n" + "\n".join(bad)


def test_onnx_pass_layers() -> None:
    layers = set(ONNX_PASS_ABOVE) | {"bnfold.onnx_pass", "bnfold.onnx_pass.engine"}
    bad = []
    for name, targets in sorted(edges().items()):
        mine = part(name, ONNX_PASS_ABOVE)
        if mine is None:
            continue
        bad += [f"{name} -> {t}" for t in sorted(targets) if part(t, layers) in ONNX_PASS_ABOVE[mine]]
    assert not bad, "a lower layer of the ONNX pass imports a higher one:\n" + "\n".join(bad)


def test_the_checks_can_fail() -> None:
    """The cycle finder finds a planted cycle, and the layering check knows every part."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert part("bnfold.onnx_pass.rules.after_linear", ONNX_PASS_ABOVE) == "bnfold.onnx_pass.rules"
    assert "bnfold.onnx_pass" in ONNX_PASS_ABOVE["bnfold.onnx_pass.ops"]


_ISOLATED = """
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "bnfold" or m.startswith("bnfold.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=3)
print(json.dumps(failures))
"""


def test_every_module_imports_on_its_own() -> None:
    """Each module imported first, into an interpreter holding no other bnfold module (one
    subprocess; bnfold's modules are dropped between imports, third-party ones are kept)."""
    names = sorted(modules())
    proc = subprocess.run([sys.executable, "-c", _ISOLATED, json.dumps(names)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{k}:\n{v}" for k, v in failures.items())
