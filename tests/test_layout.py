"""The shape of the code that the README promises: stages are thin entry points that import
only the library, and the library never imports a stage."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def first_party(names: set[str]) -> set[str]:
    """The imports that are kdcache's own (stdlib and third-party ones aside)."""
    return {n for n in names if n.split(".")[0] in ("pipeline", "stages", "bench", "tests")}


@pytest.mark.parametrize("path", sorted((ROOT / "stages").glob("*.py")), ids=lambda p: p.name)
def test_stages_import_only_pipeline(path):
    ours = first_party(imported_modules(path))
    assert all(n.split(".")[0] == "pipeline" for n in ours), sorted(ours)


@pytest.mark.parametrize("path", sorted((ROOT / "pipeline").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_never_imports_a_stage(path):
    ours = first_party(imported_modules(path))
    assert all(n.split(".")[0] == "pipeline" for n in ours), sorted(ours)


def test_no_stage_branches_on_a_model_name():
    """What a student or loss needs is its declaration, never a name check in a stage."""
    for path in (ROOT / "stages").glob("*.py"):
        text = path.read_text()
        assert "cfg.model ==" not in text and "cfg.loss ==" not in text, path.name


def test_importing_the_library_does_no_work():
    import subprocess

    code = ("import sys, pipeline, pipeline.config, pipeline.registry; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'zarr', 'dask')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- floors
# The library is built in floors: a module imports only modules below it, so that no import
# circle is closed by an import hidden inside a function (such circles only work while every
# function-level import happens to run late enough). Imports inside functions are counted; the
# ones kept there only to keep start-up light (torch, distributed, ...) must still go down.


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def import_graph(root: Path, package: str = "pipeline") -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` over the package's modules (a package's
    ``__init__`` is the package's own module), from every import statement at any depth
    (functions included; ``if TYPE_CHECKING:`` blocks excepted). ``from pipeline.x import y``
    is an edge to ``pipeline.x.y`` when that is a module, else to ``pipeline.x``; importing a
    module of another package also runs that package's ``__init__``: an edge to it too."""
    paths = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def nearest(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for module, path in paths.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = graph[module] = {}

        def add(name: str, line: int) -> None:
            target = nearest(name)
            while target and not (module == target or module.startswith(target + ".")):
                edges.setdefault(target, line)  # the module and the packages it runs on the way
                target = nearest(target.rpartition(".")[0])

        def visit(node: ast.AST) -> None:
            for child in ast.iter_child_nodes(node):
                if _is_type_checking(child):
                    continue
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        add(alias.name, child.lineno)
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:  # relative: from . import x, from ..y import z
                        anchor = here.split(".")[: len(here.split(".")) - child.level + 1]
                        base = ".".join(anchor + ([base] if base else []))
                    for alias in child.names:
                        full = f"{base}.{alias.name}"
                        add(full if full in paths else base, child.lineno)
                visit(child)

        visit(ast.parse(path.read_text()))
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle ``[a, b, ..., a]`` of ``graph``, or None when it has none."""
    state: dict[str, str] = {}  # "open" while on the depth-first path, "done" after
    path: list[str] = []

    def walk(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, {})):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := walk(target)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := walk(module)):
            return cycle
    return None


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_library_has_no_import_circle():
    graph = import_graph(ROOT)
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle: {_describe(graph, cycle)}"


def test_the_circle_finder_sees_function_level_and_relative_imports(tmp_path):
    (tmp_path / "pipeline" / "sub").mkdir(parents=True)
    files = {
        "pipeline/__init__.py": "",
        "pipeline/low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline import high\n",
        "pipeline/high.py": "from pipeline import low\n",
        "pipeline/sub/__init__.py": "from .a import f\n",
        "pipeline/sub/a.py": "def f():\n    from pipeline.high import g\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["pipeline.sub"] == {"pipeline.sub.a": 1}
    assert find_cycle(graph) is None  # a TYPE_CHECKING import closes no circle
    (tmp_path / "pipeline/low.py").write_text("def f():\n    from pipeline.sub import a\n")
    graph = import_graph(tmp_path)
    assert graph["pipeline.low"] == {"pipeline.sub.a": 2, "pipeline.sub": 2}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"pipeline.low", "pipeline.high", "pipeline.sub.a"} <= set(cycle)


# The bottom floor: what every other part of the library builds on, importing (almost) nothing.
BOTTOM = {"pipeline.errors": set(), "pipeline.numerics": set(), "pipeline.keyed_random": set(),
          "pipeline.plugins": {"pipeline.errors"}, "pipeline.registry": {"pipeline.errors"}}


@pytest.mark.parametrize("module", sorted(BOTTOM))
def test_the_bottom_floor_imports_nothing_above_it(module):
    assert set(import_graph(ROOT)[module]) <= BOTTOM[module]


def test_config_imports_none_of_the_modules_that_check_its_values():
    """pipeline.settings calls the owners' checks; config below them imports none of them."""
    owners = {"pipeline.data", "pipeline.augment", "pipeline.sparse", "pipeline.plugins"}
    assert not set(import_graph(ROOT)["pipeline.config"]) & owners
