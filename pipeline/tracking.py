"""Experiment tracking: every student run also logged to MLflow, with ``tracking=mlflow``.

kdcache's results table stays the source of truth; the tracker gets a copy. The run directory
and its results row are written *before* tracking starts, so a tracking failure (a store that
refuses the run, a server that is down) costs one warning line on stderr, never the run;
MLflow missing altogether is refused before training, like any bad input.

The store is ``MLFLOW_TRACKING_URI`` (e.g. ``http://HOST:5000``, a tracking server), or when it
is unset a local one under the data folder, beside the caches and runs (git-ignored):
``sqlite:///<cwd>/data/mlflow/mlflow.db``, with new experiments' artifacts in
``data/mlflow/artifacts`` (MLflow's own default would write ``mlflow.db`` and ``mlruns/`` into
the working directory). One MLflow experiment per cache,
``kdcache/<cache name>``; one MLflow run per student run, named by kdcache's run id, with

- params: the run's resolved config (its run keys and every hyperparameter; None as ``None``);
- metrics: the results row's numbers (test_accuracy, val_accuracy, teacher_agreement, ...),
  and each epoch's training loss, validation accuracy and loss as series ``epoch/train_loss``,
  ``epoch/val_accuracy``, ``epoch/val_loss`` (step = epoch);
- tags: ``kdcache.run_id``, ``kdcache.cache``, ``kdcache.model``, ``kdcache.loss`` and the
  teacher's and dataset's fingerprints;
- artifacts: the run directory (config.json, metrics.json, student.safetensors, log.jsonl).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from pipeline.config import StudentConfig, to_dict
from pipeline.errors import KdError, first_line

MAX_PARAM = 6000  # characters MLflow stores per param value
DEFAULT_STORE = Path("data") / "mlflow"  # relative to the working directory, like data/caches


def check_tracking(cfg: StudentConfig) -> None:
    """Refuse, before any training, a tracker that is not installed."""
    if cfg.tracking == "mlflow":
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise KdError("tracking=mlflow needs mlflow, not installed here; pip install "
                          "'kdcache[tracking]' (or drop tracking=)") from None


def track(cfg: StudentConfig, row: dict, run_dir: Path, history: list[dict]) -> str | None:
    """Log one finished run to ``cfg.tracking``; returns the tracker's run id (None: no
    tracking, or it failed and said so in one warning line)."""
    if cfg.tracking == "none":
        return None
    try:
        return _mlflow(cfg, row, run_dir, history)
    except Exception as exc:  # the run is already saved: a tracker must never lose it
        first = first_line(exc)
        print(f"kdcache: warning: tracking={cfg.tracking} failed ({type(exc).__name__}: {first}); "
              f"the run is saved in {run_dir} and the results table", file=sys.stderr)
        return None


def store() -> tuple[str, str | None]:
    """Where runs are logged: (tracking URI, artifact location of a new experiment; None: the
    store's own default). ``MLFLOW_TRACKING_URI`` when set, else the default store under
    ``data/mlflow``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    root = DEFAULT_STORE.absolute()
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def _mlflow(cfg: StudentConfig, row: dict, run_dir: Path, history: list[dict]) -> str:
    import mlflow

    uri, artifacts = store()
    if artifacts is not None:
        DEFAULT_STORE.absolute().mkdir(parents=True, exist_ok=True)  # sqlite creates no folder
    name = f"kdcache/{Path(row['cache']).name}"
    with _quiet("mlflow", "alembic"), _using(uri):
        if artifacts is not None and mlflow.get_experiment_by_name(name) is None:
            mlflow.create_experiment(name, artifact_location=f"{artifacts}/{Path(row['cache']).name}")
        mlflow.set_experiment(name)
        with mlflow.start_run(run_name=row["run_id"]) as active:
            config = to_dict(cfg)
            config.update(config.pop("params"))  # one MLflow param per hyperparameter
            mlflow.log_params({k: str(v)[:MAX_PARAM] for k, v in config.items()})
            mlflow.log_metrics({k: float(v) for k, v in row.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
            for entry in history:
                if "epoch" in entry:
                    mlflow.log_metrics({f"epoch/{k}": float(v) for k, v in entry.items() if k != "epoch"
                                        and isinstance(v, (int, float)) and not isinstance(v, bool)},
                                       step=int(entry["epoch"]))
            mlflow.set_tags({"kdcache.run_id": row["run_id"], "kdcache.cache": row["cache"],
                             "kdcache.model": row["model"], "kdcache.loss": str(row["loss"]),
                             "kdcache.teacher_fingerprint": row["teacher_fingerprint"],
                             "kdcache.dataset_fingerprint": row["dataset_fingerprint"]})
            mlflow.log_artifacts(str(run_dir))
            return active.info.run_id


def describe_store() -> str:
    """Where a tracked run went, for the run's printed line."""
    uri, artifacts = store()
    if artifacts is None:
        return f"{uri} (MLFLOW_TRACKING_URI)"
    return (f"{uri}, artifacts in {DEFAULT_STORE.absolute() / 'artifacts'} (the default store; "
            "set MLFLOW_TRACKING_URI for another)")


@contextlib.contextmanager
def _using(uri: str):
    """MLflow logging to ``uri``. MLflow's set_tracking_uri also exports MLFLOW_TRACKING_URI
    (for its subprocesses): the environment is put back after, so that kdcache's default store
    never reads as the user's setting. (Set every time: MLflow keeps a URI set earlier in this
    process otherwise.)"""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


@contextlib.contextmanager
def _quiet(*loggers: str):
    """MLflow and its database migrations log INFO lines on every first use of a store: the
    user asked for kdcache's summary."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
