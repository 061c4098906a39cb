"""scikit-learn overhead: ``kdcache student`` with a linear feature student vs scikit-learn alone.

Measured (floor: kdcache fit time / direct fit time ≤ 1.15)
    kdcache  ``pipeline.runs.train_student`` with ``model=linear_svc C=1`` (and ``model=logreg
             C=1``): a fixed C, not the auto grid. Its ``fit_seconds`` covers reading the
             train/val/test features from the cache (Zarr decode, float16 → float32) and the
             fit (StandardScaler + estimator), plus the one validation prediction of the
             single-C "grid".
    direct   scikit-learn called directly on the same rows already in memory as contiguous
             float32: ``StandardScaler().fit``, ``transform``, then ``LinearSVC(C=1,
             max_iter=5000, random_state=0)`` / ``LogisticRegression(C=1, max_iter=5000,
             random_state=0)``.fit — the same estimators and parameters as
             ``pipeline/students/features.py``.

Why fair: same rows, same estimator parameters, same process, alternated repeats; the direct
arm is given its inputs for free, so the ratio bounds everything kdcache adds around the
estimator. A random mlp teacher's 256-d features on synthetic data give a fit of a few seconds.
The time kdcache spends reading the features (``TeacherCache.features`` for the three splits)
is measured separately, for context.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import numpy as np

from bench.common import alternate, ensure_cache, figure, log, main_for, median, result, spread, table

NAME = "sklearn_overhead"
FLOOR = 1.15


def run(quick: bool, workdir: Path) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from pipeline.cache import open_cache
    from pipeline.students import student_config
    from pipeline.runs import train_student

    t_start = time.perf_counter()
    n = 8_000 if quick else 40_000
    repeats = 2 if quick else 7
    root = ensure_cache({"dataset": f"synthetic:{n}:3x16x16:10", "teacher": "mlp",
                         "teacher_ckpt": "random", "cache": workdir / "caches" / f"sklearn-mlp-{n}"})
    cache = open_cache(root)
    layer = cache.layers[0]
    X = np.ascontiguousarray(cache.features("train", layer).reshape(cache.num_rows("train"), -1), np.float32)
    y = cache.labels("train")
    estimators = {"linear_svc": lambda: LinearSVC(C=1.0, max_iter=5000, random_state=0),
                  "logreg": lambda: LogisticRegression(C=1.0, max_iter=5000, random_state=0)}

    def kdcache(model: str):
        def arm() -> float:
            cfg = student_config({"cache": root, "model": model, "C": "1",
                                          "runs_dir": workdir / "runs", "seed": 0})
            with contextlib.redirect_stdout(io.StringIO()):
                return train_student(cfg, progress=False)["fit_seconds"]
        return arm

    def direct(model: str):
        def arm() -> float:
            t0 = time.perf_counter()
            scaler = StandardScaler().fit(X)
            xs = np.ascontiguousarray(scaler.transform(X), np.float32)
            estimators[model]().fit(xs, y)
            return time.perf_counter() - t0
        return arm

    def read_features() -> float:
        c = open_cache(root)
        t0 = time.perf_counter()
        for s in ("train", "val", "test"):
            c.features(s, layer)
        return time.perf_counter() - t0

    figures, rows, measured = [], [], []
    for model in estimators:
        log(f"{NAME}: {model} on {X.shape[0]:,} x {X.shape[1]} train features")
        times = alternate({"kdcache": kdcache(model), "direct": direct(model), "read": read_features},
                          repeats, label=model)
        t = {k: median(v) for k, v in times.items()}
        ratio = t["kdcache"] / t["direct"]
        measured.append({"model": model, "seconds": {k: spread(v) for k, v in times.items()}})
        figures.append(figure(f"kdcache/direct fit time, {model}", round(ratio, 3), "x", floor=FLOOR,
                              op="<=", kdcache_fit_s=round(t["kdcache"], 3),
                              direct_fit_s=round(t["direct"], 3), read_features_s=round(t["read"], 3)))
        rows.append([model, f"{t['kdcache']:.2f}", f"{t['direct']:.2f}", f"{t['read']:.3f}",
                     f"{ratio:.3f}", "PASS" if ratio <= FLOOR else "FAIL"])
    tables = [table("Feature students: kdcache fit_seconds vs scikit-learn directly",
                    ["model (C=1)", "kdcache fit s", "direct sklearn s", "of which: reading features s",
                     "ratio (≤ 1.15)", "verdict"], rows,
                    note=f"random mlp teacher, {X.shape[0]:,} train rows x {X.shape[1]} features "
                         f"(synthetic:{n}:3x16x16:10), median of {repeats} alternated repeats.")]
    return result(NAME, "kdcache feature-student fit vs scikit-learn", figures, tables, [],
                  {"quick": quick, "rows": n, "repeats": repeats}, time.perf_counter() - t_start) | {"measured": measured}


if __name__ == "__main__":
    main_for(run)
