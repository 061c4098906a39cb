"""The leaderboard and plots of a results table (``kdcache report``).

Runs that differ only by seed are repeats of one experiment: the leaderboard gives their test
accuracy as mean ± std (sample std, n runs). Everything else a row records (model, loss,
target, temperature, views, augment, alpha, epochs, C, layer, loss_weight,
standardize_logits, student_layer) makes another experiment, so a
student trained with and without augmentation shows as two rows.
"""

from __future__ import annotations

import io

import numpy as np

from pipeline import storage
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
                      "kl": _mean(rs, "kl_teacher_student"),  # None from sparse caches
                      "ece": float(np.mean([r["ece"] for r in rs])),
                      "params": int(rs[0]["params"]), "kind": rs[0]["kind"],
                      "weights_bytes": _mean(rs, "weights_bytes"),
                      "latency_b1_ms": _mean(rs, "latency_b1_ms"),
                      "latency_b256_ms": _mean(rs, "latency_b256_ms"),
                      "fit_s": float(np.mean([r["fit_seconds"] for r in rs]))})
    return sorted(board, key=lambda b: -b["mean"])


def _mean(rows: list[dict], key: str) -> float | None:
    """The mean of ``key`` over the rows that recorded it (None: none did)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def teacher_of(rows: list[dict]) -> dict:
    """The teacher's test accuracy, parameters, weights bytes and CPU latencies, as the newest
    row recorded them (one cache: one teacher); None where its cache did not record them."""
    last = rows[-1]
    return {"accuracy": float(last["teacher_test_accuracy"]), "params": last.get("teacher_params"),
            "weights_bytes": last.get("teacher_weights_bytes"),
            "latency_b1_ms": last.get("teacher_latency_b1_ms"),
            "latency_b256_ms": last.get("teacher_latency_b256_ms")}


def _ratio(teacher: float | None, student: float | None, better: str, worse: str) -> str:
    """``"55× smaller"``, or ``"1.6× larger"`` when the student costs more than the teacher."""
    if not teacher or not student:
        return f"? {better}"
    r, word = (teacher / student, better) if teacher >= student else (student / teacher, worse)
    return (f"{r:,.0f}×" if r >= 10 else f"{r:.1f}×") + f" {word}"


def against_teacher(b: dict, teacher: dict) -> str:
    """One experiment against its teacher, e.g. "55× smaller, 12× faster (batch 1; 9.1× at
    batch 256), 98.6% of the teacher's accuracy kept". A feature student is a head on the
    teacher's features: deployed, it runs after the teacher's backbone, so it is smaller but
    not faster."""
    kept = f"{100 * b['mean'] / teacher['accuracy']:.1f}% of the teacher's accuracy kept"
    smaller = _ratio(teacher["params"], b["params"], "smaller", "larger")
    if b.get("kind") == "features":
        return (f"head {smaller} than the teacher, but it scores the teacher's features: "
                f"deployed with the teacher's backbone, it is not faster; {kept}")
    if teacher["latency_b1_ms"] is None:
        return f"{smaller}, speed not compared (the cache did not record the teacher's latency: rebuild it); {kept}"
    return (f"{smaller}, {_ratio(teacher['latency_b1_ms'], b['latency_b1_ms'], 'faster', 'slower')} "
            f"(batch 1; {_ratio(teacher['latency_b256_ms'], b['latency_b256_ms'], 'faster', 'slower')} "
            f"at batch 256), {kept}")


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


def _ms(value: float | None) -> str:
    return "?" if value is None else f"{value:.4g}"


def teacher_line(teacher: dict) -> str:
    def count(value) -> str:
        return "?" if value is None else f"{value:,}"

    return (f"Teacher: {count(teacher['params'])} params, {count(teacher['weights_bytes'])} bytes "
            f"of weights, {_ms(teacher['latency_b1_ms'])} / {_ms(teacher['latency_b256_ms'])} ms, "
            f"test accuracy {teacher['accuracy']:.4f}.")


def markdown(board: list[dict], teacher: dict, source: str) -> str:
    teacher_acc = teacher["accuracy"]
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
                     f"{b['n']} | {b['val']:.4f} | {b['agreement']:.4f} | {'–' if b['kl'] is None else format(b['kl'], '.4f')} | "
                     f"{b['ece']:.4f} | {b['params']:,} | {b['fit_s']:.2f} |")
    by_loss = by_loss_table(board)
    if by_loss:
        lines += ["", "## By loss (each student's best experiment with each loss)", "",
                  "| model | loss | test accuracy | n | teacher agreement | fit s |",
                  "|---|---|---|---|---|---|"]
        for b in by_loss:
            lines.append(f"| {b['model']} | {loss_text(b)} | {b['mean']:.4f} ± {b['std']:.4f} | "
                         f"{b['n']} | {b['agreement']:.4f} | {b['fit_s']:.2f} |")
    lines += ["", "## Against the teacher (size: parameters; CPU milliseconds per sample at "
              "batch 1 / 256)", "", teacher_line(teacher),
              "", "| model | loss | test accuracy | params | ms b1 / b256 | against the teacher |",
              "|---|---|---|---|---|---|"]
    for b in board:
        lines.append(f"| {b['model']} | {loss_text(b)} | {b['mean']:.4f} | {b['params']:,} | "
                     f"{_ms(b['latency_b1_ms'])} / {_ms(b['latency_b256_ms'])} | "
                     f"{against_teacher(b, teacher)} |")
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


def plots(board: list[dict], teacher: dict, out) -> list:
    """The report's PNG plots, written into ``out`` (a folder, or a prefix on an object store)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, filename):
        path = out / filename
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
        storage.write_bytes(path, png.getvalue())
        plt.close(fig)
        paths.append(path)

    teacher_acc = teacher["accuracy"]

    def versus_teacher(x_of, teacher_x, xlabel: str, title: str, filename: str, note: str) -> None:
        """Test accuracy against a cost, one point per experiment and one for the teacher;
        feature students (a head on the teacher's features) marked apart."""
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, marker, label in (("inputs", "o", "students"), ("features", "s", note)):
            points = [(x_of(b), b) for b in board if b["kind"] == kind and x_of(b) is not None]
            for i, (x, b) in enumerate(points):
                ax.errorbar(x, b["mean"], yerr=b["std"], fmt=marker, capsize=3, c="tab:blue"
                            if kind == "inputs" else "tab:orange", label=label if i == 0 else None)
                ax.annotate(name(b), (x, b["mean"]), fontsize=7)
        if teacher_x is not None:
            ax.plot([teacher_x], [teacher_acc], "*", ms=14, c="k", label="teacher")
            ax.annotate("teacher", (teacher_x, teacher_acc), fontsize=8)
        ax.axhline(teacher_acc, ls="--", c="gray")
        ax.set(xscale="log", xlabel=xlabel, ylabel="test accuracy", title=title)
        ax.legend(fontsize=7)
        save(fig, filename)

    versus_teacher(lambda b: b["params"], teacher["params"], "parameters", "Accuracy vs size",
                   "accuracy_vs_params.png", "feature students (the head only)")
    # a feature student's deployed latency is the teacher's (its features) plus the head's;
    # without the teacher's (a cache built before kdcache measured it) it is left out
    def deployed_latency(b: dict) -> float | None:
        if b["latency_b1_ms"] is None or b["kind"] != "features":
            return b["latency_b1_ms"]
        return None if teacher["latency_b1_ms"] is None else teacher["latency_b1_ms"] + b["latency_b1_ms"]

    versus_teacher(deployed_latency,
                   teacher["latency_b1_ms"], "CPU latency per sample at batch 1 (ms)",
                   "Accuracy vs latency", "accuracy_vs_latency.png",
                   "feature students (teacher + head)")

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
