"""The leaderboard and plots of a results table (``kdcache report``).

Runs that differ only by seed are repeats of one experiment: the leaderboard gives their test
accuracy as mean ± std (sample std, n runs). Everything else a row records (model, loss,
target, temperature, views, augment, alpha, epochs, C, layer, loss_weight,
standardize_logits, student_layer) makes another experiment, so a
student trained with and without augmentation shows as two rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.io import atomic_path
from pipeline.losses import LOSSES

# What makes two rows the same experiment (the seed aside).
EXPERIMENT = ("model", "loss", "target", "temperature", "views", "augment", "alpha", "epochs", "C",
              "layer", "loss_weight", "standardize_logits", "student_layer")


def label_only(loss: str | None) -> bool:
    """Whether ``loss`` is a label-only baseline (it declares that it reads no teacher output:
    neither logits nor features)."""
    if loss is None or loss not in LOSSES:
        return False
    needs = LOSSES.declared(loss)
    return not needs.logits and not needs.features


def leaderboard(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in EXPERIMENT), []).append(r)
    board = []
    for key, rs in groups.items():
        acc = np.array([r["test_accuracy"] for r in rs])
        board.append({**dict(zip(EXPERIMENT, key)), "n": len(rs),
                      "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
                      "val": float(np.mean([r["val_accuracy"] for r in rs])),
                      "agreement": float(np.mean([r["teacher_agreement"] for r in rs])),
                      "kl": float(np.mean([r["kl_teacher_student"] for r in rs])),
                      "ece": float(np.mean([r["ece"] for r in rs])),
                      "params": int(rs[0]["params"]),
                      "fit_s": float(np.mean([r["fit_seconds"] for r in rs]))})
    return sorted(board, key=lambda b: -b["mean"])


def _text(value) -> str:
    """A cell: '–' for what a run does not use."""
    if value is None:
        return "–"
    return f"{value:g}" if isinstance(value, float) else str(value)


def loss_text(b: dict) -> str:
    """The loss cell: its name, ``+Z`` with logit standardisation, and its weight where it
    is not the loss's default (e.g. ``kd+Z``, ``pkt w=1e+04``)."""
    if b["loss"] is None:
        return "–"
    text = b["loss"] + ("+Z" if b.get("standardize_logits") else "")
    weight = b.get("loss_weight")
    default = LOSSES.declared(b["loss"]).weight if b["loss"] in LOSSES else None
    return text + (f" w={weight:g}" if weight is not None and weight != default else "")


def name(b: dict) -> str:
    """A short label of an experiment for plots, e.g. ``cnn_small/kd/T4``."""
    parts = [b["model"], b["loss"] and loss_text(b), b["target"] and f"target={b['target']}",
             b["temperature"] is not None and f"T{b['temperature']:g}",
             (b["views"] or 1) > 1 and f"{b['views']}views", b["augment"] and f"aug={b['augment']}"]
    return "/".join(p for p in parts if p)


def by_loss_table(board: list[dict]) -> list[dict]:
    """The best experiment of each (model, loss, standardisation) pair, for models trained
    with more than one loss: grouped by model, best first."""
    best: dict[tuple, dict] = {}
    for b in board:  # sorted best first
        if b["loss"] is not None:
            best.setdefault((b["model"], b["loss"], bool(b.get("standardize_logits"))), b)
    models = {m for m, _, _ in best if sum(1 for k in best if k[0] == m) > 1}
    return sorted((b for (m, _, _), b in best.items() if m in models), key=lambda b: (b["model"], -b["mean"]))


