"""Sparse logits: what `logits=topk:K` and `logits=sample:K` save on disk, and what students
distilled from them lose, on digits3 (1,000 classes; 24,000 / 4,000 / 4,000 rows).

The teacher is digits3's default (resnet_small, trained once in the work dir as `make
teacher-cache dataset=digits3` would); every cache is `layers=none` (logits only), float16.

Storage (floor: on-disk logits bytes per row ≤ 0.05× dense float32 for topk:16 and sample:16)
    on disk      every file under arrays.zarr/<split>/<logits arrays> (chunks, shard indexes,
                 CRCs, zarr.json) over the three splits, per row.
    dense f32    C × 4 bytes per row (4,000 at C = 1,000).
    for dense, topk:{1,4,5,16,64}, sample:{1,4,16,64}, with each build's throughput.

Accuracy (test split, mean ± sample std over seeds 0, 1, 2), students mlp (default width) and
cnn_small (width 8: at the default width 4 its 16-wide embedding starves a 1,000-way head),
20 epochs, every arm the same student, optimiser and schedule; KD at the cache's T = 4,
alpha 0.9. Arms: ce (labels only), kd from dense, and kd from topk:{1,4,16,64}, sample:{1,4,16,64}.
Information (not a floor): kd from topk:16 and from sample:16 against kd from dense and ce; what
dropping 15/16 of the logits costs is the method's (see bench/FINDINGS.md).

Views × sparse at a fixed byte budget: for the bytes per row of one dense float16 view,
topk:16 and sample:16 hold 16 views (train rows; augment=shift:1), against kd from one dense
view and ce with fresh shift:1 augmentation.

An exact head with an unbiased tail (information, not a floor): mlp, kd at T = 4, from dense,
topk:16, sample:16 and topk:16+sample:16 (the 16 largest exactly with the tail's mass, plus 16
draws from the tail: head exact, tail unbiased), with the bytes per row each costs on disk.
`python -m bench.sparse --head-and-tail` runs this part alone: it trains only the new arm and
takes dense's, topk:16's and sample:16's accuracies and bytes per row from the sparse record in
docs/benchmarks.json (the accuracy table's runs: same seeds, epochs and student), then writes
the table, its figure and a note dated with both runs into that record.

Epoch time (mlp, kd): median seconds per epoch from topk:16 and sample:16 against dense,
arms alternated (floor ≤ 1.1×): reading K ids instead of C logits, and the loss's scatter.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import (DEFAULT_WORKDIR, REPO, alternate, base_dirs, clocked, dir_bytes, ensure_cache,
                          figure, log, machine, main_for, median, result, set_threads, table)

NAME = "sparse"
STORAGE_FLOOR = 0.05
ACCURACY_TOLERANCE = 0.01
TIME_FLOOR = 1.1
STORAGE_MODES = ("dense", "topk:1", "topk:4", "topk:5", "topk:16", "topk:64",
                 "sample:1", "sample:4", "sample:16", "sample:64")
ACCURACY_MODES = ("dense", "topk:64", "sample:64", "topk:16", "sample:16", "topk:4", "sample:4", "topk:1",
                  "sample:1")
WIDTHS = {"mlp": None, "cnn_small": 8}  # None: the student's default width (width=0 is refused)
POLICY = "shift:1"
BUDGET_VIEWS = 16


def cache_args(workdir: Path, mode: str, views: int = 1) -> dict:
    name = f"sparse-digits3-{mode.replace(':', '')}" + (f"-views{views}" if views > 1 else "")
    return {"dataset": "digits3", "layers": "none", "logits": mode, "cache": workdir / "caches" / name,
            **({"views": views, "augment": POLICY} if views > 1 else {}), **base_dirs(workdir)}


def build(workdir: Path, mode: str, views: int = 1) -> tuple[Path, float]:
    t0 = time.perf_counter()
    root = ensure_cache(cache_args(workdir, mode, views))
    return root, time.perf_counter() - t0


def logits_bytes(root: Path) -> tuple[float, int]:
    """(on-disk bytes per row of the logits arrays, rows)."""
    from pipeline.cache import format as fmt
    from pipeline.cache import open_cache

    cache = open_cache(root)
    rows = sum(cache.num_rows(s) for s in cache.splits)
    disk = sum(dir_bytes(root / fmt.ARRAYS / key) for s in cache.splits
               for key in fmt.logits_keys(s, cache.manifest))
    return disk / rows, rows


def raw_bytes(mode: str, classes: int, dtype_bytes: int = 2) -> int:
    """Bytes per row and view before any metadata: what the arrays' elements take."""
    from pipeline.sparse import classes_dtype, parse_mode

    m = parse_mode(mode)
    ids = np.dtype(classes_dtype(classes)).itemsize
    if m.kind == "dense":
        return classes * dtype_bytes
    if m.kind == "topk":
        return m.k * (ids + dtype_bytes) + 8  # and the tail: two float32
    if m.kind == "topk+sample":
        return m.k * (ids + dtype_bytes) + 8 + m.m * ids
    return m.k * ids


