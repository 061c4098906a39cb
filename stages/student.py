"""Stage two: train one student from a teacher cache. The teacher is never loaded.

    kdcache student model=linear_svc                     # sklearn on cached teacher features
    kdcache student model=cnn_small loss=kd t=4 alpha=0.9 seed=1
    kdcache student model=logreg_soft t=2 C=auto

Writes a run directory (resolved config, metrics.json, the student's weights as safetensors,
a log) under runs_dir, then appends one row to the results table beside the cache.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline import metrics
from pipeline.cache import TeacherCache, open_cache, softmax
from pipeline.config import DataConfig, StudentConfig, resolve, save_config
from pipeline.data import Dataset, open_dataset, positions_of
from pipeline.errors import KdError
from pipeline.io import atomic_write_text, fsync_dir
from pipeline.losses import LABELS_ONLY, LOSSES, USES_FEATURES
from pipeline.results import append_row, results_dir
from pipeline.rows import LazyRows
from pipeline.students import STUDENTS, SoftLogRegStudent, create_student
from stages.info import cache_path

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
TEMPERATURE_LOSSES = {"kd", "fitnet", "dkd"}  # the losses that soften with T (T=0 is recorded otherwise)


def main(args: list[str]) -> dict:
    cfg = resolve(StudentConfig, args, verb="student")
    summary = run_student(cfg)
    t_text = f"T={summary['T']:g}" if summary["T"] else "T unused"
    print(f"student {summary['model']} ({summary['loss']}, {t_text}, seed {summary['seed']}): "
          f"test {summary['test_accuracy']:.4f}, val {summary['val_accuracy']:.4f}, "
          f"agreement {summary['teacher_agreement']:.4f} (teacher test {summary['teacher_test_accuracy']:.4f}); "
          f"{summary['params']:,} params, fit {summary['fit_seconds']:.1f}s\n"
          f"run  {summary['run_dir']}\nrow  {summary['results']}")
    return summary


def reopen_dataset(cache: TeacherCache) -> Dataset:
    """The dataset the cache was built from, checked against the cache's fingerprint."""
    dataset = open_dataset(resolve(DataConfig, cache.manifest["dataset"]["config"]))
    if dataset.fingerprint != cache.dataset_fingerprint:
        raise KdError(f"dataset {dataset.spec} on disk differs from the one cache {cache.root} was "
                      f"built from (fingerprint {dataset.fingerprint[:12]} != "
                      f"{cache.dataset_fingerprint[:12]}); restore the data or rebuild the cache")
    return dataset


def joined_inputs(dataset: Dataset, cache: TeacherCache, split: str) -> np.ndarray:
    """Inputs in cache row order: row r is the sample named by the cache index's sample_id r."""
    positions = positions_of(dataset.splits[split].sample_ids, cache.sample_ids(split))
    return dataset.inputs(split, 0, len(dataset.splits[split]))[positions]


def lazy_inputs(dataset: Dataset, cache: TeacherCache, split: str) -> LazyRows:
    """:func:`joined_inputs`, read block by block on demand (evaluation never holds a split)."""
    positions = positions_of(dataset.splits[split].sample_ids, cache.sample_ids(split))
    return LazyRows(len(positions), dataset.input_shape,
                    lambda a, b: dataset.inputs_at(split, positions[a:b]))


def lazy_features(cache: TeacherCache, split: str, layer: str) -> LazyRows:
    """Flattened cached features of ``split``, read chunk by chunk on demand."""
    dim = int(np.prod(cache.manifest["layers"][layer]))
    return LazyRows(cache.num_rows(split), (dim,),
                    lambda a, b: cache.features(split, layer, rows=slice(a, b)).reshape(b - a, dim))


