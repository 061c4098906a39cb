"""The loss zoo through the CLI: every registered loss trains a student from a cache, a sweep
over the zoo lands one row per loss and the report groups them, map losses read an unpooled
cache's map and the student's layer of the same name, and each option a loss declares
(loss_weight, standardize_logits, student_layer) is recorded in the run's row and config."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.losses import LOSSES
from pipeline.results import read_results, results_dir
from stages.cli import main as cli


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    from conftest import build

    work = tmp_path_factory.mktemp("zoo")
    build(work / "cache", work)
    return work / "cache"


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """A cache of cnn_small's last conv block, unpooled ([C, 4, 4] per row)."""
    from conftest import build

    work = tmp_path_factory.mktemp("zoo-maps")
    build(work / "cache", work, layers="block3.2", pool="false")
    return work / "cache"


def run(capsys, *argv: str) -> dict:
    from conftest import run_cli

    return run_cli(capsys, *argv)


def config_of(row: dict) -> dict:
    from pathlib import Path

    return json.loads((Path(row["run_dir"]) / "config.json").read_text())["config"]


def test_a_sweep_over_the_zoo_lands_one_row_per_loss_and_the_report_groups_them(pooled, tmp_path, capsys):
    copy = tmp_path / "cache"
    shutil.copytree(pooled, copy)
    zoo = "kd dkd dist nkd rkd pkt sp crd"
    summary = run(capsys, "sweep", f"cache={copy}", f"runs_dir={tmp_path}/runs", "grid.model=cnn_small",
                  f"grid.loss={zoo}", "grid.seed=0", "epochs=1")
    rows = read_results(results_dir(copy)).to_pylist()
    assert summary["runs"] == 8 and sorted(r["loss"] for r in rows) == sorted(zoo.split())
    for r in rows:
        needs = LOSSES.declared(r["loss"])
        assert r["loss_weight"] == needs.weight  # the declared default, recorded
        assert r["standardize_logits"] == (False if needs.temperature else None)
        assert r["student_layer"] == ("embed" if needs.features else None)
        assert (r.get("temperature") is not None) == needs.temperature
    report = run(capsys, "report", f"cache={copy}", f"out={tmp_path}/report")
    text = (tmp_path / "report" / "leaderboard.md").read_text()
    by_loss = text.split("## By loss")[1].split("##")[0]
    assert all(f"| cnn_small | {name} |" in by_loss for name in zoo.split())
    assert report["runs"] == 8


def test_options_a_loss_declares_are_recorded(pooled, tmp_path, capsys):
    row = run(capsys, "student", f"cache={pooled}", f"runs_dir={tmp_path}/runs", "model=mlp",
              "loss=dist", "standardize_logits=true", "loss_weight=0.5", "epochs=1")
    assert row["standardize_logits"] is True and row["loss_weight"] == 0.5
    config = config_of(row)
    assert config["standardize_logits"] is True and config["loss_weight"] == 0.5
    assert config["student_layer"] is None  # dist reads no feature

    row = run(capsys, "student", f"cache={pooled}", f"runs_dir={tmp_path}/runs", "model=cnn_small",
              "loss=sp", "student_layer=block2.2", "epochs=1")
    assert row["student_layer"] == "block2.2" and config_of(row)["student_layer"] == "block2.2"
    assert row["loss_weight"] == LOSSES.declared("sp").weight and row["standardize_logits"] is None


def test_attention_transfer_reads_the_cached_map_and_the_students_layer_of_that_name(maps, tmp_path, capsys):
    info = run(capsys, "info", f"cache={maps}")
    assert info["layers"]["block3.2"] == [128, 4, 4]
    row = run(capsys, "student", f"cache={maps}", f"runs_dir={tmp_path}/runs", "model=cnn_small",
              "loss=at", "epochs=1")
    assert row["layer"] == "block3.2" and row["student_layer"] == "block3.2"
    assert row["loss_weight"] == 1.0 and 0.0 <= row["test_accuracy"] <= 1.0
    # relational losses compare the flattened maps
    row = run(capsys, "student", f"cache={maps}", f"runs_dir={tmp_path}/runs", "model=cnn_small",
              "loss=rkd", "epochs=1")
    assert row["student_layer"] == "block3.2"


def test_a_map_loss_with_a_student_layer_that_is_not_a_map_is_refused(maps, tmp_path, capsys):
    capsys.readouterr()
    rc = cli(["student", f"cache={maps}", f"runs_dir={tmp_path}/runs", "model=cnn_small", "loss=at",
              "student_layer=embed", "epochs=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "loss at compares spatial feature maps" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.json"))
