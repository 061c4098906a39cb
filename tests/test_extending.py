"""Extending kdcache: a loss or a student registered from outside (here, inside a test) works end
to end through `kdcache student` and `kdcache sweep`, and what it declares once decides what is
read, recorded and swept. Also: every key a run produces is a column of the results table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch.nn.functional as F

from pipeline.losses import LOSSES, Adapter, soft_kl
from pipeline.results import MEASURED, RUN_KEYS, append_row, read_results, results_dir
from pipeline.students import STUDENTS, FeatureStudent, hyperparameters
from stages.cli import main as cli


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from conftest import build

    work = tmp_path_factory.mktemp("extending")
    build(work / "cache", work)
    return work / "cache"


def run(capsys, *argv: str) -> dict:
    from conftest import run_cli

    return run_cli(capsys, *argv)


@pytest.fixture
def half_kd():
    """A temperature loss declared once, at registration (and removed after the test)."""
    seen = []

    @LOSSES.register("half_kd", temperature=True)
    def half_kd(z_s, y, *, z_t, T, log_p_t, p_t, **_):
        """L = ½ · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + ½ · CE(z_s, y)."""
        seen.append(T)
        return 0.5 * T * T * soft_kl(z_s, z_t, T, log_p_t, p_t) + 0.5 * F.cross_entropy(z_s, y)

    yield seen
    LOSSES.unregister("half_kd")


@pytest.fixture
def hint_only():
    """A feature loss that declares it reads no logits: the trainer must not hand it any."""

    @LOSSES.register("hint_only", logits=False, features=True, head=Adapter)
    def hint_only(z_s, y, *, hint, f_t, head, **kwargs):
        """L = CE(z_s, y) + mean (r(h_s) − f_t)², r a learned adapter (the declared head)."""
        assert "z_t" not in kwargs and "T" in kwargs and kwargs["T"] is None
        return F.cross_entropy(z_s, y) + F.mse_loss(head(hint), f_t)

    yield
    LOSSES.unregister("hint_only")


def test_a_registered_loss_runs_end_to_end_with_its_temperature(cache, tmp_path, capsys, half_kd):
    row = run(capsys, "student", f"cache={cache}", f"runs_dir={tmp_path}/runs", "model=mlp",
              "loss=half_kd", "epochs=1")
    assert row["loss"] == "half_kd" and row.get("temperature") == 4.0  # the cache's default
    assert set(half_kd) == {4.0}
    config = json.loads((tmp_path / "runs" / cache.name / row["run_id"] / "config.json").read_text())
    assert config["config"]["params"]["temperature"] == 4.0 and config["config"]["loss"] == "half_kd"

    copy = tmp_path / "sweep-cache"
    import shutil

    shutil.copytree(cache, copy)
    summary = run(capsys, "sweep", f"cache={copy}", f"runs_dir={tmp_path}/runs", "model=mlp",
                  "grid.loss=half_kd,ce", "grid.temperature=2,3", "seed=0", "epochs=1")
    got = sorted((r["loss"], r.get("temperature") or 0.0) for r in read_results(results_dir(copy)).to_pylist())
    assert summary["runs"] == 3 and got == [("ce", 0.0), ("half_kd", 2.0), ("half_kd", 3.0)]
    assert {2.0, 3.0} <= set(half_kd)


def test_a_loss_that_reads_no_logits_gets_none(cache, tmp_path, capsys, hint_only):
    row = run(capsys, "student", f"cache={cache}", f"runs_dir={tmp_path}/runs", "model=mlp",
              "loss=hint_only", "epochs=1")
    assert row["loss"] == "hint_only" and "temperature" not in row and row["layer"] == "embed"
    with _refused(capsys, "temperature=2 does not apply: model mlp with loss hint_only takes no temperature"):
        assert cli(["student", f"cache={cache}", f"runs_dir={tmp_path}/runs", "model=mlp",
                    "loss=hint_only", "temperature=2"]) == 2


class _refused:
    """Context: the CLI call inside exits 2 with a one-line message containing ``text``."""

    def __init__(self, capsys, text: str):
        self.capsys, self.text = capsys, text

    def __enter__(self):
        self.capsys.readouterr()

    def __exit__(self, *exc):
        _, err = self.capsys.readouterr()
        assert len(err.strip().splitlines()) == 1 and self.text in err, err


def test_a_registered_student_runs_through_the_contract(cache, tmp_path, capsys):
    """A student from outside: one class with fit_cache, one registration."""

    class Centroids(FeatureStudent):
        """Nearest class mean of the cached features (a toy, but a whole student)."""

        def __init__(self, seed: int = 0):
            self.seed = seed

        def fit_cache(self, data):
            X, y = data.features("train"), data.labels("train")
            self.classes_ = np.arange(data.num_classes)
            self.means_ = np.stack([X[y == k].mean(0) for k in self.classes_])
            return self

        def decision_function(self, X):
            X = np.asarray(X[0:len(X)])
            return -((X[:, None, :] - self.means_[None]) ** 2).sum(-1)

        has_proba = False

        @property
        def n_params_(self):
            return int(self.means_.size)

        def tensors(self):
            return {"means": self.means_}

    STUDENTS.register("centroids", kind="features")(lambda cfg: Centroids(seed=cfg.seed))
    try:
        row = run(capsys, "student", f"cache={cache}", f"runs_dir={tmp_path}/runs", "model=centroids")
        assert row["model"] == "centroids" and row["kind"] == "features" and row["layer"] == "embed"
        assert row["loss"] is None and "target" not in row and "temperature" not in row
        assert 0.0 <= row["test_accuracy"] <= 1.0
    finally:
        STUDENTS.unregister("centroids")


@pytest.mark.parametrize("model", ["linear_svc", "logreg_soft", "mlp"])
def test_every_key_a_run_produces_is_a_results_column(cache, tmp_path, capsys, model):
    quick = ["epochs=1"] if model == "mlp" else []
    row = run(capsys, "student", f"cache={cache}", f"runs_dir={tmp_path}/runs", f"model={model}", *quick)
    # the summary adds where the row went and the tracker's run id (the row is written before
    # tracking starts, so a tracker can never hold a row back)
    columns = set(RUN_KEYS.names) | set(MEASURED.names) | set(hyperparameters(model, row["loss"]))
    assert set(row) - {"results", "tracking_run_id"} == columns
    stored = [r for r in read_results(results_dir(cache)).to_pylist() if r["run_id"] == row["run_id"]]
    assert [{k: v for k, v in r.items() if k in columns} for r in stored] == [{k: row[k] for k in columns}]


def test_append_row_refuses_a_row_without_a_measured_column(tmp_path):
    row = {name: None for name in (*RUN_KEYS.names, *MEASURED.names)} | {"run_id": "r1", "time": "t"}
    with pytest.raises(ValueError, match=r"lacks columns: \['ece'\]"):
        append_row(tmp_path, {k: v for k, v in row.items() if k != "ece"})
    assert not list(tmp_path.iterdir())
    append_row(tmp_path, {**row, "depth": 3})  # a hyperparameter is a column of its own
    assert read_results(tmp_path).column("depth").to_pylist() == [3]


def test_rows_written_before_one_name_per_concept_still_read_and_report(cache, tmp_path, capsys):
    """A results table from an earlier kdcache (column T, 0 for unused; loss = target=labels or
    soft for feature students) reads as today's columns, and report works on the mix."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    run(capsys, "student", f"cache={copy}", f"runs_dir={tmp_path}/runs", "model=logreg")
    old = {"run_id": "old-1", "time": "2026-11-01T00:00:00", "model": "linear_svc", "kind": "features",
           "loss": "target=labels", "T": 0.0, "alpha": 0.9, "seed": 0, "epochs": 60, "C": "",
           "layer": "embed", "test_accuracy": 0.5, "val_accuracy": 0.5, "teacher_agreement": 0.5,
           "kl_teacher_student": 1.0, "ece": 0.1, "params": 10, "fit_seconds": 0.1, "latency_ms": 0.01,
           "teacher_test_accuracy": 0.4, "teacher_fingerprint": "f", "dataset_fingerprint": "d",
           "cache": str(copy), "run_dir": "/nowhere"}
    pq.write_table(pa.Table.from_pylist([old]), results_dir(copy) / "old-1.parquet")
    rows = {r["run_id"]: r for r in read_results(results_dir(copy)).to_pylist()}
    legacy = rows["old-1"]
    assert (legacy["loss"], legacy.get("target"), legacy.get("temperature"), legacy["views"], legacy.get("C")) == \
        (None, "labels", None, 1, None)
    report = run(capsys, "report", f"cache={copy}")
    assert report["runs"] == 2 and report["groups"] == 2