def storage(workdir: Path) -> tuple[list[dict], list[list], dict]:
    figures, rows, measured = [], [], {}
    for mode in STORAGE_MODES:
        root, seconds = build(workdir, mode)
        per_row, n = logits_bytes(root)
        ratio = per_row / 4000
        measured[mode] = {"bytes_per_row": per_row, "rows": n, "build_s": seconds, "ratio": ratio}
        floor = STORAGE_FLOOR if mode in ("topk:16", "sample:16") else None
        figures.append(figure(f"logits bytes/row on disk / dense f32, digits3 {mode}", round(ratio, 4),
                              "x", floor=floor, op="<=", bytes_per_row=round(per_row, 1)))
        verdict = "—" if floor is None else ("PASS" if ratio <= floor else "FAIL")
        rows.append([mode, f"{raw_bytes(mode, 1000)}", f"{per_row:,.1f}", "4,000", f"{ratio:.4f}", verdict,
                     f"{seconds:.1f}"])
        log(f"{NAME}: {mode}: {per_row:.1f} bytes/row ({ratio:.4f}x dense f32), built in {seconds:.1f}s")
    return figures, rows, measured


class Runs:
    """Student runs through the real stage (`kdcache student`: a results row each)."""

    def __init__(self, workdir: Path, epochs: int):
        self.workdir, self.epochs = workdir, epochs

    def test_accuracy(self, root: Path, model: str, seed: int, **args) -> float:
        from pipeline.students import student_config
        from pipeline.runs import train_student

        width = {} if WIDTHS[model] is None else {"width": WIDTHS[model]}
        cfg = student_config({"cache": root, "model": model, **width,
                                      "epochs": self.epochs, "seed": seed,
                                      "runs_dir": self.workdir / "runs", **args})
        with contextlib.redirect_stdout(io.StringIO()):
            return float(train_student(cfg, progress=False)["test_accuracy"])


