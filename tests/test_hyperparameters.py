"""Every hyperparameter declared once: a student's constructor and a loss's registration decide
the keys a run takes, its saved config, its results columns and the leaderboard's experiment
key; a sweep crosses any of them; the leaderboard's costs are timed side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import SweepConfig
from pipeline.settings import resolve
from pipeline.errors import KdError
from pipeline.report import leaderboard, markdown, teacher_of
from pipeline.results import read_results, results_dir
from pipeline.students import STUDENTS, FeatureStudent, hyperparameters, student_config
from pipeline.sweep import complete_sweep, expand


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from conftest import build

    work = tmp_path_factory.mktemp("hyper")
    build(work / "cache", work)
    return work / "cache"


def run(capsys, *argv: str) -> dict:
    from conftest import run_cli

    return run_cli(capsys, *argv)


def _row(seed: int = 0, acc: float = 0.9, time: str = "2026-12-01T00:00:00", **config) -> dict:
    """A results row as a run writes it: run keys, hyperparameters, measurements."""
    base = {"model": "mlp", "loss": "kd", "layer": None, "views": 1, "seed": seed, "width": 32,
            "lr": 0.01, "batch_size": 64, "weight_decay": 5e-4, "epochs": 60, "temperature": 4.0,
            "alpha": 0.9, "standardize_logits": False, "augment": "none"}
    measured = {"run_id": f"r{seed}-{acc}", "time": time, "kind": "inputs", "test_accuracy": acc,
                "val_accuracy": acc, "teacher_agreement": acc, "kl_teacher_student": 0.1, "ece": 0.05,
                "params": 1000, "fit_seconds": 1.0, "latency_b1_ms": 0.01, "latency_b256_ms": 0.001,
                "weights_bytes": 4000, "teacher_test_accuracy": 0.95, "run_dir": "/r"}
    return {**base, **measured, **config}


@pytest.mark.parametrize("key, a, b", [("width", 16, 256), ("lr", 0.01, 0.03), ("batch_size", 32, 64),
                                       ("weight_decay", 0.0, 5e-4), ("loss_weight", 1.0, 2.0),
                                       ("alpha", 0.5, 0.9), ("depth", 1, 2)])
def test_runs_that_differ_in_one_hyperparameter_are_two_experiments(key, a, b):
    """The issue's case: width=16 and width=256 were averaged into one row. Any config column,
    a plugin's own (depth) included, splits experiments, and the board names it."""
    rows = [_row(seed, 0.90 + seed / 100, **{key: a}) for seed in (0, 1)] + \
           [_row(seed, 0.95, **{key: b}) for seed in (0, 1)]
    board = leaderboard(rows)
    assert len(board) == 2 and {e[key] for e in board} == {a, b} and all(e["n"] == 2 for e in board)
    assert board[0]["differs"] == [key]
    text = markdown(board, teacher_of(rows), "c")
    assert f"| model | loss | {key} | test accuracy |" in text


def test_a_seed_run_twice_counts_once_and_one_seed_shows_no_spread():
    """A sweep after a single run: seed 0 twice is one repeat (its newest run), not n=3."""
    rows = [_row(0, 0.80, time="2026-12-01T00:00:00"), _row(0, 0.90, time="2026-12-02T00:00:00"),
            _row(1, 0.92, time="2026-12-02T00:01:00"), _row(2, 0.94, time="2026-12-02T00:02:00")]
    (entry,) = leaderboard(rows)
    assert entry["n"] == 3 and entry["seeds"] == [0, 1, 2]
    assert entry["mean"] == pytest.approx(np.mean([0.90, 0.92, 0.94]))
    (single,) = leaderboard(rows[:1])
    assert single["std"] is None and "±" not in markdown([single], teacher_of(rows[:1]), "c").split("\n")[6]


def test_a_student_registered_in_a_test_declares_its_own_hyperparameter(cache, tmp_path, capsys):
    """A new constructor argument reaches the CLI, the check, the saved config, the results
    table and the leaderboard with no change to config, results or report code."""

    class Shrunk(FeatureStudent):
        """LogisticRegression on the first ``keep`` features only (a toy with a new argument)."""

        def __init__(self, keep: int = 4, seed: int = 0):
            self.keep = keep
            self.seed = seed

        def fit_cache(self, data):
            from sklearn.linear_model import LogisticRegression

            X, y = data.features("train")[:, :self.keep], data.labels("train")
            self.model_ = LogisticRegression(max_iter=500).fit(X, y)
            self.classes_ = self.model_.classes_
            return self

        def decision_function(self, X):
            return self.model_.decision_function(np.asarray(X[0:len(X)])[:, :self.keep])

        def predict_proba(self, X):
            return self.model_.predict_proba(np.asarray(X[0:len(X)])[:, :self.keep])

        @property
        def n_params_(self):
            return int(self.model_.coef_.size + self.model_.intercept_.size)

        def tensors(self):
            return {"coef": self.model_.coef_}

    STUDENTS.register("shrunk", kind="features")(Shrunk)
    try:
        assert set(hyperparameters("shrunk", None)) == {"keep"}
        runs = tmp_path / "runs"
        for keep in (2, 8):
            row = run(capsys, "student", f"cache={cache}", f"runs_dir={runs}", "model=shrunk", f"keep={keep}")
            assert row["keep"] == keep
            config = json.loads((runs / cache.name / row["run_id"] / "config.json").read_text())
            assert config["config"]["params"] == {"keep": keep}
        with pytest.raises(KdError, match="keep='x' is not valid: keep expects an integer"):
            student_config([f"cache={cache}", "model=shrunk", "keep=x"])
        with pytest.raises(KdError, match="width=3 does not apply: model shrunk takes no width"):
            student_config([f"cache={cache}", "model=shrunk", "width=3"])
        shrunk = [r for r in read_results(results_dir(cache)).to_pylist() if r["model"] == "shrunk"]
        board = leaderboard(shrunk)
        assert sorted(e["keep"] for e in board) == [2, 8] and board[0]["differs"] == ["keep"]
    finally:
        STUDENTS.unregister("shrunk")