def run_student(cfg: StudentConfig, progress: bool = True) -> dict:
    # 1. The cache, and every check that can fail before any work is done.
    cache = open_cache(cache_path(cfg))
    T = cfg.t or cache.temperature
    STUDENTS.get(cfg.model)
    layer = cfg.layer or cache.layers[0]
    if layer not in cache.layers:
        raise KdError(f"cache {cache.root} holds no layer {layer!r}; it holds {', '.join(cache.layers)}")
    params = dict(C=1.0 if cfg.C == "auto" else float(cfg.C), seed=cfg.seed, epochs=cfg.epochs,
                  sgd_alpha=cfg.sgd_alpha, loss=cfg.loss, T=T, alpha=cfg.alpha,
                  hint_weight=cfg.hint_weight, dkd_alpha=cfg.dkd_alpha, dkd_beta=cfg.dkd_beta,
                  width=cfg.width, lr=cfg.lr, weight_decay=cfg.weight_decay,
                  batch_size=cfg.batch_size, device=cfg.device, progress=progress)
    student = create_student(cfg.model, **params)
    LOSSES.get(cfg.loss)  # a typo is an error even where the student has no loss axis
    check_writable(Path(cfg.runs_dir) / cache.root.name, "runs_dir")  # before training, not after
    if student.kind == "inputs":
        loss_name = cfg.loss
        uses_t = cfg.loss in TEMPERATURE_LOSSES
    else:
        loss_name = "soft" if cfg.model == "logreg_soft" else f"target={cfg.target}"
        uses_t = cfg.model == "logreg_soft"

    # 2. Fit: feature students on cached features, input students on inputs joined by sample_id.
    y = {s: cache.labels(s) for s in ("train", "val", "test")}
    t0 = time.perf_counter()
    if student.kind == "features" and cfg.model != "sgd":
        X = {s: cache.features(s, layer).reshape(cache.num_rows(s), -1) for s in ("train", "val", "test")}
        student, chosen_c = fit_feature_student(cfg, student, cache, X, y, T, layer, params)
    elif student.kind == "features":
        # sgd learns out of core: train is streamed, val and test are read chunk by chunk
        X = {s: lazy_features(cache, s, layer) for s in ("val", "test")}
        student, chosen_c = fit_feature_student(cfg, student, cache, X, y, T, layer, params)
    else:
        dataset = reopen_dataset(cache)
        X = {s: lazy_inputs(dataset, cache, s) for s in ("val", "test")}
        fit_input_student(cfg, student, cache, dataset, layer, X["val"], y["val"])
        chosen_c = ""
    fit_seconds = time.perf_counter() - t0

    # 3. Score: validation for the record, test exactly once.
    val_acc = metrics.accuracy(student.predict(X["val"]), y["val"])
    t1 = time.perf_counter()
    test_scores = student.decision_function(X["test"])
    latency_ms = (time.perf_counter() - t1) * 1000 / len(X["test"])
    test_pred = student.classes_[test_scores.argmax(1)]
    if student.has_proba:
        test_probs = student.predict_proba(X["test"])
    else:  # LinearSVC: calibrate margins with a temperature fitted on val
        known = np.isin(y["val"], student.classes_)  # score columns are positions in classes_
        scale = metrics.fit_temperature(student.decision_function(X["val"])[known],
                                        np.searchsorted(student.classes_, y["val"][known]))
        test_probs = softmax(test_scores / scale)
    if len(student.classes_) != cache.num_classes:  # target=teacher never named some class:
        full = np.zeros((len(test_probs), cache.num_classes), np.float32)  # column = class id
        full[:, student.classes_] = test_probs
        test_probs = full
    teacher_test = cache.raw_logits("test")
    result = {
        "model": cfg.model, "kind": student.kind, "loss": loss_name, "T": T if uses_t else 0.0,
        "alpha": cfg.alpha, "seed": cfg.seed, "epochs": cfg.epochs, "C": str(chosen_c or ""),
        "layer": layer if (student.kind == "features" or cfg.loss in USES_FEATURES) else "",
        "test_accuracy": metrics.accuracy(test_pred, y["test"]), "val_accuracy": val_acc,
        "teacher_agreement": metrics.teacher_agreement(test_pred, teacher_test),
        "kl_teacher_student": metrics.kl_teacher_student(teacher_test, test_probs),
        "ece": metrics.ece(test_probs, y["test"]),
        "params": int(student.n_params_), "fit_seconds": round(fit_seconds, 3),
        "latency_ms": round(latency_ms, 5),
        "teacher_test_accuracy": cache.teacher_accuracy("test"),
        "teacher_fingerprint": cache.teacher_fingerprint, "dataset_fingerprint": cache.dataset_fingerprint,
        "cache": str(cache.root),
    }

    # 4. The run directory (written privately, then renamed), then the results row.
    run_id = (f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{cfg.model}-"
              f"{loss_name.replace('=', '-')}-s{cfg.seed}-{secrets.token_hex(3)}")
    run_dir = Path(cfg.runs_dir) / cache.root.name / run_id
    result.update(run_id=run_id, time=datetime.now(timezone.utc).isoformat(), run_dir=str(run_dir))
    write_run(run_dir, cfg, student, result)
    row = append_row(results_dir(cache.root), result)
    return {**result, "results": str(row)}


