"""Rules of the tree that nothing else enforces: ftflow never imports Prefect, no import cycle, no upward import,
every package folder a package, sub-packages' __init__ docstring-only (a re-exporting one would pull every sibling
into the cache keys of every stage below it). Read from the import graph the cache keys read."""

from __future__ import annotations

import ast
from pathlib import Path

from ftflow.stages.caching import _imported_names, import_graph

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ftflow", "tasks", "flows")
# A package may import only those to its left: ftflow is the core, tasks wrap it, flows wire tasks.
LAYERS = {"ftflow": 0, "tasks": 1, "flows": 2}


def files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_of_ftflow_imports_prefect():
    offenders = []
    for path in files("ftflow"):
        stat = path.stat()
        names = _imported_names(str(path), stat.st_size, stat.st_mtime_ns, "ftflow._")
        offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("prefect", "prefect_dask")]
    assert offenders == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (or a module importing itself)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if state.get(other) == "open":
                found.append(stack[stack.index(other):] + [other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle_among_ftflow_tasks_and_flows():
    assert cycles(import_graph(PACKAGES)) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_upward_import():
    upward = [f"{name} -> {other}" for name, imported in import_graph(PACKAGES).items() for other in imported
              if LAYERS[other.split(".")[0]] > LAYERS[name.split(".")[0]]]
    assert upward == []


def test_the_sub_packages_of_ftflow_depend_on_each_other_without_a_cycle():
    # The ground floor (config, errors, artifacts, device, tokens, perplexity) imports no sub-package.
    graph = import_graph(("ftflow",))
    by_package: dict[str, set[str]] = {}
    for name, imported in graph.items():
        parts = name.split(".")
        here = parts[1] if len(parts) > 2 or (ROOT / "ftflow" / parts[-1]).is_dir() else "ground"
        for other in imported:
            o = other.split(".")
            there = o[1] if len(o) > 2 or (ROOT / "ftflow" / o[-1]).is_dir() else "ground"
            if there != here:
                by_package.setdefault(here, set()).add(there)
    assert by_package.get("ground", set()) == set()
    assert cycles(by_package) == []


def test_every_package_folder_has_an_init_and_sub_packages_inits_are_docstrings():
    for package in PACKAGES:
        for folder in [ROOT / package, *(p for p in (ROOT / package).rglob("*") if p.is_dir())]:
            if folder.name != "__pycache__" and any(folder.glob("*.py")):
                assert (folder / "__init__.py").is_file(), f"{folder} has no __init__.py"
    for init in (ROOT / "ftflow").glob("*/__init__.py"):
        body = ast.parse(init.read_text(encoding="utf-8")).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), init