def ms(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def accuracy(workdir: Path, seeds: tuple[int, ...], epochs: int) -> tuple[list, list, dict]:
    runs = Runs(workdir, epochs)
    figures, rows, measured = [], [], {}
    for model in WIDTHS:
        arms = {"ce": (build(workdir, "dense")[0], {"loss": "ce"})}
        for mode in ACCURACY_MODES:
            arms[f"kd {mode}"] = (build(workdir, mode)[0], {"loss": "kd"})
        for arm, (root, args) in arms.items():
            t0 = time.perf_counter()
            accs = [runs.test_accuracy(root, model, s, **args) for s in seeds]
            measured[(model, arm)] = accs
            mean, std = ms(accs)
            log(f"{NAME}: {model} {arm}: {mean:.4f} ± {std:.4f} ({time.perf_counter() - t0:.0f}s)")
        dense, ce = ms(measured[(model, "kd dense")])[0], ms(measured[(model, "ce")])[0]
        for arm in arms:
            mean, std = ms(measured[(model, arm)])
            judged = arm in ("kd topk:16", "kd sample:16")
            passed = None if not judged else bool(abs(mean - dense) <= ACCURACY_TOLERANCE and mean > ce)
            rows.append([model, arm, f"{mean:.4f} ± {std:.4f}", f"{mean - dense:+.4f}", f"{mean - ce:+.4f}",
                         len(seeds), "—" if passed is None else ("PASS" if passed else "FAIL")])
            if judged:  # information: what keeping K of C classes costs is the method's, not kdcache's
                figures.append(figure(f"|kd {arm[3:]} − kd dense|, {model} (and above ce)",
                                      round(abs(mean - dense), 4), "",
                                      information="the method's cost (K of C classes kept): no floor",
                                      mean=round(mean, 4), std=round(std, 4), dense=round(dense, 4),
                                      ce=round(ce, 4), above_ce=bool(mean > ce)))
    return figures, rows, measured


ACCURACY_TITLE = "Accuracy on digits3 from dense and sparse logits (test split, 4,000 rows)"
HEAD_TAIL_MODES = ("dense", "topk:16", "sample:16", "topk:16+sample:16")
HEAD_TAIL_TITLE = "An exact head with an unbiased tail (digits3, mlp, kd at T = 4)"
HEAD_TAIL_FIGURE = "kd topk:16+sample:16 − kd dense, mlp"
HEAD_TAIL_NOTE = "An exact head with an unbiased tail, run alone"  # how the --head-and-tail note begins


def head_and_tail(workdir: Path, seeds: tuple[int, ...], epochs: int, measured: dict | None = None,
                  sizes: dict | None = None) -> tuple[list, list, dict]:
    """mlp, kd from dense, topk:16, sample:16 and topk:16+sample:16 (test accuracy over
    ``seeds``, bytes per row on disk): where the tail decides, does the exact head with an
    unbiased tail beat both of its halves? Arms already in ``measured`` (the accuracy table's,
    same runs) are not run again, and a mode in ``sizes`` (the storage table's
    ``{mode: {"bytes_per_row": ...}}``) is not measured again: an arm given both is not built."""
    runs, measured, sizes = Runs(workdir, epochs), dict(measured or {}), dict(sizes or {})
    figures, rows, out, per_rows = [], [], {}, {}
    for mode in HEAD_TAIL_MODES:
        accs = measured.get(("mlp", f"kd {mode}"))
        root = None if accs and mode in sizes else build(workdir, mode)[0]
        accs = accs or [runs.test_accuracy(root, "mlp", s, loss="kd") for s in seeds]
        out[("mlp", f"kd {mode}")] = accs
        mean, std = ms(accs)
        per_row = per_rows[mode] = (sizes[mode]["bytes_per_row"] if mode in sizes else logits_bytes(root)[0])
        rows.append(["mlp", f"kd {mode}", f"{per_row:,.1f}", f"{mean:.4f} ± {std:.4f}", len(accs)])
        log(f"{NAME}: head and tail: mlp kd {mode}: {mean:.4f} ± {std:.4f}, {per_row:.1f} bytes/row")
    both, dense = ms(out[("mlp", "kd topk:16+sample:16")])[0], ms(out[("mlp", "kd dense")])[0]
    figures.append(figure(HEAD_TAIL_FIGURE, round(both - dense, 4), "",
                          information="the estimator's cost: no floor",
                          topk16=round(ms(out[("mlp", "kd topk:16")])[0], 4),
                          sample16=round(ms(out[("mlp", "kd sample:16")])[0], 4),
                          bytes_per_row={m: round(b, 1) for m, b in per_rows.items()}))
    return figures, rows, out


def head_and_tail_table(rows: list[list], reused: str = "") -> dict:
    """The head-and-tail table as run() and ``--head-and-tail`` both write it; ``reused`` says
    which arms came from an earlier run."""
    return table(HEAD_TAIL_TITLE, ["student", "arm", "logits bytes/row on disk", "test accuracy (mean ± std)",
                                   "seeds"], rows,
                 note="topk:16+sample:16: the 16 largest logits exactly with the tail's mass, plus 16 draws "
                      "from the tail at T = 4." + (f" {reused}" if reused else ""))


def head_and_tail_alone(workdir: Path, report_path: Path) -> dict:
    """Run only the topk:16+sample:16 arm of the head-and-tail table, reusing the sparse record
    of ``report_path`` (a full run's benchmarks.json) for dense, topk:16 and sample:16, and
    write the table, its figure and a dated note into that record (other records untouched).
    Returns the updated report; nothing is written unless every run succeeded."""
    report = json.loads(report_path.read_text())
    rec = report.get("benchmarks", {}).get(NAME)
    if rec is None or rec["params"].get("quick"):
        raise SystemExit(f"{report_path} holds no full-run {NAME} record to reuse; run "
                         f"`python -m bench.run --only {NAME}` instead")
    seeds, epochs = tuple(rec["params"]["seeds"]), int(rec["params"]["epochs"])
    accuracy_runs = rec["measured"]["accuracy"]
    reused = {("mlp", f"kd {m}"): accuracy_runs.get(f"mlp / kd {m}") for m in HEAD_TAIL_MODES[:-1]}
    missing = [f"{m} / {a}" for (m, a), v in reused.items() if v is None]
    missing += [m for m in HEAD_TAIL_MODES[:-1] if m not in rec["measured"]["storage"]]
    if missing:
        raise SystemExit(f"the {NAME} record of {report_path} lacks {', '.join(missing)}; run "
                         f"`python -m bench.run --only {NAME}` instead")
    started, t0 = machine(), time.perf_counter()
    log(f"{NAME}: head and tail alone: seeds {list(seeds)}, {epochs} epochs; dense, topk:16 and sample:16 "
        f"from the run finished {rec.get('finished', '?')}")
    figures, rows, out = head_and_tail(workdir, seeds, epochs, reused, rec["measured"]["storage"])
    seconds = time.perf_counter() - t0
    finished = time.strftime("%Y-%m-%d %H:%M:%S")
    when = (f"dense, topk:16 and sample:16: the accuracy table's runs and the storage table's bytes of the "
            f"full run finished {rec.get('finished', '?')} (same seeds {', '.join(map(str, seeds))}, "
            f"{epochs} epochs, student, optimiser and teacher recipe); topk:16+sample:16 run alone on "
            f"{finished} (`python -m bench.sparse --head-and-tail`, commit {started['git_commit'][:7]}), its "
            f"cache built with digits3's default teacher, trained in the work dir as the full run trains it.")
    tables = [t for t in rec["tables"] if t["title"] != HEAD_TAIL_TITLE]
    at = next(i for i, t in enumerate(tables) if t["title"] == ACCURACY_TITLE) + 1
    rec["tables"] = tables[:at] + [head_and_tail_table(rows, when)] + tables[at:]
    kept = [f for f in rec["figures"] if f["name"] != HEAD_TAIL_FIGURE]
    at = max(i for i, f in enumerate(kept) if f["name"].startswith("|kd ")) + 1  # after the accuracy figures
    rec["figures"] = kept[:at] + figures + kept[at:]
    mean = {m: ms(out[("mlp", f"kd {m}")]) for m in HEAD_TAIL_MODES}
    rec["notes"] = [n for n in rec["notes"] if not n.startswith(HEAD_TAIL_NOTE)] + [
        f"{HEAD_TAIL_NOTE} ({finished}, {seconds:.0f} s; information, not a floor): mlp kd from "
        + ", ".join(f"{m} {a:.4f} ± {sd:.4f}" for m, (a, sd) in mean.items())
        + ". Dense, topk:16 and sample:16 are the full run's (see the table's note)."]
    accuracy_runs.update({f"{m} / {a}": v for (m, a), v in out.items() if (m, a) not in reused})
    report["machine"], report["ran"] = started, [f"{NAME} (--head-and-tail only)"]
    report["seconds_this_run"] = round(seconds, 1)
    tmp = report_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, report_path)
    log(f"wrote the {NAME} record's head-and-tail table to {report_path}")
    return report


