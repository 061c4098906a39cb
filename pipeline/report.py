"""The leaderboard and plots of a results table (``kdcache report``).

Runs whose configs are equal but for the seed are repeats of one experiment: the leaderboard
gives their test accuracy as mean ± std (sample std over n seeds; a seed run more than once
counts once, its newest run). The experiment key is every config column of the table — the
run keys and every hyperparameter the students and losses declare (pipeline.results) — so two
runs that differ in width, lr, a loss weight or a plugin's own argument are two rows, and the
leaderboard shows the hyperparameters that differ between its rows.

Costs against the teacher ("N× smaller, M× faster") are measured when the report is made:
the teacher and each student timed in this process, alternated, with the same threads
(pipeline.costs); the figures recorded at build or run time are context only.

Language-model students (a token cache's ``lm`` runs) are ranked, tabled and plotted by test
perplexity of the true next tokens instead (lower is better), the teacher's beside theirs.
"""

from __future__ import annotations

import io

import numpy as np

from pipeline import storage
from pipeline.losses import LOSSES
from pipeline.results import config_names

NOT_EXPERIMENT = ("seed",)  # the repeats of one experiment differ only in these
ALWAYS_SHOWN = ("model", "loss")


def experiment_key(names: list[str]) -> list[str]:
    """The columns that make an experiment: every config column but the seed."""
    return [n for n in config_names(names) if n not in NOT_EXPERIMENT]


def label_only(loss: str | None) -> bool:
    """Whether ``loss`` is a label-only baseline (it declares that it reads no teacher output:
    neither logits nor features)."""
    if loss is None or loss not in LOSSES:
        return False
    needs = LOSSES.declared(loss)
    return not needs.logits and not needs.features


def leaderboard(rows: list[dict]) -> list[dict]:
    """One entry per experiment, best mean test accuracy first. Each entry holds its config
    columns, ``n`` (distinct seeds), ``seeds``, ``mean``, ``std`` (None for one seed), the
    means of the other measurements, ``run_dirs`` (newest run of each seed) and
    ``differs``: the config columns whose values differ between experiments."""
    names = sorted({k for r in rows for k in r})
    key_names = experiment_key(names)
    groups: dict[tuple, dict[int, dict]] = {}
    for r in sorted(rows, key=lambda r: r.get("time") or ""):  # newest last: it wins its seed
        key = tuple(_hashable(r.get(k)) for k in key_names)
        groups.setdefault(key, {})[r.get("seed")] = r
    board = []
    for key, by_seed in groups.items():
        rs = list(by_seed.values())
        acc = np.array([r["test_accuracy"] for r in rs])
        board.append({**dict(zip(key_names, key)), "n": len(rs), "seeds": sorted(by_seed),
                      "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(rs) > 1 else None,
                      "val": float(np.mean([r["val_accuracy"] for r in rs])),
                      "agreement": float(np.mean([r["teacher_agreement"] for r in rs])),
                      "kl": _mean(rs, "kl_teacher_student"),  # None from sparse caches
                      "ece": _mean(rs, "ece"),  # None for language models
                      # language models (token caches): held-out perplexity, mean ± std
                      "perplexity": _mean(rs, "test_perplexity"), "perplexity_std": _std(rs, "test_perplexity"),
                      "val_perplexity": _mean(rs, "val_perplexity"), "tokens_per_s": _mean(rs, "tokens_per_s"),
                      "params": int(rs[0]["params"]), "kind": rs[0]["kind"],
                      "views_policy": rs[0].get("views_policy"),
                      "weights_bytes": _mean(rs, "weights_bytes"),
                      "latency_b1_ms": _mean(rs, "latency_b1_ms"),
                      "latency_b256_ms": _mean(rs, "latency_b256_ms"),
                      "fit_s": float(np.mean([r["fit_seconds"] for r in rs])),
                      "run_dirs": [r.get("run_dir") for r in rs]})
    # the columns that tell apart experiments of one student with one loss (widths 16 and
    # 256, temperatures 2 and 4); what every run of a (model, loss) pair shares — a network's
    # default width, kd's alpha — says nothing the model and loss columns do not
    pairs = {(b["model"], b["loss"]) for b in board}
    differs = [k for k in key_names if k not in ALWAYS_SHOWN and any(
        len({_hashable(b.get(k)) for b in board if (b["model"], b["loss"]) == pair}) > 1
        for pair in pairs)]
    for b in board:
        b["differs"] = differs
    if board and all(b["perplexity"] is not None for b in board):  # language models: lowest first
        return sorted(board, key=lambda b: b["perplexity"])
    return sorted(board, key=lambda b: -b["mean"])


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def accuracy_text(b: dict) -> str:
    """``0.9597 ± 0.0098`` over several seeds; one seed has no spread to show."""
    return f"{b['mean']:.4f}" + ("" if b["std"] is None else f" ± {b['std']:.4f}")


