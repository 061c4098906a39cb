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
import json
import math
import secrets
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline import metrics, runtime
from pipeline.augment import parse
from pipeline.cache import TeacherCache, open_cache
from pipeline.cache import format as fmt
from pipeline.config import Params, StudentConfig
from pipeline.errors import KdError
from pipeline.io import atomic_write_bytes, atomic_write_text, fsync_dir
from pipeline.latency import WINDOW_BATCHES, per_sample_ms, tokens_per_s
from pipeline.losses import LOSSES
from pipeline.numerics import softmax
from pipeline.paths import cache_path, check_writable
from pipeline.provenance import save_config
from pipeline.results import LM_MEASURED, append_row, config_columns, results_dir
from pipeline.storage import storage_errors
from pipeline.students import (STUDENTS, Student, StudentData, Uses, check_modality,
                               create_student, uses)
from pipeline.students.data import cache_modality
from pipeline.tracking import check_tracking, track

WEIGHTS = "student.safetensors"  # in every run directory
LATENCY_ROWS = 256  # test rows the prediction latency is timed on (already in memory)


@dataclass(frozen=True)
class Plan:
    """One student run, decided before any work: the cache it reads, its config with every
    value concrete (the cache's temperature and first layer, the number of views, the parsed
    augmentation policy), what it uses, and where it is written."""

    cfg: StudentConfig
    use: Uses
    cache: TeacherCache
    run_id: str
    run_dir: Path


def plan_run(cfg: StudentConfig, run_id: str | None = None) -> Plan:
    """Every check and default of a run of ``cfg`` (completed by
    :func:`pipeline.students.complete`), made once, up front, before anything is trained."""
    check_tracking(cfg)
    cache = open_cache(cache_path(cfg))
    cfg, use = resolve_run(cfg, cache)
    check_writable(Path(cfg.runs_dir) / cache.root.name, "runs_dir")  # before training, not after
    run_id = run_id or new_run_id(cfg)
    return Plan(cfg, use, cache, run_id, Path(cfg.runs_dir) / cache.root.name / run_id)


def resolve_run(cfg: StudentConfig, cache: TeacherCache) -> tuple[StudentConfig, Uses]:
    """``cfg`` with what the run uses made concrete against ``cache``: the cache's temperature
    (``temperature=None``), its first layer, the number of views, the parsed augmentation."""
    use = uses(cfg)
    check_modality(cfg.model, cache_modality(cache), f"cache {cache.root}")  # text vs arrays
    params = dict(cfg.params)
    # (more views than the cache holds: refused by StudentData, before any training)
    views = 1 if use.augment else cache.views("train") if cfg.views == "all" else int(cfg.views)
    if use.augment:  # fits the inputs? recorded as parsed (shift:03 and shift:3 are one policy)
        params["augment"] = parse(use.augment, tuple(cache.manifest["teacher"]["input_shape"])).spec
    if use.temperature and params["temperature"] is None:
        params["temperature"] = cache.temperature
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
    return dataclasses.replace(cfg, layer=layer, views=str(views), params=Params(params)), use


def new_run_id(cfg: StudentConfig) -> str:
    """A new run's id, from the time, what the run is (of ``cfg`` as :func:`resolve_run` made
    it) and a random token: unique, and readable in a listing of run directories."""
    what = cfg.loss or (cfg.param("target") and f"target-{cfg.param('target')}")
    # a plugin's name (pkg.module:Class) becomes pkg.module-Class: no colons in file names
    return "-".join(p.replace(":", "-") for p in (
        f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}", cfg.model, what, f"s{cfg.seed}",
        secrets.token_hex(3)) if p)


def train_student(cfg: StudentConfig, progress: bool = True, run_id: str | None = None) -> dict:
    """Run one student: plan, fit, score, write. Returns its results row plus ``results``
    (the row's file).

    ``run_id`` (default: a new one) names the run directory and the results row: a sweep
    decides it before the run starts, so that a second attempt at the same run (a task Dask
    retried) replaces the first one's directory and row instead of adding its own."""
    with runtime.torch_threads(cfg.threads):  # here: torch runs in this thread
        return _train_student(cfg, progress, run_id)


