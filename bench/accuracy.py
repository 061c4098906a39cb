"""Accuracy on digits: the trained default teacher and the students distilled from its cache.

Not a speed benchmark and no floor: the table shows what the cache is for. The digits teacher
(cnn_small, trained once in the work dir as `make teacher-cache` does) is cached; then
``stages.sweep`` trains, from that one cache, label-only students (loss=ce), KD students
(loss=kd, the cache's default temperature 4, alpha=0.9) and feature students (linear_svc, logreg,
logreg_soft on the teacher's cached features, C=1), over seeds 0, 1, 2 (quick mode: seed 0
and fewer epochs). Figures are read back from the cache's results table
(``pipeline.results.read_results``): mean ± sample std over seeds of test accuracy, and of the
agreement with the teacher's test predictions.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import statistics
import time
from pathlib import Path

from bench.common import digits_cache, figure, log, main_for, result, table

NAME = "accuracy"


def run(quick: bool, workdir: Path) -> dict:
    from pipeline.cache import open_cache
    from pipeline.results import read_results, results_dir
    from stages import sweep

    t_start = time.perf_counter()
    root = digits_cache(workdir)
    cache = open_cache(root)
    seeds = (0,) if quick else (0, 1, 2)
    models = ("cnn_small", "linear_svc", "logreg", "logreg_soft")
    epochs = 10 if quick else 60  # 60 = the student default
    shutil.rmtree(results_dir(root), ignore_errors=True)  # this run's rows only
    args = [f"cache={root}", f"grid.model={','.join(models)}", "grid.loss=kd,ce",
            f"grid.seed={','.join(map(str, seeds))}", f"epochs={epochs}", f"runs_dir={workdir / 'runs'}"]
    log(f"{NAME}: kdcache sweep {' '.join(args[1:])}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sweep.main(args)
    print(out.getvalue(), end="", flush=True)
    rows = read_results(results_dir(root)).to_pylist()

    def trained_on(r: dict) -> str:
        if r["loss"]:
            return r["loss"]
        return f"target={r['target']}" if r["target"] else f"soft, temperature {r['temperature']:g}"

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], trained_on(r)), []).append(r)

    def ms(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    teacher_acc = cache.teacher_accuracy("test")
    table_rows = [["teacher cnn_small (trained)", "—", f"{teacher_acc:.4f}", "—", "1", "—", "—"]]
    figures = [figure("teacher test accuracy (digits)", round(teacher_acc, 4))]
    order = {"ce": 0, "kd": 1}
    for (model, loss), rs in sorted(groups.items(), key=lambda kv: (kv[1][0]["kind"] != "inputs",
                                                                   kv[0][0], order.get(kv[0][1], 2))):
        acc, acc_sd = ms([r["test_accuracy"] for r in rs])
        agree, agree_sd = ms([r["teacher_agreement"] for r in rs])
        kind = {"ce": "label-only (ce)", "kd": "KD (kd)"}.get(loss, f"features ({loss})")
        table_rows.append([f"{model}", kind, f"{acc:.4f} ± {acc_sd:.4f}", f"{agree:.4f} ± {agree_sd:.4f}",
                           str(len(rs)), f"{int(rs[0]['params']):,}",
                           f"{statistics.mean(r['fit_seconds'] for r in rs):.1f}"])
        figures.append(figure(f"test accuracy, {model} {loss}", round(acc, 4), std=round(acc_sd, 4),
                              teacher_agreement=round(agree, 4), seeds=len(rs)))
    tables = [table("Digits: teacher and students from one cache (test split, 360 images)",
                    ["model", "training", "test accuracy (mean ± std)", "teacher agreement",
                     "seeds", "params", "fit s (mean)"], table_rows,
                    note=f"seeds {', '.join(map(str, seeds))}; torch students {epochs} epochs, "
                         "batch 64, temperature 4, alpha=0.9; feature students C=1 on the cached 'embed' "
                         "features (128-d).")]
    return result(NAME, "digits accuracy table", figures, tables, [],
                  {"quick": quick, "seeds": list(seeds), "models": list(models), "epochs": epochs},
                  time.perf_counter() - t_start) | {"rows": [{k: r[k] for k in (
                      "model", "loss", "target", "temperature", "seed", "test_accuracy", "teacher_agreement", "fit_seconds")}
                      for r in rows]}


if __name__ == "__main__":
    main_for(run)
