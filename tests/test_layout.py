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
