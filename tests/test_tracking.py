"""tracking=mlflow against a real local MLflow store (sqlite, in the test's tmp directory):
the run is found through MLflow's own search API with its params, metrics, series, tags and
artifacts; a store that fails costs a warning line, never the run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from pipeline.results import read_results, results_dir
from stages.cli import main

import mlflow


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # MLflow caches the URI of an earlier test in this process
    yield uri
    mlflow.set_tracking_uri("")


@pytest.fixture
def cache(make_cache) -> Path:
    return make_cache(teacher="mlp")


def test_a_run_is_found_in_mlflow(store, cache, tmp_path, capsys):
    row = run_cli(capsys, "student", f"cache={cache}", f"runs_dir={tmp_path / 'runs'}",
                  "model=mlp", "epochs=3", "tracking=mlflow")
    runs = mlflow.search_runs(experiment_names=[f"kdcache/{cache.name}"], output_format="list")
    assert len(runs) == 1
    found = runs[0]
    assert found.info.run_id == row["tracking_run_id"] and found.info.run_name == row["run_id"]
    assert found.data.tags["kdcache.run_id"] == row["run_id"]
    assert found.data.tags["kdcache.teacher_fingerprint"] == row["teacher_fingerprint"]
    # params: the resolved config, exactly as config.json records it
    config = json.loads((Path(row["run_dir"]) / "config.json").read_text())["config"]
    config.update(config.pop("params"))  # one MLflow param per hyperparameter
    assert found.data.params == {k: str(v) for k, v in config.items()}
    assert found.data.metrics["test_accuracy"] == row["test_accuracy"]
    assert found.data.metrics["latency_b1_ms"] == row["latency_b1_ms"]
    history = mlflow.MlflowClient().get_metric_history(found.info.run_id, "epoch/val_accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(found.info.run_id)}
    assert {"config.json", "metrics.json", "student.safetensors", "log.jsonl"} <= artifacts


def test_a_sweep_tracks_every_run(store, cache, tmp_path, capsys):
    run_cli(capsys, "sweep", f"cache={cache}", f"runs_dir={tmp_path / 'runs'}",
            "grid.model=logreg", "grid.seed=0 1", "tracking=mlflow")
    runs = mlflow.search_runs(experiment_names=[f"kdcache/{cache.name}"], output_format="list")
    rows = read_results(results_dir(cache)).to_pylist()
    assert sorted(r.info.run_name for r in runs) == sorted(r["run_id"] for r in rows)


def test_without_a_uri_runs_go_to_the_data_folder(cache, tmp_path, capsys, monkeypatch):
    """MLFLOW_TRACKING_URI unset: the store is data/mlflow under the working directory (which
    .gitignore's /data/* covers), never MLflow's mlflow.db and mlruns/ in the working directory;
    the printed line says where."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    capsys.readouterr()
    try:
        assert main(["student", f"cache={cache}", f"runs_dir={tmp_path / 'runs'}", "model=logreg",
                     "tracking=mlflow"]) == 0
        out = capsys.readouterr().out
        db = tmp_path / "data" / "mlflow" / "mlflow.db"
        assert db.is_file()
        assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
        assert f"in sqlite:///{db}, artifacts in {tmp_path / 'data' / 'mlflow' / 'artifacts'}" in out
        mlflow.set_tracking_uri(f"sqlite:///{db}")
        (run,) = mlflow.search_runs(experiment_names=[f"kdcache/{cache.name}"], output_format="list")
        artifacts = tmp_path / "data" / "mlflow" / "artifacts" / cache.name
        assert run.info.artifact_uri.startswith(artifacts.as_uri())
        assert (artifacts / run.info.run_id / "artifacts" / "config.json").is_file()
    finally:
        mlflow.set_tracking_uri("")


def test_a_tracking_failure_is_one_warning_and_keeps_the_run(cache, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("not a directory")  # a database under a file: no store
    uri = f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    capsys.readouterr()
    try:
        rc = main(["student", f"cache={cache}", f"runs_dir={tmp_path / 'runs'}", "model=logreg",
                   "tracking=mlflow"])
    finally:
        mlflow.set_tracking_uri("")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0
    assert len(err) == 1 and err[0].startswith("kdcache: warning: tracking=mlflow failed ("), err
    (row,) = read_results(results_dir(cache)).to_pylist()
    assert Path(row["run_dir"]).is_dir() and row["run_dir"] in err[0]


def test_tracking_without_mlflow_is_refused_before_training(cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` fails
    capsys.readouterr()
    rc = main(["student", f"cache={cache}", f"runs_dir={tmp_path / 'runs'}", "model=logreg",
               "tracking=mlflow"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["kdcache student: error: tracking=mlflow needs mlflow, not installed "
                               "here; pip install 'kdcache[tracking]' (or drop tracking=)"]
    assert read_results(results_dir(cache)).num_rows == 0 and not (tmp_path / "runs").exists()
