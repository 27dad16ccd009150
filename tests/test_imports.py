"""The core's modules import each other without a cycle.

Every module under ``core/pocketlm`` is parsed with ``ast``; an edge goes from a module to each
module of the package it imports, at module level or inside a function alike (a deferred import
is still a dependency). Imports under ``if TYPE_CHECKING:`` do not count: they never run.
Importing ``pocketlm.a.b`` also runs the package ``pocketlm.a``, so that is an edge too (except
to the importing module's own packages, which are already being imported)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "core" / "pocketlm"


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file of every module of ``package`` (a package by its ``__init__.py``)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(node: ast.AST):
    """Every import statement under ``node``, at any depth, except inside ``if TYPE_CHECKING:``
    (its ``else`` branch does run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _type_checking(child.test):
            for statement in child.orelse:
                yield from imports(ast.Module(body=[statement], type_ignores=[]))
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from imports(child)


def _targets(statement: ast.Import | ast.ImportFrom, module: str, is_package: bool, known) -> set[str]:
    """The package's modules ``statement`` in ``module`` names (a name imported from a package
    is its submodule when there is one, else the package itself)."""
    root = module.split(".")[0]
    if isinstance(statement, ast.Import):
        return {alias.name for alias in statement.names if alias.name.split(".")[0] == root}
    if statement.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(here[:len(here) - statement.level + 1] + ([statement.module] if statement.module else []))
    else:
        base = statement.module or ""
    if base.split(".")[0] != root:
        return set()
    return {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in statement.names}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the package importing it runs first."""
    known = module_names(package)
    graph = {}
    for module, path in known.items():
        edges = set()
        for statement in imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target in _targets(statement, module, path.name == "__init__.py", known):
                parts = target.split(".")
                edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}   # its packages run first
        graph[module] = {e for e in edges if e in known and e != module and not module.startswith(e + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}           # "open" while on the path, "done" once explored
    path: list[str] = []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_core_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_function_level_imports_and_skips_type_checking_ones():
    graph = import_graph()
    assert "pocketlm.checkpoint" in graph["pocketlm.pipeline"]          # module level
    assert "pocketlm.pipeline" in graph["pocketlm.cli"]                  # inside the commands
    assert "pocketlm.plan_eval" in graph["pocketlm.cli"]
    assert "pocketlm.streaming" in graph["pocketlm.builtins.loaders"]    # `from .. import streaming`
    assert "pocketlm.builtins" in graph["pocketlm.plugins"]             # a package's submodule, and the package
    assert "pocketlm.context" not in graph["pocketlm.components"]       # only under TYPE_CHECKING
    assert "pocketlm.plan_eval" not in graph["pocketlm.planner"]        # the planner is pure


def test_a_cycle_is_found_and_shown(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n"
                                  "def f():\n    from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from ..c import thing\n")
    (package / "c.py").write_text("import pkg.a\nthing = 1\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub import b\n")
    assert find_cycle(import_graph(package)) is None