def fit_input_student(cfg, student, cache, dataset, layer, X_val, y_val) -> None:
    """Stream the train split: cached logits (and features) by whole chunks, block-shuffled,
    with each chunk's inputs read from the dataset by sample_id and shuffled along with them.
    Memory is bounded by the stream's buffer, not by the number of training rows."""
    positions = positions_of(dataset.splits["train"].sample_ids, cache.sample_ids("train"))
    hint = cfg.loss in USES_FEATURES
    layers = (layer,) if hint else ()
    teacher = cfg.loss not in LABELS_ONLY  # the label-only baseline reads no teacher outputs

    def batches(epoch: int):
        for b in cache.stream("train", batch_size=cfg.batch_size, T=1.0, layers=layers,
                              logits=teacher, seed=cfg.seed * 100_003 + epoch + 1,
                              extra=lambda a, z: {"x": dataset.inputs_at("train", positions[a:z])}):
            targets = {"z_t": b.logits} if teacher else {}
            if hint:
                targets["f_t"] = b.features[layer].reshape(len(b.label), -1)
            yield b.extra["x"], b.label, targets

    hint_dim = int(np.prod(cache.manifest["layers"][layer])) if hint else 0
    student.fit_stream(batches, -(-cache.num_rows("train") // cfg.batch_size), X_val=X_val,
                       y_val=y_val, num_classes=cache.num_classes, hint_dim=hint_dim)


def fit_feature_student(cfg, student, cache, X, y, T, layer, params):
    if cfg.model == "sgd":
        classes = np.arange(cache.num_classes)

        def batches(epoch: int):
            for b in cache.stream("train", batch_size=1024, T=T, layers=(layer,),
                                  logits=cfg.target == "teacher", shuffle=epoch >= 0,
                                  seed=cfg.seed * 100_003 + epoch + 1):  # epoch -1: seed >= 0
                xb = b.features[layer].reshape(len(b.sample_id), -1)
                yield xb, (b.logits.argmax(1) if cfg.target == "teacher" else b.label)

        return student.fit_stream(batches, classes, X["val"], y["val"]), ""
    if cfg.model == "logreg_soft":
        target = cache.probs("train", T)
        starved = np.flatnonzero(target.max(axis=0) < SoftLogRegStudent().min_prob)
        if len(starved):
            raise KdError(f"at T={T:g} the teacher gives class(es) {starved.tolist()[:5]} almost no "
                          "probability on any train row, so logreg_soft cannot learn them; use a "
                          "larger t (e.g. t=2)")
    elif cfg.target == "teacher":
        target = cache.raw_logits("train").argmax(1)
        if len(np.unique(target)) < 2:
            raise KdError(f"the teacher of cache {cache.root} predicts a single class on every train "
                          "row, so target=teacher leaves nothing to learn; use target=labels")
    else:
        target = y["train"]
    grid = C_GRID if cfg.C == "auto" else (float(cfg.C),)
    best = None
    for c in grid:  # model selection on the validation split
        candidate = create_student(cfg.model, **{**params, "C": c}).fit(X["train"], target)
        acc = metrics.accuracy(candidate.predict(X["val"]), y["val"])
        if best is None or acc > best[0]:
            best = (acc, candidate, c)
    return best[1], best[2] if cfg.C == "auto" else ""


def check_writable(path: Path, key: str) -> None:
    """Refuse a directory that cannot be created or written, without creating anything."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise KdError(f"{key}: cannot create {path}: {existing} is not a directory; pass {key}=DIR")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KdError(f"{key}: cannot write in {existing} (permission denied); pass {key}=DIR")


def write_run(run_dir: Path, cfg: StudentConfig, student, result: dict) -> None:
    from safetensors.numpy import save_file as save_numpy
    from safetensors.torch import save_file as save_torch

    tmp = run_dir.parent / f".{run_dir.name}.incomplete"
    tmp.mkdir(parents=True)
    try:
        save_config(cfg, tmp / "config.json")
        tensors = student.tensors()
        meta = {"model": cfg.model, "kind": student.kind, "params": json.dumps(student.get_params(), default=str)}
        if student.kind == "inputs":
            save_torch(tensors, str(tmp / "student.safetensors"), metadata=meta)
        else:
            save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                       str(tmp / "student.safetensors"), metadata=meta)
        atomic_write_text(tmp / "metrics.json", json.dumps(result, indent=2, default=str) + "\n")
        history = getattr(student, "history_", [])
        log = [json.dumps(h) for h in history] + [json.dumps({"final": result}, default=str)]
        atomic_write_text(tmp / "log.jsonl", "\n".join(log) + "\n")
        tmp.rename(run_dir)
        fsync_dir(run_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