def markdown(board: list[dict], teacher_acc: float, source: str) -> str:
    lines = [f"# Leaderboard: {source}", "",
             f"Teacher test accuracy: {teacher_acc:.4f}. Test accuracy is mean ± std over seeds "
             "(n runs); – marks what a run does not use.", "",
             "| model | loss | target | temperature | views | augment | test accuracy | n | val "
             "| teacher agreement | KL(t‖s) | ECE | params | fit s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in board:
        lines.append(f"| {b['model']} | {loss_text(b)} | {_text(b['target'])} | "
                     f"{_text(b['temperature'])} | {_text(b['views'])} | {_text(b['augment'])} | "
                     f"{b['mean']:.4f} ± {b['std']:.4f} | "
                     f"{b['n']} | {b['val']:.4f} | {b['agreement']:.4f} | {b['kl']:.4f} | "
                     f"{b['ece']:.4f} | {b['params']:,} | {b['fit_s']:.2f} |")
    by_loss = by_loss_table(board)
    if by_loss:
        lines += ["", "## By loss (each student's best experiment with each loss)", "",
                  "| model | loss | test accuracy | n | teacher agreement | fit s |",
                  "|---|---|---|---|---|---|"]
        for b in by_loss:
            lines.append(f"| {b['model']} | {loss_text(b)} | {b['mean']:.4f} ± {b['std']:.4f} | "
                         f"{b['n']} | {b['agreement']:.4f} | {b['fit_s']:.2f} |")
    baselines: dict[str, dict] = {}  # the strongest label-only experiment of each model
    for b in board:  # (board is sorted best first)
        if label_only(b["loss"]):
            baselines.setdefault(b["model"], b)
    versus = [(b, baselines[b["model"]]) for b in board
              if b["model"] in baselines and b["loss"] is not None and not label_only(b["loss"])]
    if versus:
        lines += ["", "## Against the best label-only baseline (same student, a loss that reads no "
                  "teacher, with or without augmentation)", "",
                  "| model | loss | temperature | views | test accuracy | baseline | gain |",
                  "|---|---|---|---|---|---|---|"]
        for b, base in versus:
            how = base["loss"] + (f", augment={base['augment']}" if base["augment"] else "")
            lines.append(f"| {b['model']} | {loss_text(b)} | {_text(b['temperature'])} | {_text(b['views'])} | "
                         f"{b['mean']:.4f} | {base['mean']:.4f} ({how}) | {b['mean'] - base['mean']:+.4f} |")
    return "\n".join(lines) + "\n"


def plots(board: list[dict], teacher_acc: float, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, filename):
        path = out / filename
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for b in board:
        ax.errorbar(b["params"], b["mean"], yerr=b["std"], fmt="o", capsize=3)
        ax.annotate(name(b), (b["params"], b["mean"]), fontsize=7)
    ax.axhline(teacher_acc, ls="--", c="gray", label="teacher")
    ax.set(xscale="log", xlabel="student parameters", ylabel="test accuracy", title="Accuracy vs size")
    ax.legend()
    save(fig, "accuracy_vs_params.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[tuple, list] = {}
    for b in board:
        if b["temperature"] is not None:
            series.setdefault((b["model"], b["loss"] or "-"), []).append(b)
    for (model, loss), bs in sorted(series.items()):
        bs = sorted(bs, key=lambda b: b["temperature"])
        ax.errorbar([b["temperature"] for b in bs], [b["mean"] for b in bs], yerr=[b["std"] for b in bs],
                    marker="o", capsize=3, label=f"{model}/{loss}")
    ax.axhline(teacher_acc, ls="--", c="gray", label="teacher")
    ax.set(xlabel="temperature", ylabel="test accuracy", title="Accuracy vs temperature (runs that use one)")
    ax.legend(fontsize=7)
    save(fig, "accuracy_vs_temperature.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = ["tab:gray" if label_only(b["loss"]) else "tab:blue" for b in board]
    ax.barh([name(b) for b in board], [b["mean"] for b in board], xerr=[b["std"] for b in board],
            color=colors)
    ax.axvline(teacher_acc, ls="--", c="k", label="teacher")
    lo = min(b["mean"] - b["std"] for b in board)
    ax.set(xlim=(max(0.0, lo - 0.02), 1.0), xlabel="test accuracy",
           title="Students vs label-only baseline (grey = label-only loss)")
    ax.tick_params(axis="y", labelsize=7)
    save(fig, "students_vs_baseline.png")
    return paths
