"""The package's import graph has no cycle: modules form layers (errors, adapter, schemas → rules, io → formats,
check → plan → api → hub, cli), so any module can be imported, read and tested without the ones above it.

The graph is read from the source with ``ast``: every ``import`` and ``from … import`` in a module, at module level
and inside functions alike (a function-level import only postpones a cycle to the first call). ``from pkg import
name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. A package's implicit import of its parent
(``__init__`` runs first) is not an edge. Imports by a computed name (``importlib.import_module``) are not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "lora_migrate"


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package's ``__init__``)."""
    mods = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    """Module → the package's modules it imports (anywhere in its body)."""
    mods = _modules(root)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        here = name if is_pkg else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[:len(here.split(".")) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in mods:
                        deps.add(sub)
                    elif src in mods:
                        deps.add(src)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one cycle through them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(_one_cycle(graph, set(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _one_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A path start → … → start inside the component (breadth-first, so the shortest from its first module)."""
    start = min(comp)
    prev = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & comp):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"not a cycle: {sorted(comp)}")


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" → ".join(c) for c in found)


@pytest.mark.parametrize("files, expected", [
    # a → b → c → a through a function-level import and a `from . import name` of a module
    ({"__init__.py": "", "a.py": "from .b import x\n",
      "b.py": "def f():\n    from . import c\n",
      "c.py": "from .a import y\n"}, [["p.a", "p.b", "p.c", "p.a"]]),
    # a package importing its children, the children importing a sibling registry: no cycle
    ({"__init__.py": "from . import a\nfrom .reg import R\n", "reg.py": "R = {}\n", "a.py": "from .reg import R\n"},
     []),
    # ... but the children importing a name from the package itself is one
    ({"__init__.py": "R = {}\nfrom . import a\n", "a.py": "from . import R\n"}, [["p", "p.a", "p"]]),
    # an absolute import of a subpackage's module, and a parent-relative one
    ({"__init__.py": "", "q/__init__.py": "", "q/m.py": "from ..n import z\n", "n.py": "import p.q.m\n"},
     [["p.n", "p.q.m", "p.n"]]),
])
def test_the_graph_finds_cycles(tmp_path, files, expected):
    root = tmp_path / "p"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert cycles(import_graph(root)) == expected


def test_test_modules_do_not_import_each_other():
    """Shared test helpers live in helper modules (builders.py, models.py, …), never in a test_*.py module."""
    tests = Path(__file__).resolve().parent
    found = []
    for path in sorted(tests.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module or ""] + [a.name for a in node.names] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n.rpartition(".")[2].startswith("test_") for n in names):
                found.append(f"{path.relative_to(tests)}:{node.lineno}")
    assert not found, found