def test_a_sweep_crosses_any_declared_hyperparameter(cache):
    cfg = resolve(SweepConfig, [f"cache={cache}", "model=mlp", "loss=kd", "grid.width=16,64,256",
                                "grid.lr=0.01,0.03", "seed=0", "epochs=2"], params=complete_sweep)
    runs = expand(cfg)
    assert [(r.param("width"), r.param("lr")) for r in runs] == [
        (16, 0.01), (16, 0.03), (64, 0.01), (64, 0.03), (256, 0.01), (256, 0.03)]
    assert {r.param("epochs") for r in runs} == {2} and {r.seed for r in runs} == {0}
    # an axis is dropped for the runs that do not declare it; one that applies to none is refused
    mixed = expand(resolve(SweepConfig, [f"cache={cache}", "grid.model=logreg,mlp", "loss=kd",
                                         "grid.width=16,32", "seed=0"], params=complete_sweep))
    assert [(r.model, r.param("width")) for r in mixed] == [("logreg", None), ("mlp", 16), ("mlp", 32)]
    with pytest.raises(KdError, match="grid.width=1,2 applies to no run of this sweep"):
        resolve(SweepConfig, [f"cache={cache}", "grid.model=logreg", "grid.width=1,2"], params=complete_sweep)
    with pytest.raises(KdError, match="models= is spelled grid.model= now"):
        resolve(SweepConfig, ["models=mlp"], params=complete_sweep)


def test_a_width_sweep_reports_each_width_as_its_own_experiment(cache, tmp_path, capsys):
    copy = tmp_path / "cache"
    import shutil

    shutil.copytree(cache, copy)
    summary = run(capsys, "sweep", f"cache={copy}", f"runs_dir={tmp_path}/runs", "model=mlp", "loss=kd",
                  "grid.width=4,16", "seed=0", "epochs=1")
    assert summary["runs"] == 2 and [r["width"] for r in summary["rows"]] == [4, 16]
    report = run(capsys, "report", f"cache={copy}")
    assert report["groups"] == 2
    assert sorted((e["width"], e["params"]) for e in report["leaderboard"])[0][1] < \
        sorted((e["width"], e["params"]) for e in report["leaderboard"])[1][1]


def test_teacher_and_student_are_timed_side_by_side_not_from_the_build(tmp_path, capsys, monkeypatch):
    """A teacher timed while something loaded the machine (here: made to measure 110 ms at
    build time) does not enter the ratio: the report times both now, alternated."""
    from conftest import build

    import pipeline.cache.plan as plan

    real = plan.per_sample_ms

    def slowed(predict, rows, *a, **k):
        return {**real(predict, rows, *a, **k), "batch_1_ms": 110.2, "batch_256_ms": 50.0}

    monkeypatch.setattr(plan, "per_sample_ms", slowed)
    build(tmp_path / "cache", tmp_path)
    monkeypatch.setattr(plan, "per_sample_ms", real)
    run(capsys, "student", f"cache={tmp_path / 'cache'}", f"runs_dir={tmp_path}/runs", "model=mlp",
        "epochs=1")
    report = run(capsys, "report", f"cache={tmp_path / 'cache'}")
    (entry,) = report["leaderboard"]
    timed = entry["side_by_side"]
    # the teacher timed now, beside the student (not the 110.2 / 50 ms recorded at build time)
    assert (timed["teacher_b1_ms"], timed["teacher_b256_ms"]) != (110.2, 50.0)
    ratio = timed["teacher_b1_ms"] / timed["student_b1_ms"]
    text = (tmp_path / "cache.results" / "report" / "leaderboard.md").read_text()
    shown = f"{ratio:,.0f}×" if ratio >= 10 else f"{ratio:.1f}×"
    if ratio < 1:
        shown = f"{1 / ratio:.1f}× slower" if 1 / ratio < 10 else f"{1 / ratio:,.0f}× slower"
    assert shown in text and "110.2 / 50 ms (context only" in text
