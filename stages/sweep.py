"""Train a grid of students from one cache: models × losses × temperatures × seeds.

    kdcache sweep models="linear_svc logreg cnn_small" losses="kd ce" seeds="0 1 2" temperatures="1 2 4"

Only the axes a run has apply (see pipeline.runs.sweep_runs): feature students ignore the loss
axis, label-only losses the temperature axis. Every run lands as a row in the cache's results
table; `kdcache report` reads it.
"""

from __future__ import annotations

from pipeline.config import SweepConfig, resolve
from pipeline.runs import sweep_runs, train_student


def _t(value) -> str:
    return "-" if value is None else f"{value:g}"


def main(args: list[str]) -> dict:
    cfg = resolve(SweepConfig, args, verb="sweep")
    runs = sweep_runs(cfg)
    print(f"sweep: {len(runs)} runs from one cache")
    rows = []
    for i, run in enumerate(runs, 1):
        r = train_student(run, progress=False)
        rows.append(r)
        print(f"[{i}/{len(runs)}] {r['model']:<12} {r['loss'] or '-':<10} {r['target'] or '-':<8} "
              f"T={_t(r['temperature']):<4} seed={r['seed']}  test {r['test_accuracy']:.4f}  "
              f"val {r['val_accuracy']:.4f}  {r['fit_seconds']:.1f}s", flush=True)
    return {"runs": len(rows), "results": rows[-1]["results"].rsplit("/", 1)[0] if rows else None,
            "rows": [{k: r[k] for k in ("model", "loss", "target", "temperature", "seed",
                                        "test_accuracy", "run_id")} for r in rows]}