def main_head_and_tail(argv: list[str]) -> int:
    """``python -m bench.sparse --head-and-tail [--workdir DIR]``: head_and_tail_alone on
    docs/benchmarks.json, then docs/BENCHMARKS.md re-rendered (``bench.run --render-only``)."""
    p = argparse.ArgumentParser(prog="python -m bench.sparse --head-and-tail")
    p.add_argument("--head-and-tail", action="store_true", required=True,
                   help="run only the topk:16+sample:16 arm; reuse docs/benchmarks.json for the others")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    a = p.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    set_threads()
    head_and_tail_alone(a.workdir, REPO / "docs" / "benchmarks.json")
    # a child, so that this module never imports the suite's runner (which imports every benchmark)
    return subprocess.call([sys.executable, "-m", "bench.run", "--render-only"], cwd=REPO)


def budget(workdir: Path, seeds: tuple[int, ...], epochs: int, dense_bytes: float,
           measured: dict) -> tuple[list, dict]:
    """kd from many sparse views against one dense view, at no more bytes per row."""
    runs = Runs(workdir, epochs)
    roots = {mode: build(workdir, mode, BUDGET_VIEWS)[0] for mode in ("topk:16", "sample:16")}
    sizes = {mode: logits_bytes(root)[0] for mode, root in roots.items()}
    rows, out = [], {}
    for model in WIDTHS:
        arms = {"ce+augment shift:1 (no teacher)": ([runs.test_accuracy(build(workdir, "dense")[0], model, s,
                                                                        loss="ce", augment=POLICY)
                                                     for s in seeds], None)}
        for mode, root in roots.items():
            arms[f"kd {mode} × {BUDGET_VIEWS} views"] = (
                [runs.test_accuracy(root, model, s, loss="kd") for s in seeds], sizes[mode])
        arms["kd dense × 1 view"] = (measured[(model, "kd dense")], dense_bytes)
        for arm, (accs, size) in arms.items():
            mean, std = ms(accs)
            out[(model, arm)] = accs
            log(f"{NAME}: {model} {arm}: {mean:.4f} ± {std:.4f}")
            rows.append([model, arm, "—" if size is None else f"{size:,.0f}", f"{mean:.4f} ± {std:.4f}",
                         len(accs)])
    return rows, out