def _mean(rows: list[dict], key: str) -> float | None:
    """The mean of ``key`` over the rows that recorded it (None: none did)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _std(rows: list[dict], key: str) -> float | None:
    """The sample std of ``key`` over the rows that recorded it (None: fewer than two)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def teacher_of(rows: list[dict]) -> dict:
    """The teacher's test accuracy, parameters and weights bytes, and the CPU latencies its
    cache recorded when it was built (context only), as the newest row holds them."""
    last = rows[-1]
    return {"accuracy": float(last["teacher_test_accuracy"]), "params": last.get("teacher_params"),
            "weights_bytes": last.get("teacher_weights_bytes"),
            "latency_b1_ms": last.get("teacher_latency_b1_ms"),
            "latency_b256_ms": last.get("teacher_latency_b256_ms"),
            # a token cache's causal LM: its test perplexity and tokens/s (None otherwise)
            "perplexity": last.get("teacher_test_perplexity"), "tokens_per_s": last.get("teacher_tokens_per_s")}


def _ratio(teacher: float | None, student: float | None, better: str, worse: str) -> str:
    """``"55× smaller"``, or ``"1.6× larger"`` when the student costs more than the teacher."""
    if not teacher or not student:
        return f"? {better}"
    r, word = (teacher / student, better) if teacher >= student else (student / teacher, worse)
    return (f"{r:,.0f}×" if r >= 10 else f"{r:.1f}×") + f" {word}"


def against_teacher(b: dict, teacher: dict) -> str:
    """One experiment against its teacher, e.g. "55× smaller, 12× faster (batch 1; 9.1× at
    batch 256), 98.6% of the teacher's accuracy kept". Speed is compared only from latencies
    measured side by side (``b["side_by_side"]``, :func:`pipeline.costs.side_by_side`). A
    feature student is a head on the teacher's features: deployed, it runs after the
    teacher's backbone, so it is smaller but not faster."""
    kept = f"{100 * b['mean'] / teacher['accuracy']:.1f}% of the teacher's accuracy kept"
    smaller = _ratio(teacher["params"], b["params"], "smaller", "larger")
    if b.get("kind") == "features":
        return (f"head {smaller} than the teacher, but it scores the teacher's features: "
                f"deployed with the teacher's backbone, it is not faster; {kept}")
    timed = b.get("side_by_side")
    if not isinstance(timed, dict):
        return f"{smaller}, speed not compared ({timed or 'not measured'}); {kept}"
    return (f"{smaller}, {_ratio(timed['teacher_b1_ms'], timed['student_b1_ms'], 'faster', 'slower')} "
            f"(batch 1; {_ratio(timed['teacher_b256_ms'], timed['student_b256_ms'], 'faster', 'slower')} "
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


def name(b: dict, without: tuple[str, ...] = ()) -> str:
    """A short label of an experiment for plots: model, loss and the hyperparameters that
    differ between experiments, e.g. ``mlp/kd/temperature=4/width=64``."""
    parts = [b["model"], b["loss"] and loss_text(b)]
    parts += [f"{k}={_text(b.get(k))}" for k in b.get("differs", ()) if k not in without
              and b.get(k) is not None and k not in ("loss_weight", "standardize_logits")]
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
            f"of weights, test accuracy {teacher['accuracy']:.4f}; when its cache was built it "
            f"measured {_ms(teacher['latency_b1_ms'])} / {_ms(teacher['latency_b256_ms'])} ms "
            "(context only: the ratios below are timed side by side now).")


