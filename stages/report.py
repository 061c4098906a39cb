"""Leaderboard and plots of a cache's results table.

    kdcache report [cache=PATH]

Prints a Markdown leaderboard (mean ± std over seeds, grouped by model, loss and T) and writes
it with three PNG plots to ``<cache>.results/report/``: accuracy vs parameters, accuracy vs
temperature, and each student against its label-only baseline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import ReportConfig, resolve
from pipeline.cache import format as fmt
from pipeline.errors import KdError
from pipeline.io import atomic_path, atomic_write_text
from pipeline.results import read_results, results_dir
from stages.info import cache_path


def leaderboard(rows: list[dict]) -> list[dict]:
    # Runs differing only by seed are repeats of one experiment; anything else is another one.
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["loss"], r["T"], r["alpha"], r["epochs"], r["C"],
                           r["layer"]), []).append(r)
    board = []
    for (model, loss, T, *_), rs in groups.items():
        acc = np.array([r["test_accuracy"] for r in rs])
        board.append({"model": model, "loss": loss, "T": T, "n": len(rs),
                      "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
                      "val": float(np.mean([r["val_accuracy"] for r in rs])),
                      "agreement": float(np.mean([r["teacher_agreement"] for r in rs])),
                      "kl": float(np.mean([r["kl_teacher_student"] for r in rs])),
                      "ece": float(np.mean([r["ece"] for r in rs])),
                      "params": int(rs[0]["params"]),
                      "fit_s": float(np.mean([r["fit_seconds"] for r in rs]))})
    return sorted(board, key=lambda b: -b["mean"])


def markdown(board: list[dict], teacher_acc: float, source: str) -> str:
    lines = [f"# Leaderboard: {source}", "",
             f"Teacher test accuracy: {teacher_acc:.4f}. Test accuracy is mean ± std over seeds (n runs).", "",
             "| model | loss | T | test accuracy | n | val | teacher agreement | KL(t‖s) | ECE | params | fit s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in board:
        lines.append(f"| {b['model']} | {b['loss']} | {b['T']:g} | {b['mean']:.4f} ± {b['std']:.4f} | "
                     f"{b['n']} | {b['val']:.4f} | {b['agreement']:.4f} | {b['kl']:.4f} | "
                     f"{b['ece']:.4f} | {b['params']:,} | {b['fit_s']:.2f} |")
    baselines = {b["model"]: b for b in board if b["loss"] == "ce"}
    versus = [(b, baselines[b["model"]]) for b in board
              if b["model"] in baselines and b["loss"] not in ("ce",)]
    if versus:
        lines += ["", "## Against the label-only baseline (same student, loss=ce)", "",
                  "| model | loss | T | test accuracy | ce baseline | gain |", "|---|---|---|---|---|---|"]
        for b, base in versus:
            lines.append(f"| {b['model']} | {b['loss']} | {b['T']:g} | {b['mean']:.4f} | "
                         f"{base['mean']:.4f} | {b['mean'] - base['mean']:+.4f} |")
    return "\n".join(lines) + "\n"


def plots(board: list[dict], teacher_acc: float, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name):
        path = out / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for b in board:
        ax.errorbar(b["params"], b["mean"], yerr=b["std"], fmt="o", capsize=3)
        ax.annotate(f"{b['model']}/{b['loss']}/T{b['T']:g}", (b["params"], b["mean"]), fontsize=7)
    ax.axhline(teacher_acc, ls="--", c="gray", label="teacher")
    ax.set(xscale="log", xlabel="student parameters", ylabel="test accuracy", title="Accuracy vs size")
    ax.legend()
    save(fig, "accuracy_vs_params.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[tuple, list] = {}
    for b in board:
        if b["T"] > 0:
            series.setdefault((b["model"], b["loss"]), []).append(b)
    for (model, loss), bs in sorted(series.items()):
        bs = sorted(bs, key=lambda b: b["T"])
        ax.errorbar([b["T"] for b in bs], [b["mean"] for b in bs], yerr=[b["std"] for b in bs],
                    marker="o", capsize=3, label=f"{model}/{loss}")
    ax.axhline(teacher_acc, ls="--", c="gray", label="teacher")
    ax.set(xlabel="temperature T", ylabel="test accuracy", title="Accuracy vs temperature (runs that use T)")
    ax.legend(fontsize=7)
    save(fig, "accuracy_vs_temperature.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    names = [f"{b['model']}/{b['loss']}/T{b['T']:g}" for b in board]
    colors = ["tab:gray" if b["loss"] == "ce" else "tab:blue" for b in board]
    ax.barh(names, [b["mean"] for b in board], xerr=[b["std"] for b in board], color=colors)
    ax.axvline(teacher_acc, ls="--", c="k", label="teacher")
    lo = min(b["mean"] - b["std"] for b in board)
    ax.set(xlim=(max(0.0, lo - 0.02), 1.0), xlabel="test accuracy",
           title="Students vs label-only baseline (grey = loss ce)")
    ax.tick_params(axis="y", labelsize=7)
    save(fig, "students_vs_baseline.png")
    return paths


def main(args: list[str]) -> dict:
    cfg = resolve(ReportConfig, args, verb="report")
    root = cache_path(cfg)
    fmt.read_manifest(root)  # a clear error for a path that is no cache
    table_dir = results_dir(root)
    table = read_results(table_dir)
    if table.num_rows == 0:
        raise KdError(f"no results for cache {root} yet ({table_dir} is empty); run "
                      "`make student` or `make sweep` first")
    rows = table.to_pylist()
    board = leaderboard(rows)
    teacher_acc = float(rows[-1]["teacher_test_accuracy"])
    text = markdown(board, teacher_acc, str(root))
    out = Path(cfg.out) if cfg.out else table_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "leaderboard.md", text)
    pngs = plots(board, teacher_acc, out)
    print(text)
    print(f"wrote {out / 'leaderboard.md'} and {len(pngs)} plots in {out}")
    return {"runs": table.num_rows, "groups": len(board), "leaderboard": board,
            "report": str(out / "leaderboard.md"), "plots": [str(p) for p in pngs]}