def _train_student(cfg: StudentConfig, progress: bool, run_id: str | None) -> dict:
    plan = plan_run(cfg, run_id)
    data = StudentData(plan.cache, plan.cfg.layer, progress, views=int(plan.cfg.views))
    student = create_student(plan.cfg.model, plan.cfg)

    t0 = time.perf_counter()  # fit from the cache only: the teacher is never loaded
    student.fit_cache(data)
    fit_seconds = time.perf_counter() - t0

    # validation for the record, test exactly once
    scores = (score_tokens(student, data) if fmt.is_token_cache(plan.cache.manifest)
              else score(student, data, plan.use.kind))
    cfg = fitted_config(plan.cfg, student)
    weights = save_weights(student, cfg, plan.use.kind)
    row = results_row(plan, cfg, student, scores, fit_seconds, len(weights))
    write_run(plan.run_dir, cfg, weights, student, row)
    with storage_errors(results_dir(plan.cache.root), "cache"):  # e.g. no write access to a bucket
        path = append_row(results_dir(plan.cache.root), row)
    # A copy to the experiment tracker, once the run is safe (a failure is a warning).
    tracked = track(cfg, row, plan.run_dir, getattr(student, "history_", []))
    return {**row, "results": str(path), "tracking_run_id": tracked}


def fitted_config(cfg: StudentConfig, student: Student) -> StudentConfig:
    """``cfg`` with what only fitting decided: the student's layer a feature loss read, and
    the C that C=auto chose on val."""
    params = dict(cfg.params)
    if "student_layer" in params:
        params["student_layer"] = getattr(student, "student_layer_", None)
    if getattr(student, "C_", None) is not None and "C" in params:
        params["C"] = student.C_
    return dataclasses.replace(cfg, params=Params(params))


def save_weights(student: Student, cfg: StudentConfig, kind: str) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in student.tensors().items()},
                metadata={"model": cfg.model, "kind": kind,
                          "params": json.dumps(student.get_params(), default=str)})


def results_row(plan: Plan, cfg: StudentConfig, student: Student, scores: dict,
                fit_seconds: float, weights_bytes: int) -> dict:
    """The run's row: its config (run keys and every hyperparameter, as declared) and its
    measurements (pipeline.results)."""
    cache = plan.cache
    return {
        **config_columns(cfg), "kind": plan.use.kind,
        "views_policy": cache.augment["policy"] if int(cfg.views) > 1 else None,
        **dict.fromkeys(LM_MEASURED), **teacher_lm(cache), **scores, "params": int(student.n_params_), "weights_bytes": weights_bytes,
        "fit_seconds": round(fit_seconds, 3),
        **teacher_cost(cache), "teacher_test_accuracy": cache.teacher_accuracy("test"),
        "teacher_fingerprint": cache.teacher_fingerprint, "dataset_fingerprint": cache.dataset_fingerprint,
        "cache": str(cache.root), "run_id": plan.run_id,
        "time": datetime.now(timezone.utc).isoformat(), "run_dir": str(plan.run_dir),
    }


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


def score_tokens(student: Student, data: StudentData) -> dict:
    """A language-model student on a token cache (the student's ``evaluate_cache``: val, then
    test exactly once, each streamed): next-token accuracy, perplexity, agreement with the
    teacher's top-1 and KL on the K + tail support (pipeline.results), and its CPU speed per
    window of real test ids at 1 and 8 windows per call (as the teacher was timed)."""
    cache = data.cache
    val = student.evaluate_cache(cache, "val")
    test = student.evaluate_cache(cache, "test")
    n = min(WINDOW_BATCHES[-1], cache.num_rows("test"))
    ids = cache.stored(fmt.tokens_key("test", "ids"), 0, n).astype(np.int64)
    latency = per_sample_ms(student.cpu_predict(), ids, WINDOW_BATCHES)
    return {"test_accuracy": test["accuracy"], "val_accuracy": val["accuracy"],
            "teacher_agreement": test["agreement"], "kl_teacher_student": test["kl"], "ece": None,
            "calibration_temperature": None, "latency_b1_ms": latency["batch_1_ms"], "latency_b256_ms": None,
            "test_perplexity": test["perplexity"], "val_perplexity": val["perplexity"],
            "tokens_per_s": tokens_per_s(ids.shape[1], latency[f"batch_{WINDOW_BATCHES[-1]}_ms"])}


def teacher_lm(cache: TeacherCache) -> dict:
    """A token cache's teacher as LM rows compare with it: its test perplexity (exp of its mean
    NLL per target token, from the build) and tokens per second (timed at build); {} otherwise."""
    if not fmt.is_token_cache(cache.manifest):
        return {}
    nll = cache.manifest["splits"]["test"].get("teacher_nll")
    latency = cache.manifest["teacher"].get("latency") or {}
    return {"teacher_test_perplexity": None if nll is None else round(math.exp(nll), 6),
            "teacher_tokens_per_s": tokens_per_s(int(cache.lm["seq_len"]),
                                                 latency.get(f"batch_{WINDOW_BATCHES[-1]}_ms"))}


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


