"""The README's printed example output is what the CLI prints.

Each output block in README.md follows a marker ``<!-- output: kdcache VERB -->``. This test runs
the verb on a tiny cache (conftest's synthetic dataset, a teacher trained for one epoch) and
compares the block with the verb's stdout line by line, after masking what differs between
machines and datasets: paths, fingerprints, run ids and numbers (counts, accuracies, sizes,
times). What is left, the line shapes and their fixed words, must match exactly, so a change to
what a verb prints fails here until the README shows it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import SMALL_DATASET, cache_args
from stages.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- output: kdcache (?P<verb>\w+) -->\n```\n(?P<body>.*?)```", re.S)
# Blocks of verbs whose printed output another part of the suite owns: `report` (its
# leaderboard's layout is checked, and being reworked, by the report's own tests).
OWNED_ELSEWHERE = {"report"}
CHECKED = {"cache", "student", "export"}  # every other verb's block is checked here
README_DATASET = "digits"  # the quick start's dataset, named where the tiny cache names its own

MASKS = [
    (re.compile(r"\b\d{8}-\d{6}-[\w.-]+-[0-9a-f]{6}\b"), "<id>"),  # run ids (also inside paths)
    (re.compile(r"[\w.~<>-]*/[^\s,;()]*"), "<path>"),  # paths; also x/y such as ms/sample, 360/360
    (re.compile(r"\b[0-9a-f]{16}\b"), "<hex>"),  # fingerprints, as info prints them
    (re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?"), "<n>"),  # numbers, 1,797 and 6.2e-06
]


def mask(line: str) -> str:
    for pattern, placeholder in MASKS:
        line = pattern.sub(placeholder, line)
    return line.rstrip()


def blocks() -> list[tuple[str, str]]:
    return [(m["verb"], m["body"]) for m in BLOCK.finditer(README.read_text())]


@pytest.fixture(scope="module")
def printed(tmp_path_factory) -> dict[str, str]:
    """Each checked verb's stdout, run as the README's quick start runs it, on a tiny cache."""
    import contextlib
    import io

    work = tmp_path_factory.mktemp("readme")
    out = {}

    def run(verb: str, *args: str) -> str:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            assert main([verb, *args]) == 0
        return buf.getvalue().replace(SMALL_DATASET, README_DATASET)

    # make teacher-cache on a fresh clone: the default teacher is trained first
    out["cache"] = run("cache", *cache_args(work / "cache", work, teacher_ckpt="", epochs=1))
    # make student MODEL=cnn_small LOSS=kd TEMPERATURE=4 ALPHA=0.9 SEED=1
    out["student"] = run("student", f"cache={work / 'cache'}", f"runs_dir={work / 'runs'}",
                         "model=cnn_small", "loss=kd", "temperature=4", "alpha=0.9", "seed=1", "epochs=1")
    run_dir = re.search(r"^run  (.*)$", out["student"], re.M)[1]
    out["export"] = run("export", f"run={run_dir}")
    return out


def test_the_readme_has_a_block_for_each_checked_verb():
    verbs = [verb for verb, _ in blocks()]
    assert CHECKED <= set(verbs), f"README output blocks: {verbs}"
    assert set(verbs) <= CHECKED | OWNED_ELSEWHERE, f"a block of a verb nothing checks: {verbs}"


@pytest.mark.parametrize("index", range(len(blocks())))
def test_a_readme_block_is_what_the_verb_prints(index, printed):
    verb, body = blocks()[index]
    if verb in OWNED_ELSEWHERE:
        pytest.skip(f"the {verb} block is checked by the {verb} tests")
    expected = [mask(line) for line in body.splitlines()]
    actual = [mask(line) for line in printed[verb].splitlines()]
    assert expected == actual, (f"README's `kdcache {verb}` block differs from what it prints "
                                f"(masked):\nREADME:\n" + "\n".join(expected) + "\nprinted:\n" + "\n".join(actual))


def test_masks_keep_words_and_shapes():
    """The masks hide values, never the words around them."""
    assert mask("on disk    0.56 MB") == "on disk    <n> MB"
    assert mask("exported data/runs/d-c/20261206-101010-mlp-kd-s1-a1b2c3/student.onnx (onnx, 24,430 bytes)") \
        == "exported <path> (onnx, <n> bytes)"
    assert mask("dataset    digits  [8efaf6a5135924c0]") == "dataset    digits  [<hex>]"
    assert mask("max |logit difference| 6.20e-06, float16") == "max |logit difference| <n>, float16"
    assert mask("computed 1,797 rows in 0.5s") != mask("computed 1,797 views in 0.5s")
