"""The Makefile refuses a variable that no goal takes, before anything runs, and passes each
variable it takes through to its verb (all under ``make -n``: no venv, nothing executed)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = ROOT / "Makefile"
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


# what a parent make (``make test`` runs this file) passes down: a sub-make would print
# "Entering directory" lines and take the parent's flags
PARENT_MAKE = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "MAKE_TERMOUT", "MAKE_TERMERR")


def make_n(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in PARENT_MAKE}
    return subprocess.run(["make", "-n", "-f", str(MAKEFILE), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**base, **(env or {})})


def takes() -> dict[str, list[str]]:
    """target -> the variables its ``TAKES.target`` line lists."""
    return {m[1]: m[2].split() for m in re.finditer(r"^TAKES\.([\w-]+)\s*:=(.*)$", MAKEFILE.read_text(), re.M)}


def test_a_misspelt_variable_is_refused_before_setup():
    proc = make_n("student", "MODLE=cnn_small", "EPOCHS=5")
    assert proc.returncode == 2
    assert proc.stdout == ""  # not even setup's recipe was printed
    assert proc.stderr.count("\n") == 1
    assert ("unknown variable MODLE for `make student`; it takes CACHE MODEL LOSS TEMPERATURE "
            "ALPHA EPOCHS LR SEED and ARGS='key=value ...'") in proc.stderr


def test_a_variable_of_another_target_is_refused():
    proc = make_n("sweep", "SEED=3")
    assert proc.returncode == 2
    assert "unknown variable SEED for `make sweep`; it takes CACHE MODELS LOSSES SEEDS" in proc.stderr
    proc = make_n("test", "ARGS=model=mlp")
    assert proc.returncode == 2 and "unknown variable ARGS for `make test`; it takes PYTEST_ARGS." in proc.stderr


def test_environment_and_make_variables_do_not_count():
    proc = make_n("student", "MODEL=cnn_small", env={"MODLE": "x", "PYTHON": "python3", "SEEDS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "'model=cnn_small'" in proc.stdout
    assert make_n("student", "PYTHON=python3", "MAKEFLAGS=").returncode == 0


# make sweep's lists are the grid's axes
GRID = {"MODELS": "grid.model", "LOSSES": "grid.loss", "SEEDS": "grid.seed", "TEMPERATURES": "grid.temperature"}


def test_several_goals_take_the_union():
    proc = make_n("student", "sweep", "MODEL=mlp", "SEEDS=1 2")
    assert proc.returncode == 0, proc.stderr
    assert "'model=mlp'" in proc.stdout and "'grid.seed=1 2'" in proc.stdout


@pytest.mark.parametrize("target", ["teacher", "teacher-cache", "info", "student", "sweep", "report",
                                    "verify", "export"])
def test_every_variable_a_verb_target_takes_reaches_its_verb(target):
    variables = takes()[target]
    assert variables
    proc = make_n(target, *(f"{v}=v{i}" for i, v in enumerate(variables)), "ARGS=seed=7")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if "kdcache " in line)
    recipe = proc.stdout[proc.stdout.index(line):]
    for i, v in enumerate(variables):
        key = GRID.get(v, v.lower()) if target == "sweep" else v.lower()
        assert f"'{key}=v{i}'" in recipe, (v, recipe)
    assert recipe.rstrip().endswith("seed=7")


def test_text_datasets_pass_through():
    """The README's text example: a text: dataset, an hf: teacher, and column keys in ARGS (a
    quoted value with a space reaches kdcache as one argument)."""
    proc = make_n("teacher-cache", "DATASET=text:mail.csv", "TEACHER=hf:models/minilm",
                  "ARGS=text_column=body label_column=topic")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if "kdcache cache" in line)
    assert "'dataset=text:mail.csv' 'teacher=hf:models/minilm'" in line
    assert line.split()[-2:] == ["text_column=body", "label_column=topic"]
    proc = make_n("teacher-cache", "DATASET=textdir:docs", "ARGS=text_column='email body'")
    line = next(line for line in proc.stdout.splitlines() if "kdcache cache" in line)
    assert "'dataset=textdir:docs'" in line
    assert shlex.split(line)[-1] == "text_column=email body"  # as the recipe's shell splits it
