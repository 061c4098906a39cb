"""Train a grid of students from one cache: models × losses × temperatures × seeds.

    kdcache sweep models="linear_svc logreg cnn_small" losses="kd ce" seeds="0 1 2" temperatures="1 2 4"

Feature students ignore the loss axis (they run once per seed and temperature that matters to
them). Every run lands as a row in the cache's results table; `kdcache report` reads it.
"""

from __future__ import annotations

import dataclasses
import itertools

from pipeline.config import StudentConfig, SweepConfig, resolve
from pipeline.losses import LOSSES
from pipeline.students import STUDENTS, create_student
from stages.student import TEMPERATURE_LOSSES, run_student


def grid(cfg: SweepConfig) -> list[StudentConfig]:
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(StudentConfig)}
    for name in cfg.models:
        STUDENTS.get(name)
    for name in cfg.losses:
        LOSSES.get(name)
    temperatures = cfg.temperatures or (cfg.t,)
    runs, seen = [], set()
    for model, loss, t, seed in itertools.product(cfg.models, cfg.losses, temperatures, cfg.seeds):
        kind = create_student(model).kind
        if kind == "features":
            loss = "-"  # no loss axis
            t = t if model == "logreg_soft" else 0.0
        elif loss not in TEMPERATURE_LOSSES:
            t = 0.0  # e.g. label-only training ignores the temperature
        key = (model, loss, t, seed)
        if key in seen:
            continue
        seen.add(key)
        overrides = {"model": model, "t": t, "seed": seed}
        if loss != "-":
            overrides["loss"] = loss
        runs.append(StudentConfig(**{**base, **overrides}))
    return runs


def main(args: list[str]) -> dict:
    cfg = resolve(SweepConfig, args, verb="sweep")
    runs = grid(cfg)
    print(f"sweep: {len(runs)} runs from one cache")
    rows = []
    for i, run in enumerate(runs, 1):
        r = run_student(run, progress=False)
        rows.append(r)
        print(f"[{i}/{len(runs)}] {r['model']:<12} {r['loss']:<14} T={r['T']:<4g} seed={r['seed']}  "
              f"test {r['test_accuracy']:.4f}  val {r['val_accuracy']:.4f}  {r['fit_seconds']:.1f}s",
              flush=True)
    return {"runs": len(rows), "results": rows[-1]["results"].rsplit("/", 1)[0] if rows else None,
            "rows": [{k: r[k] for k in ("model", "loss", "T", "seed", "test_accuracy", "run_id")}
                     for r in rows]}