def perplexity_text(b: dict) -> str:
    """``12.31 ± 0.40`` over several seeds; one seed has no spread to show."""
    return f"{b['perplexity']:.2f}" + ("" if b["perplexity_std"] is None else f" ± {b['perplexity_std']:.2f}")


def lm_markdown(board: list[dict], teacher: dict, source: str) -> str:
    """The leaderboard of language-model students of a token cache: held-out perplexity first
    (lower is better), next-token accuracy and agreement with the teacher, KL on the K + tail
    support, size and tokens/s against the teacher (timed side by side when it could be)."""
    differs = board[0]["differs"] if board else []
    head = ["model", "loss", *differs]
    lines = [f"# Leaderboard: {source}", "",
             f"Language models. Teacher test perplexity {_num(teacher['perplexity'], '.2f')}, next-token "
             f"accuracy {teacher['accuracy']:.4f}. Test perplexity of the true next tokens is mean ± std "
             "over seeds (lower is better); accuracy and agreement are over the positions with a target; "
             "KL(t‖s) is on the teacher's K + tail support at T = 1 (– from sample: caches).", "",
             "| " + " | ".join([*head, "test perplexity", "n", "val perplexity", "next-token accuracy",
                                "teacher agreement", "KL(t‖s)", "params", "fit s"]) + " |",
             "|" + "---|" * (len(head) + 8)]
    for b in board:
        cells = [b["model"], loss_text(b), *(_text(b.get(k)) for k in differs)]
        lines.append("| " + " | ".join(cells) + f" | {perplexity_text(b)} | {b['n']} | "
                     f"{b['val_perplexity']:.2f} | {b['mean']:.4f} | {_num(b['agreement'], '.4f')} | "
                     f"{_num(b['kl'], '.4f')} | {b['params']:,} | {b['fit_s']:.2f} |")
    lines += ["", "## Against the teacher (test perplexity, lower is better; size: parameters; speed: CPU "
              "tokens per second at 8 windows per call, teacher and student timed side by side in this "
              "process)", "",
              f"Teacher: {_num(teacher['params'], ',')} params, test perplexity "
              f"{_num(teacher['perplexity'], '.2f')}; when its cache was built it ran "
              f"{_num(teacher['tokens_per_s'], ',.0f')} tokens/s (context only).", "",
              "| experiment | test perplexity | teacher test perplexity | params | teacher params "
              "| tokens/s | teacher tokens/s | against the teacher |",
              "|---|---|---|---|---|---|---|---|"]
    for b in board:
        timed = b.get("side_by_side") if isinstance(b.get("side_by_side"), dict) else {}
        rate = {who: tokens_per_s(b, who) for who in ("teacher", "student")}
        smaller = _ratio(teacher["params"], b["params"], "smaller", "larger")
        faster = (_ratio(rate["student"], rate["teacher"], "faster", "slower") if timed
                  else f"speed not compared ({b.get('side_by_side') or 'not measured'})")
        kept = ("" if not teacher["perplexity"] else
                f", perplexity {b['perplexity'] / teacher['perplexity']:.2f}× the teacher's")
        lines.append(f"| {name(b)} | {perplexity_text(b)} | {_num(teacher['perplexity'], '.2f')} | {b['params']:,} | "
                     f"{_num(teacher['params'], ',')} | {_num(rate['student'], ',.0f')} | "
                     f"{_num(rate['teacher'], ',.0f')} | {smaller}, {faster}{kept} |")
    baselines: dict[str, dict] = {}  # the best next-token CE (label-only) experiment of each model
    for b in board:
        if label_only(b["loss"]):
            baselines.setdefault(b["model"], b)
    versus = [(b, baselines[b["model"]]) for b in board
              if b["model"] in baselines and b["loss"] is not None and not label_only(b["loss"])]
    if versus:
        lines += ["", "## Against the best label-only baseline (same student, next-token CE alone)", "",
                  "| experiment | test perplexity | baseline | change |", "|---|---|---|---|"]
        for b, base in versus:
            lines.append(f"| {name(b)} | {perplexity_text(b)} | {perplexity_text(base)} ({name(base)}) | "
                         f"{b['perplexity'] - base['perplexity']:+.2f} |")
    return "\n".join(lines) + "\n"


