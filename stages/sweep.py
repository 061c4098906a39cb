"""Train a grid of students from one cache: models × losses × temperatures × seeds.

    kdcache sweep models="linear_svc logreg cnn_small" losses="kd ce" seeds="0 1 2" temperatures="1 2 4"
    kdcache sweep scheduler=local workers=2             # runs side by side on 2 worker processes
    kdcache sweep scheduler=tcp://scheduler:8786        # runs as tasks on a dask cluster

Only the axes a run has apply (see pipeline.runs.sweep_runs): feature students ignore the loss
axis, label-only losses the temperature axis. Every run lands as a row in the cache's results
table, once, wherever it ran (see pipeline.sweep); `kdcache report` reads it.
"""

from __future__ import annotations

from pipeline.config import SweepConfig, resolve
from pipeline.runs import sweep_runs
from pipeline.sweep import run_sweep
from pipeline.tracking import describe_store


def _t(value) -> str:
    return "-" if value is None else f"{value:g}"


def main(args: list[str]) -> dict:
    cfg = resolve(SweepConfig, args, verb="sweep")
    runs = sweep_runs(cfg)
    finished = run_sweep(cfg, runs)  # every check done: the scheduler, each run on the cache
    print(f"sweep: {len(runs)} runs from one cache")
    by_position = {}
    for i, r in finished:
        by_position[i] = r
        print(f"[{len(by_position)}/{len(runs)}] {r['model']:<12} {r['loss'] or '-':<10} {r['target'] or '-':<8} "
              f"T={_t(r['temperature']):<4} seed={r['seed']}  test {r['test_accuracy']:.4f}  "
              f"val {r['val_accuracy']:.4f}  {r['fit_seconds']:.1f}s", flush=True)
    rows = [by_position[i] for i in sorted(by_position)]  # in grid order
    if cfg.tracking != "none":
        print(f"{cfg.tracking}: {sum(bool(r['tracking_run_id']) for r in rows)} runs in {describe_store()}")
    return {"runs": len(rows), "results": rows[-1]["results"].rsplit("/", 1)[0] if rows else None,
            "rows": [{k: r[k] for k in ("model", "loss", "target", "temperature", "seed",
                                        "test_accuracy", "run_id")} for r in rows]}