def epoch_time(workdir: Path, epochs: int, repeats: int) -> tuple[dict, dict]:
    from pipeline.cache import open_cache
    from pipeline.students import student_config
    from pipeline.runs import resolve_run
    from pipeline.students import StudentData, create_student

    per_epoch: dict[str, list[float]] = {}

    def arm(mode: str):
        root = build(workdir, mode)[0]

        def run() -> float:
            t0 = time.perf_counter()
            cache = open_cache(root)
            cfg, _ = resolve_run(student_config({"cache": root, "model": "mlp", "loss": "kd",
                                                         "epochs": epochs, "seed": 0,
                                                         "runs_dir": workdir / "runs"}), cache)
            clocked(create_student("mlp", cfg), per_epoch, mode).fit_cache(StudentData(cache))
            return time.perf_counter() - t0
        return run

    arms = {mode: arm(mode) for mode in ("dense", "topk:16", "sample:16")}
    for run in arms.values():  # warm-up: one untimed run of every arm
        run()
    per_epoch.clear()
    alternate(arms, repeats, label=f"{NAME} epoch time", warmup=False)
    return {mode: median(v) for mode, v in per_epoch.items()}, per_epoch


def paper(measured: dict) -> tuple[list[list], str]:
    """Bytes at scale from the measured bytes per row and view (digits3, C = 1,000), scaled by
    how each mode's elements grow with C: dense C values, topk K ids + K values + 1 tail, sample
    K ids (ids of 2 bytes up to 65,536 classes, 4 beyond)."""
    overhead = {mode: measured[mode]["bytes_per_row"] / raw_bytes(mode, 1000)
                for mode in ("dense", "topk:16", "sample:16")}  # metadata, shard indexes, CRCs
    cases = [("ImageNet-1k, 32 views", 1_281_167 * 32, 1000),
             ("ImageNet-21k (winter 2021), 1 view", 13_153_500, 21_841),
             ("ImageNet-21k, 90 epochs of views (TinyViT)", 13_153_500 * 90, 21_841),
             ("LLM, 128k vocabulary, 10¹² tokens", 10**12, 128_000)]
    rows = []
    for name, outputs, classes in cases:
        row = [name, f"{outputs:,}", f"{classes:,}"]
        for mode in ("dense", "topk:16", "sample:16"):
            row.append(_human(outputs * raw_bytes(mode, classes) * overhead[mode]))
        rows.append(row)
    note = ("Per teacher output (a row and view): dense float16 2·C bytes; topk:16 16 ids + 16 "
            "float16 logits + two float32 tail numbers; sample:16 16 ids. Scaled from the measured "
            "bytes per row on digits3, so metadata and shard indexes are counted at their measured "
            f"share (dense ×{overhead['dense']:.3f}, topk:16 ×{overhead['topk:16']:.3f}, sample:16 "
            f"×{overhead['sample:16']:.3f} of the raw elements). Build time is the teacher's N × V "
            "forwards in every mode plus writing these bytes: on digits3 (32,000 rows, teacher "
            f"timing included) dense took {measured['dense']['build_s']:.1f} s, topk:16 "
            f"{measured['topk:16']['build_s']:.1f} s, sample:16 {measured['sample:16']['build_s']:.1f} s.")
    return rows, note


