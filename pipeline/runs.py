"""One student run, start to finish, and the grid of runs of a sweep.

A run: open the cache, resolve what the run uses (loss, target, temperature, layer: from the
student's and the loss's declarations), check everything that can fail before any work,
``student.fit_cache(data)``, score val and then test exactly once, write the run directory
(privately, then renamed into place), append one row to the results table, and (with
``tracking=mlflow``) log a copy to the experiment tracker. A killed run leaves no row and no
run directory.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import secrets
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline import metrics
from pipeline.augment import parse
from pipeline.cache import TeacherCache, open_cache, softmax
from pipeline.config import StudentConfig, SweepConfig, save_config
from pipeline.errors import KdError
from pipeline.io import atomic_write_bytes, atomic_write_text, fsync_dir
from pipeline.latency import per_sample_ms
from pipeline.losses import LOSSES
from pipeline.paths import cache_path, check_writable
from pipeline.results import append_row, results_dir
from pipeline.storage import storage_errors
from pipeline.students import STUDENTS, Student, StudentData, Uses, create_student, uses
from pipeline.tracking import check_tracking, track

WEIGHTS = "student.safetensors"  # in every run directory
LATENCY_ROWS = 256  # test rows the prediction latency is timed on (already in memory)


def resolve_run(cfg: StudentConfig, cache: TeacherCache) -> tuple[StudentConfig, Uses]:
    """``cfg`` with what the run uses made concrete (the default loss or target, the cache's
    temperature, its first layer, the number of views) and what it does not use set to None."""
    use = uses(cfg)
    # (more views than the cache holds: refused by StudentData, before any training)
    views = 1 if use.augment else cache.views("train") if cfg.views == "all" else int(cfg.views)
    if use.augment:  # fits the inputs? recorded as parsed (shift:03 and shift:3 are one policy)
        use = dataclasses.replace(use, augment=parse(use.augment, tuple(cache.manifest["teacher"]["input_shape"])).spec)
    temperature = None
    if use.temperature:
        temperature = cfg.temperature if cfg.temperature is not None else cache.temperature
    layer = None
    if use.layer:
        if not cache.layers:
            what = f"loss {use.loss}" if use.loss else f"model {cfg.model}"
            raise KdError(f"cache {cache.root} holds no features (it was built with layers=none), "
                          f"and {what} reads them; train from the logits (e.g. model=cnn_small "
                          "loss=kd) or rebuild the cache with layers=NAME")
        layer = cfg.layer or cache.layers[0]
        if layer not in cache.layers:
            raise KdError(f"cache {cache.root} holds no layer {layer!r}; it holds {', '.join(cache.layers)}")
    loss_needs = LOSSES.declared(use.loss) if use.loss else None
    if loss_needs and loss_needs.maps and len(cache.manifest["layers"][layer]) < 2:
        raise KdError(f"loss {use.loss} compares spatial feature maps, but cache {cache.root} holds "
                      f"layer {layer} pooled to {tuple(cache.manifest['layers'][layer])}; build a cache "
                      "of a map with kdcache cache layers=NAME pool=false (e.g. layers=block3.2 for "
                      "cnn_small) and train with layer=NAME")
    loss_weight = None
    if use.loss_weight:
        loss_weight = cfg.loss_weight if cfg.loss_weight is not None else loss_needs.weight
    return dataclasses.replace(cfg, loss=use.loss, target=use.target, temperature=temperature,
                               layer=layer, views=str(views), augment=use.augment or "none",
                               loss_weight=loss_weight,
                               standardize_logits=cfg.standardize_logits and use.standardize_logits), use


def new_run_id(cfg: StudentConfig) -> str:
    """A new run's id, from the time, what the run is (of ``cfg`` as :func:`resolve_run` made
    it) and a random token: unique, and readable in a listing of run directories."""
    what = cfg.loss or (cfg.target and f"target-{cfg.target}")
    # a plugin's name (pkg.module:Class) becomes pkg.module-Class: no colons in file names
    return "-".join(p.replace(":", "-") for p in (
        f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}", cfg.model, what, f"s{cfg.seed}",
        secrets.token_hex(3)) if p)


def train_student(cfg: StudentConfig, progress: bool = True, run_id: str | None = None) -> dict:
    """Run one student; returns its results row plus ``results`` (the row's file).

    ``run_id`` (default: a new one) names the run directory and the results row: a sweep
    decides it before the run starts, so that a second attempt at the same run (a task Dask
    retried) replaces the first one's directory and row instead of adding its own."""
    # 1. The cache, and every check that can fail before any work is done.
    check_tracking(cfg)
    cache = open_cache(cache_path(cfg))
    cfg, use = resolve_run(cfg, cache)
    check_writable(Path(cfg.runs_dir) / cache.root.name, "runs_dir")  # before training, not after
    data = StudentData(cache, cfg.layer, progress, views=int(cfg.views))
    student = create_student(cfg.model, cfg)

    # 2. Fit, from the cache only (the teacher is never loaded).
    t0 = time.perf_counter()
    student.fit_cache(data)
    fit_seconds = time.perf_counter() - t0
    # the student's layer a feature loss read, as the student resolved it
    cfg = dataclasses.replace(cfg, student_layer=getattr(student, "student_layer_", None))

    # 3. Score: validation for the record, test exactly once.
    scores = score(student, data, use.kind)
    row = {
        "model": cfg.model, "kind": use.kind, "loss": cfg.loss, "target": cfg.target,
        "temperature": cfg.temperature, "layer": cfg.layer, "views": int(cfg.views),
        "augment": use.augment or (cache.augment["policy"] if int(cfg.views) > 1 else None),
        "alpha": cfg.alpha, "loss_weight": cfg.loss_weight,
        "standardize_logits": cfg.standardize_logits if use.standardize_logits else None,
        "student_layer": cfg.student_layer, "seed": cfg.seed,
        "epochs": cfg.epochs, "C": None if getattr(student, "C_", None) is None else str(student.C_),
        **scores, "params": int(student.n_params_), "weights_bytes": None,  # known once saved
        "fit_seconds": round(fit_seconds, 3),
        **teacher_cost(cache), "teacher_test_accuracy": cache.teacher_accuracy("test"),
        "teacher_fingerprint": cache.teacher_fingerprint, "dataset_fingerprint": cache.dataset_fingerprint,
        "cache": str(cache.root),
    }

    # 4. The run directory (written privately, then renamed), then the results row.
    run_id = run_id or new_run_id(cfg)
    run_dir = Path(cfg.runs_dir) / cache.root.name / run_id
    row.update(run_id=run_id, time=datetime.now(timezone.utc).isoformat(), run_dir=str(run_dir))
    from safetensors.numpy import save

    weights = save({k: np.ascontiguousarray(v) for k, v in student.tensors().items()},
                   metadata={"model": cfg.model, "kind": use.kind,
                             "params": json.dumps(student.get_params(), default=str)})
    row["weights_bytes"] = len(weights)  # the student's size on disk, as saved
    write_run(run_dir, cfg, weights, student, row)
    with storage_errors(results_dir(cache.root), "cache"):  # e.g. no write access to a bucket
        path = append_row(results_dir(cache.root), row)
    # 5. A copy to the experiment tracker, once the run is safe (a failure is a warning).
    tracked = track(cfg, row, run_dir, getattr(student, "history_", []))
    return {**row, "results": str(path), "tracking_run_id": tracked}


def score(student: Student, data: StudentData, kind: str) -> dict:
    """Validation accuracy, and every test metric from one pass over test."""
    X = {s: data.rows(s, kind) for s in ("val", "test")}
    y = {s: data.labels(s) for s in ("val", "test")}
    val_acc = metrics.accuracy(student.predict(X["val"]), y["val"])
    test_scores = student.decision_function(X["test"])
    test_pred = student.classes_[test_scores.argmax(1)]
    scale = None
    if student.has_proba:
        test_probs = student.predict_proba(X["test"])
    else:  # LinearSVC: calibrate margins with a temperature fitted on val
        known = np.isin(y["val"], student.classes_)  # score columns are positions in classes_
        scale = metrics.fit_temperature(student.decision_function(X["val"])[known],
                                        np.searchsorted(student.classes_, y["val"][known]))
        test_probs = softmax(test_scores / scale)
    if len(student.classes_) != data.num_classes:  # target=teacher never named some class:
        full = np.zeros((len(test_probs), data.num_classes), np.float32)  # column = class id
        full[:, student.classes_] = test_probs
        test_probs = full
    # A sparse cache names the teacher's prediction (its index) but not its whole distribution:
    # agreement is exact, the KL to the teacher is not measurable from it (null)
    sparse = data.cache.logits_mode.sparse
    teacher_test = None if sparse else data.teacher_logits("test")
    teacher_pred = data.cache.index("test").column("teacher_pred").to_numpy() if sparse else None
    # Latency: the deployed student on the CPU, timed like the teacher was (pipeline.latency)
    latency = per_sample_ms(student.cpu_predict(), X["test"][0:min(LATENCY_ROWS, len(X["test"]))])
    return {"test_accuracy": metrics.accuracy(test_pred, y["test"]), "val_accuracy": val_acc,
            "teacher_agreement": (metrics.accuracy(test_pred, teacher_pred) if sparse
                                  else metrics.teacher_agreement(test_pred, teacher_test)),
            "kl_teacher_student": None if sparse else metrics.kl_teacher_student(teacher_test, test_probs),
            "ece": metrics.ece(test_probs, y["test"]),
            "calibration_temperature": None if scale is None else round(float(scale), 6),
            "latency_b1_ms": latency["batch_1_ms"], "latency_b256_ms": latency["batch_256_ms"]}


def teacher_cost(cache: TeacherCache) -> dict:
    """The teacher's size and CPU latency as its cache recorded them when it was built (None
    for caches built before kdcache measured them): students never load the teacher."""
    teacher = cache.manifest["teacher"]
    latency = teacher.get("latency") or {}
    return {"teacher_params": teacher.get("num_params"),
            "teacher_weights_bytes": teacher.get("weights_bytes"),
            "teacher_latency_b1_ms": latency.get("batch_1_ms"),
            "teacher_latency_b256_ms": latency.get("batch_256_ms")}


def write_run(run_dir: Path, cfg: StudentConfig, weights: bytes, student: Student, row: dict) -> None:
    """``config.json`` (the run's resolved config), ``student.safetensors``, ``metrics.json``
    and ``log.jsonl``, assembled in a private directory and renamed into place.

    A run directory already in place is an earlier attempt at this very run (its run_id was
    decided before the first attempt: a retried sweep task) and is replaced whole; so are the
    private directories that killed attempts left. Each attempt assembles in a directory of
    its own, so two attempts at once never write into one."""
    prefix = f".{run_dir.name}.incomplete"
    for stale in run_dir.parent.glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = run_dir.parent / f"{prefix}-{secrets.token_hex(3)}"
    tmp.mkdir(parents=True)
    try:
        save_config(cfg, tmp / "config.json")
        atomic_write_bytes(tmp / WEIGHTS, weights)
        atomic_write_text(tmp / "metrics.json", json.dumps(row, indent=2, default=str) + "\n")
        history = getattr(student, "history_", [])
        log = [json.dumps(h) for h in history] + [json.dumps({"final": row}, default=str)]
        atomic_write_text(tmp / "log.jsonl", "\n".join(log) + "\n")
        if run_dir.exists():  # the earlier attempt's, moved aside under the private prefix
            earlier = tmp.with_name(f"{tmp.name}-earlier")
            run_dir.rename(earlier)
            tmp.rename(run_dir)
            shutil.rmtree(earlier)
        else:
            tmp.rename(run_dir)
        fsync_dir(run_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sweep_runs(cfg: SweepConfig) -> list[StudentConfig]:
    """Every combination of models × losses × temperatures × seeds that applies: a student
    without a loss runs once per seed (and temperature, if it uses one); a loss without a
    temperature once per seed. Every name is checked before the first run."""
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(StudentConfig)}
    for name in cfg.models:
        STUDENTS.get(name)
    for name in cfg.losses:
        LOSSES.get(name)
    temperatures = cfg.temperatures or (cfg.temperature,)
    runs, seen = [], set()
    for model, loss, temperature, seed in itertools.product(cfg.models, cfg.losses, temperatures,
                                                            cfg.seeds):
        run = applicable(StudentConfig(**{**base, "model": model, "loss": loss,
                                          "temperature": temperature, "seed": seed}))
        key = (model, run.loss, run.temperature, seed)
        if key not in seen:
            seen.add(key)
            runs.append(run)
    # a value that no run of the grid keeps was given for nothing: refused, like a student's
    for key in ("target", "layer", "loss_weight", "standardize_logits", "student_layer",
                *(() if cfg.temperatures else ("temperature",))):
        value = getattr(cfg, key)
        if value not in (None, False) and all(getattr(run, key) in (None, False) for run in runs):
            raise KdError(f"{key}={_shown(value)} does not apply to any run of this sweep (models "
                          f"{' '.join(cfg.models)}, losses {' '.join(cfg.losses)}); drop {key}=")
    if cfg.temperatures and all(run.temperature is None for run in runs):
        raise KdError(f"temperatures={' '.join(f'{t:g}' for t in cfg.temperatures)} does not apply: no run "
                      f"of this sweep uses a temperature (models {' '.join(cfg.models)}, losses "
                      f"{' '.join(cfg.losses)}); drop temperatures=")
    return runs


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def applicable(cfg: StudentConfig) -> StudentConfig:
    """``cfg`` without the values of axes its student (and loss) do not have."""
    needs = STUDENTS.declared(cfg.model)
    cfg = dataclasses.replace(cfg, loss=cfg.loss if needs.loss else None,
                              target=cfg.target if needs.target else None)
    use = uses(dataclasses.replace(cfg, temperature=None, layer=None, loss_weight=None,
                                   standardize_logits=False, student_layer=None))
    return dataclasses.replace(cfg, temperature=cfg.temperature if use.temperature else None,
                               layer=cfg.layer if use.layer else None,
                               loss_weight=cfg.loss_weight if use.loss_weight else None,
                               standardize_logits=cfg.standardize_logits and use.standardize_logits,
                               student_layer=cfg.student_layer if use.student_layer else None)

