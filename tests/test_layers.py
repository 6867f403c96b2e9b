"""The import contract of the four rooms: imports point one way, runtime <- core <- export <- cli.

``gvsl.runtime`` runs on inference servers that have numpy, nibabel and ONNX
Runtime / TensorRT but no torch, so it never imports torch or any other room;
the core (``gvsl``: model, training, the torch side) never imports the export
or the command line; the export never imports the command line; and the
runtime's modules import each other without cycles, so each can be read (and
split) on its own. The test reads every module's source (AST), so imports
inside functions count as much as those at the top: a lazy upward import still
breaks a torch-free install the first time that function runs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> import name (pyproject.toml's package-dir)
ROOMS = {"runtime": "gvsl.runtime", "gvsl": "gvsl", "export": "gvsl.export", "cli": "gvsl.cli"}
LAYER_ORDER = ("runtime", "core", "export", "cli")

#: Violations tolerated on purpose (none: any violation fails the test, and a listed one that no
#: longer occurs fails test_allow_list_has_no_stale_entries).
KNOWN_VIOLATIONS: frozenset[str] = frozenset()


def source_modules() -> dict[str, Path]:
    """Every module of the package, by import name."""
    modules: dict[str, Path] = {}
    for folder, package in ROOMS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def layer_of(module: str) -> str | None:
    """The room a gvsl module belongs to (None for anything outside gvsl)."""
    for layer, package in (("runtime", "gvsl.runtime"), ("export", "gvsl.export"), ("cli", "gvsl.cli")):
        if module == package or module.startswith(package + "."):
            return layer
    return "core" if module == "gvsl" or module.startswith("gvsl.") else None


def imported_names(source: str, module: str, is_package: bool, known: Iterable[str] = ()) -> set[str]:
    """Every module ``module`` imports anywhere in its source (function bodies included):
    ``import x``, ``from x import y`` (``x.y`` when that is a module), relative imports resolved,
    and ``importlib.import_module("literal")``."""
    known = set(known)
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                names.add(sub if sub in known else target)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            names.add(node.args[0].value)
    return names


def upward_violations(graph: dict[str, set[str]]) -> set[str]:
    """One line per import that points against runtime <- core <- export <- cli."""
    found = set()
    for module, imports in graph.items():
        here = layer_of(module)
        for name in imports:
            there = layer_of(name)
            if here == "runtime" and (name == "torch" or name.startswith("torch.")):
                found.add(f"{module} imports torch (runtime -> torch)")
            elif there is not None and LAYER_ORDER.index(there) > LAYER_ORDER.index(here):
                found.add(f"{module} imports {name} ({here} -> {there})")
    return found


def runtime_cycles(graph: dict[str, set[str]]) -> set[str]:
    """Strongly connected groups (Tarjan) of two or more runtime modules, or one importing itself."""
    nodes = sorted(m for m in graph if layer_of(m) == "runtime")
    edges = {m: sorted(n for n in graph[m] if n in graph and layer_of(n) == "runtime" and n != "gvsl.runtime")
             for m in nodes}  # fmt: skip
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges[v]:
                groups.append(sorted(group))

    for v in nodes:
        if v not in index:
            visit(v)
    return {"import cycle in gvsl.runtime: " + ", ".join(g) for g in groups}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {
        name: imported_names(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", modules)
        for name, path in modules.items()
    }


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(source_modules())


def test_every_room_is_read(graph):
    for module in ("gvsl.runtime.preprocess", "gvsl.model", "gvsl.export.pipeline", "gvsl.cli.bench.runners"):
        assert module in graph
    assert {layer_of(m) for m in graph} == set(LAYER_ORDER)


def test_imports_point_one_way_and_the_runtime_has_no_cycles(graph):
    found = upward_violations(graph) | runtime_cycles(graph)
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, "imports against runtime <- core <- export <- cli (or runtime cycles):\n" + "\n".join(new)


def test_allow_list_has_no_stale_entries(graph):
    found = upward_violations(graph) | runtime_cycles(graph)
    stale = sorted(KNOWN_VIOLATIONS - found)
    assert not stale, "fixed: remove from KNOWN_VIOLATIONS in tests/test_layers.py:\n" + "\n".join(stale)


def test_the_checker_sees_lazy_relative_and_dynamic_imports():
    """The contract would pass vacuously if the reader missed imports: it must see one inside a
    function, a relative one, an importlib one, and a cycle."""
    source = (
        "import numpy\n"
        "def f():\n    import torch.nn\n    from ..io import load_model\n"
        "def g():\n    importlib.import_module('gvsl.cli.main')\n"
        "from . import embed as embedding\n"
    )
    known = {"gvsl.runtime.backends", "gvsl.runtime.embed", "gvsl.io"}
    names = imported_names(source, "gvsl.runtime.backends", False, known)
    assert names == {"numpy", "torch.nn", "gvsl.io", "gvsl.cli.main", "gvsl.runtime.embed"}
    graph = {"gvsl.runtime.backends": names, "gvsl.runtime.embed": {"gvsl.runtime.backends"}}
    assert upward_violations(graph) == {
        "gvsl.runtime.backends imports torch (runtime -> torch)",
        "gvsl.runtime.backends imports gvsl.io (runtime -> core)",
        "gvsl.runtime.backends imports gvsl.cli.main (runtime -> cli)",
    }
    assert runtime_cycles(graph) == {"import cycle in gvsl.runtime: gvsl.runtime.backends, gvsl.runtime.embed"}
    # core -> export and export -> cli are upward too; downward imports are not
    assert upward_violations({"gvsl.train": {"gvsl.export.pipeline"}, "gvsl.export.x": {"gvsl.cli.app"}}) == {
        "gvsl.train imports gvsl.export.pipeline (core -> export)",
        "gvsl.export.x imports gvsl.cli.app (export -> cli)",
    }
    assert not upward_violations({"gvsl.cli.demo": {"gvsl.export.pipeline", "gvsl.train", "gvsl.runtime.io"}})


def test_every_package_is_shipped():
    """A wheel holds only the packages pyproject.toml lists: every folder of a room with an
    ``__init__.py`` (e.g. ``cli/bench/``) must be one of them, or an installed gvsl lacks it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    packages = {name for name, path in source_modules().items() if path.name == "__init__.py"}
    assert packages == listed