def _human(n: float) -> str:
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def run(quick: bool, workdir: Path) -> dict:
    t_start = time.perf_counter()
    seeds = (0,) if quick else (0, 1, 2)
    epochs = 4 if quick else 20
    figures, notes = [], []
    storage_figures, storage_rows, sizes = storage(workdir)
    figures += storage_figures
    tables = [table("Logits bytes per row on disk (digits3, C = 1,000; float16 values)",
                    ["logits", "raw bytes/row", "on disk bytes/row", "dense f32 bytes/row",
                     "ratio (topk:16, sample:16: floor ≤ 0.05)", "verdict", "build s (32,000 rows)"],
                    storage_rows,
                    note="on disk = every file of the logits arrays (chunks, shard indexes, CRCs, "
                         "zarr.json) over the three splits, divided by their rows. Build time includes "
                         "timing the teacher once (its latency, recorded in the manifest).")]
    acc_figures, acc_rows, measured = accuracy(workdir, seeds, epochs)
    figures += acc_figures
    tables.append(table(ACCURACY_TITLE,
                        ["student", "arm", "test accuracy (mean ± std)", "vs kd dense", "vs ce", "seeds",
                         "floor (within 0.01 of dense, above ce)"], acc_rows,
                        note=f"{epochs} epochs, batch 128, AdamW one-cycle, T = 4, alpha 0.9; mlp at its "
                             "default width (40k params with the 1,000-way head), cnn_small at width 8 "
                             "(39k params)."))
    ht_figures, ht_rows, ht_measured = head_and_tail(workdir, seeds, epochs, measured, sizes)
    figures += ht_figures
    measured.update(ht_measured)
    tables.append(head_and_tail_table(ht_rows))
    budget_rows, budget_measured = budget(workdir, seeds, epochs, sizes["dense"]["bytes_per_row"], measured)
    tables.append(table("Views × sparse at a fixed byte budget (≤ one dense float16 view per row)",
                        ["student", "arm", "logits bytes/row on disk", "test accuracy (mean ± std)", "seeds"],
                        budget_rows,
                        note=f"train rows hold {BUDGET_VIEWS} views (augment={POLICY}) in the sparse arms; "
                             "val and test one. Bytes per row over all three splits."))
    times, per_epoch = epoch_time(workdir, 2 if quick else 3, 2 if quick else 5)
    for mode in ("topk:16", "sample:16"):
        ratio = times[mode] / times["dense"]
        figures.append(figure(f"mlp kd epoch time, {mode} / dense", round(ratio, 3), "x", floor=TIME_FLOOR,
                              op="<=", sparse_s=round(times[mode], 3), dense_s=round(times["dense"], 3)))
    tables.append(table("Student epoch time (mlp, kd; median of alternated repeats)",
                        ["logits", "seconds per epoch", "/ dense"],
                        [[mode, f"{t:.3f}", f"{t / times['dense']:.3f}"] for mode, t in times.items()]))
    paper_rows, paper_note = paper(sizes)
    tables.append(table("On paper: logits bytes at scale", ["workload", "teacher outputs", "classes",
                                                             "dense float16", "topk:16", "sample:16"],
                        paper_rows, note=paper_note))
    return result(NAME, "sparse logits: bytes, accuracy and epoch time on digits3", figures, tables, notes,
                  {"quick": quick, "seeds": list(seeds), "epochs": epochs},
                  time.perf_counter() - t_start) | {
        "measured": {"storage": sizes, "accuracy": {f"{m} / {a}": v for (m, a), v in measured.items()},
                     "budget": {f"{m} / {a}": v for (m, a), v in budget_measured.items()},
                     "epoch_seconds": per_epoch}}


if __name__ == "__main__":
    if "--head-and-tail" in sys.argv[1:]:
        sys.exit(main_head_and_tail(sys.argv[1:]))
    main_for(run)
