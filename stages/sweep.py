"""Train a grid of students from one cache: any run key or hyperparameter as an axis.

    kdcache sweep grid.model=linear_svc,logreg,cnn_small grid.loss=kd,ce grid.seed=0,1,2
    kdcache sweep model=mlp grid.width=16,64,256 grid.lr=0.01,0.03 grid.seed=0,1,2
    kdcache sweep scheduler=local workers=2             # runs side by side on 2 worker processes
    kdcache sweep scheduler=tcp://scheduler:8786        # runs as tasks on a dask cluster

Only the axes a run has apply (see pipeline.sweep.expand): feature students ignore the loss
and width axes, label-only losses the temperature axis. Without grid.model / grid.loss /
grid.seed (or model= / loss= / seed=) the sweep crosses linear_svc, logreg, cnn_small × kd, ce ×
seeds 0, 1, 2. Every run lands as a row in the cache's results
table, once, wherever it ran (see pipeline.sweep); `kdcache report` reads it. The run selected
is the best on the validation split: the highest val accuracy, or on a token cache (``model=lm``)
the lowest val perplexity.
"""

from __future__ import annotations

from pipeline.config import SweepConfig
from pipeline.settings import resolve
from pipeline.sweep import complete_sweep, expand, ranked, run_sweep, selection_metric
from pipeline.tracking import describe_store


def _t(value) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def main(args: list[str]) -> dict:
    def varied(row: dict) -> str:  # the grid's other axes, e.g. " width=64 lr=0.03"
        return "".join(f" {k}={_t(row.get(k))}" for k in axes)

    cfg = resolve(SweepConfig, args, verb="sweep", params=complete_sweep)
    runs = expand(cfg)
    axes = [k for k, _ in cfg.grid if k not in ("model", "loss", "seed", "temperature", "target")]
    finished = run_sweep(cfg, runs)  # every check done: the scheduler, each run on the cache
    print(f"sweep: {len(runs)} runs from one cache")
    by_position = {}
    for i, r in finished:
        by_position[i] = r
        print(f"[{len(by_position)}/{len(runs)}] {r['model']:<12} {r['loss'] or '-':<10} "
              f"{r.get('target') or '-':<8} T={_t(r.get('temperature')):<4} seed={r['seed']}"
              f"{varied(r)}  {scores(r)}  {r['fit_seconds']:.1f}s", flush=True)
    rows = [by_position[i] for i in sorted(by_position)]  # in grid order
    if cfg.tracking != "none":
        print(f"{cfg.tracking}: {sum(bool(r['tracking_run_id']) for r in rows)} runs in {describe_store()}")
    metric, lower = selection_metric(rows)
    best = ranked(rows)[0] if rows else None
    if best is not None:
        print(f"selected on val ({metric.replace('_', ' ')}, {'lower' if lower else 'higher'} is better): "
              f"{best['model']} {best['loss'] or '-'} seed={best['seed']}{varied(best)}  {scores(best)}  "
              f"run {best['run_dir']}")
    shown = ("model", "loss", "target", "temperature", "seed", "test_accuracy", "val_accuracy",
             "test_perplexity", "val_perplexity", "run_id", "run_dir", *axes)
    return {"runs": len(rows), "results": rows[-1]["results"].rsplit("/", 1)[0] if rows else None,
            "selected_by": metric, "best": None if best is None else {k: best.get(k) for k in shown},
            "rows": [{k: r.get(k) for k in shown} for r in rows]}


def scores(r: dict) -> str:
    """A run's test and val figures: perplexity for a language model, else accuracy."""
    if r.get("val_perplexity") is not None:
        return f"test ppl {r['test_perplexity']:.2f}  val ppl {r['val_perplexity']:.2f}"
    return f"test {r['test_accuracy']:.4f}  val {r['val_accuracy']:.4f}"