def tokens_per_s(b: dict, who: str) -> float | None:
    """The tokens per second of ``who`` (``teacher`` or ``student``) timed side by side with
    experiment ``b`` at 8 windows per call (``seq_len`` · 1000 / ms per window); None where
    they were not timed."""
    timed = b.get("side_by_side")
    if not isinstance(timed, dict) or not timed.get(f"{who}_b8_ms") or not timed.get("seq_len"):
        return None
    return timed["seq_len"] * 1000 / timed[f"{who}_b8_ms"]


def is_lm(board: list[dict], teacher: dict) -> bool:
    """Whether the board is of language models (a token cache: every experiment and the
    teacher have a test perplexity), reported and plotted in perplexity."""
    return teacher.get("perplexity") is not None and all(b["perplexity"] is not None for b in board)


def _num(value, spec: str) -> str:
    return "?" if value is None else format(value, spec)


def markdown(board: list[dict], teacher: dict, source: str) -> str:
    if is_lm(board, teacher):
        return lm_markdown(board, teacher, source)
    differs = board[0]["differs"] if board else []
    head = ["model", "loss", *differs]
    lines = [f"# Leaderboard: {source}", "",
             f"Teacher test accuracy: {teacher['accuracy']:.4f}. Test accuracy is mean ± std over seeds "
             "(n seeds; a seed run twice counts once, its newest run); – marks what a run does not "
             "use. Columns after loss: the hyperparameters that differ between experiments.", "",
             "| " + " | ".join([*head, "test accuracy", "n", "val", "teacher agreement", "KL(t‖s)",
                                "ECE", "params", "fit s"]) + " |",
             "|" + "---|" * (len(head) + 8)]
    for b in board:
        cells = [b["model"], loss_text(b), *(_text(b.get(k)) for k in differs)]
        lines.append("| " + " | ".join(cells) + f" | {accuracy_text(b)} | {b['n']} | {b['val']:.4f} | "
                     f"{b['agreement']:.4f} | {'–' if b['kl'] is None else format(b['kl'], '.4f')} | "
                     f"{b['ece']:.4f} | {b['params']:,} | {b['fit_s']:.2f} |")
    by_loss = by_loss_table(board)
    if by_loss:
        lines += ["", "## By loss (each student's best experiment with each loss)", "",
                  "| model | loss | test accuracy | n | teacher agreement | fit s |",
                  "|---|---|---|---|---|---|"]
        for b in by_loss:
            lines.append(f"| {b['model']} | {loss_text(b)} | {accuracy_text(b)} | "
                         f"{b['n']} | {b['agreement']:.4f} | {b['fit_s']:.2f} |")
    lines += ["", "## Against the teacher (size: parameters; speed: CPU milliseconds per sample at "
              "batch 1 / 256, teacher and student timed side by side in this process)", "",
              teacher_line(teacher), "",
              "| experiment | test accuracy | params | teacher ms b1 / b256 | student ms b1 / b256 "
              "| against the teacher |", "|---|---|---|---|---|---|"]
    for b in board:
        timed = b.get("side_by_side") if isinstance(b.get("side_by_side"), dict) else {}
        lines.append(f"| {name(b)} | {b['mean']:.4f} | {b['params']:,} | "
                     f"{_ms(timed.get('teacher_b1_ms'))} / {_ms(timed.get('teacher_b256_ms'))} | "
                     f"{_ms(timed.get('student_b1_ms'))} / {_ms(timed.get('student_b256_ms'))} | "
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
                  "| experiment | test accuracy | baseline | gain |", "|---|---|---|---|"]
        for b, base in versus:
            lines.append(f"| {name(b)} | {b['mean']:.4f} | {base['mean']:.4f} ({name(base)}) | "
                         f"{b['mean'] - base['mean']:+.4f} |")
    return "\n".join(lines) + "\n"


