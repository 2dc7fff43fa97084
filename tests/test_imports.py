"""Imports point one way: the package's modules form no cycle, no import hides behind
``TYPE_CHECKING``, and the product (``cam2mask masks``) reaches no module that exists for the
notebooks' tables. Read from the source with ``ast``, so a new cycle fails here before it fails
at import time in some order."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cam2mask_lib"
# the modules that build the paper's tables and claims for the notebooks and the report
FOR_THE_NOTEBOOKS = {"experiments", "claims"}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "__init__"


def _graph() -> dict[str, set[str]]:
    """module -> the package modules it imports at module level (imports inside functions are
    the lazy branches of the command line and left out)."""
    mods = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        pkg = name.rsplit(".", 1)[0] if path.name != "__init__.py" and "." in name else (
            name if path.name == "__init__.py" else "")
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg.split(".") if pkg else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}" if target else alias.name
                    deps.add(sub if sub in mods else target)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _reach(graph, start) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in graph[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_the_graph_is_read():
    g = _graph()
    assert "pipeline" in g["experiments"] and "profiles" in g["pipeline"]


def test_no_import_cycle():
    g = _graph()
    cycles = sorted(m for m in g if m in _reach(g, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_no_type_checking_import(path):
    assert "TYPE_CHECKING" not in path.read_text(), f"{path.name} hides an import"


def test_the_product_reaches_no_table_module():
    g = _graph()
    assert not _reach(g, "masks") & FOR_THE_NOTEBOOKS


def test_profiles_import_configurations_only():
    """The profiles (every stage's configuration) import no module that runs on a context."""
    g = _graph()
    on_a_context = {"pipeline", "seg_stage", "refine", "experiments", "masks", "claims", "runner"}
    assert not _reach(g, "profiles") & on_a_context