def _saver(out, paths: list):
    """``save(fig, filename)``: the figure as a PNG into ``out`` (a folder, or a prefix on an
    object store), its path appended to ``paths``."""
    import matplotlib.pyplot as plt

    def save(fig, filename):
        path = out / filename
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
        storage.write_bytes(path, png.getvalue())
        plt.close(fig)
        paths.append(path)
    return save


def by_temperature(ax, board: list[dict], value, error) -> None:
    """One line per experiment but for its temperature: ``value(b)`` ± ``error(b)`` against T."""
    series: dict[str, list] = {}
    for b in board:
        if b.get("temperature") is not None:
            series.setdefault(name(b, without=("temperature",)), []).append(b)
    for label, bs in sorted(series.items()):
        bs = sorted(bs, key=lambda b: b["temperature"])
        ax.errorbar([b["temperature"] for b in bs], [value(b) for b in bs], yerr=[error(b) for b in bs],
                    marker="o", capsize=3, label=label)


def plots(board: list[dict], teacher: dict, out) -> list:
    """The report's PNG plots, written into ``out`` (a folder, or a prefix on an object store):
    in test accuracy, or for language models (:func:`is_lm`) in test perplexity
    (:func:`lm_plots`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if is_lm(board, teacher):
        return lm_plots(board, teacher, out)
    paths = []
    save = _saver(out, paths)

    teacher_acc = teacher["accuracy"]

    def std(b: dict) -> float:
        return b["std"] or 0.0

    def versus_teacher(x_of, teacher_x, xlabel: str, title: str, filename: str, note: str) -> None:
        """Test accuracy against a cost, one point per experiment (each width, lr, ... its own)
        and one for the teacher; feature students (a head on the teacher's features) apart."""
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, marker, label in (("inputs", "o", "students"), ("features", "s", note)):
            points = [(x_of(b), b) for b in board if b["kind"] == kind and x_of(b) is not None]
            for i, (x, b) in enumerate(points):
                ax.errorbar(x, b["mean"], yerr=std(b), fmt=marker, capsize=3, c="tab:blue"
                            if kind == "inputs" else "tab:orange", label=label if i == 0 else None)
                ax.annotate(name(b), (x, b["mean"]), fontsize=7)
        if teacher_x is not None:
            ax.plot([teacher_x], [teacher_acc], "*", ms=14, c="k", label="teacher")
            ax.annotate("teacher", (teacher_x, teacher_acc), fontsize=8)
        ax.axhline(teacher_acc, ls="--", c="gray")
        ax.set(xscale="log", xlabel=xlabel, ylabel="test accuracy", title=title)
        if ax.get_legend_handles_labels()[0]:  # (no student timed: nothing to label)
            ax.legend(fontsize=7)
        save(fig, filename)

    versus_teacher(lambda b: b["params"], teacher["params"], "parameters", "Accuracy vs size",
                   "accuracy_vs_params.png", "feature students (the head only)")
    # latencies timed side by side; a feature student's deployed latency is the teacher's
    # backbone plus its head, so it is left out of this plot
    timed = [b.get("side_by_side") for b in board if isinstance(b.get("side_by_side"), dict)]
    teacher_b1 = float(np.median([t["teacher_b1_ms"] for t in timed])) if timed else None
    versus_teacher(lambda b: b["side_by_side"]["student_b1_ms"] if isinstance(b.get("side_by_side"), dict)
                   else None, teacher_b1, "CPU latency per sample at batch 1 (ms, timed side by side)",
                   "Accuracy vs latency", "accuracy_vs_latency.png", "feature students")

    fig, ax = plt.subplots(figsize=(6, 4))
    by_temperature(ax, board, lambda b: b["mean"], std)
    ax.axhline(teacher_acc, ls="--", c="gray", label="teacher")
    ax.set(xlabel="temperature", ylabel="test accuracy",
           title="Accuracy vs temperature (one line per experiment but for T)")
    ax.legend(fontsize=7)
    save(fig, "accuracy_vs_temperature.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = ["tab:gray" if label_only(b["loss"]) else "tab:blue" for b in board]
    ax.barh([name(b) for b in board], [b["mean"] for b in board], xerr=[std(b) for b in board],
            color=colors)
    ax.axvline(teacher_acc, ls="--", c="k", label="teacher")
    # bars start at 0: a truncated axis makes small differences look large
    ax.set(xlim=(0.0, 1.0), xlabel="test accuracy",
           title="Students vs label-only baseline (grey = label-only loss)")
    ax.tick_params(axis="y", labelsize=7)
    save(fig, "students_vs_baseline.png")
    return paths


def lm_plots(board: list[dict], teacher: dict, out) -> list:
    """The plots of a language-model board, in test perplexity (lower is better; log axes):
    against parameters and against CPU tokens/s timed side by side (the teacher a star on both,
    its perplexity a dashed line), against the temperature, and each experiment's bar beside
    the label-only (next-token CE) ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    save = _saver(out, paths)
    ylabel = "test perplexity (lower is better)"
    teacher_ppl = teacher["perplexity"]

    def spread(b: dict) -> float:
        return b["perplexity_std"] or 0.0

    def versus_teacher(x_of, teacher_x, xlabel: str, xscale: str, title: str, filename: str) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        labelled = set()
        for b in board:
            if (x := x_of(b)) is None:
                continue
            kind = "students, label-only loss" if label_only(b["loss"]) else "students, distilled"
            ax.errorbar(x, b["perplexity"], yerr=spread(b), fmt="o", capsize=3, label=None if kind in labelled
                        else kind, c="tab:gray" if label_only(b["loss"]) else "tab:blue")
            labelled.add(kind)
            ax.annotate(name(b), (x, b["perplexity"]), fontsize=7)
        if teacher_x is not None:
            ax.plot([teacher_x], [teacher_ppl], "*", ms=14, c="k", label="teacher")
            ax.annotate("teacher", (teacher_x, teacher_ppl), fontsize=8)
        ax.axhline(teacher_ppl, ls="--", c="gray")
        ax.set(xscale=xscale, yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        save(fig, filename)

    versus_teacher(lambda b: b["params"], teacher["params"], "parameters", "log", "Perplexity vs size",
                   "perplexity_vs_params.png")
    # the teacher's rate: the median of its side-by-side timings (one per experiment timed)
    rates = [r for b in board if (r := tokens_per_s(b, "teacher")) is not None]
    versus_teacher(lambda b: tokens_per_s(b, "student"), float(np.median(rates)) if rates else None,
                   "CPU tokens/s at 8 windows per call (timed side by side)", "linear", "Perplexity vs speed",
                   "perplexity_vs_tokens_per_s.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    by_temperature(ax, board, lambda b: b["perplexity"], spread)
    ax.axhline(teacher_ppl, ls="--", c="gray", label="teacher")
    ax.set(yscale="log", xlabel="temperature", ylabel=ylabel,
           title="Perplexity vs temperature (one line per experiment but for T)")
    ax.legend(fontsize=7)
    save(fig, "perplexity_vs_temperature.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = ["tab:gray" if label_only(b["loss"]) else "tab:blue" for b in board]
    ax.barh([name(b) for b in board], [b["perplexity"] for b in board],
            xerr=[spread(b) for b in board], color=colors)
    ax.axvline(teacher_ppl, ls="--", c="k", label="teacher")
    ax.set(xlabel=ylabel, title="Students vs next-token CE baseline (grey = label-only loss)")
    ax.set_xlim(left=0.0)  # bars start at 0: a truncated axis makes small differences look large
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7)
    save(fig, "students_vs_baseline.png")
    return paths
