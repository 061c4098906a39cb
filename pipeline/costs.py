"""Teacher and students timed side by side, when a comparison is printed.

A ratio of two latencies means something only if both were measured under the same load: a
teacher timed at build time while another job held the cores, and a student timed an hour
later on an idle machine, give a "3,639× faster" that says more about the machine than the
models. So every "× faster" kdcache prints comes from here: the teacher and each student
loaded in this process, on the same threads, on the same rows, timed in alternation
(teacher, student 1, student 2, ..., then again), each figure the median of its rounds. The
latencies recorded when a cache was built or a run finished stay as context.

Timing does not depend on the values of the rows (no model here branches on its input), so
the rows are seeded noise of the teacher's input shape: the comparison needs neither the
dataset nor the cache's inputs. Text is the exception: a document's cost grows with its
length, so a text cache's teacher and students are timed on the first ``ROWS`` training
documents, as ``str`` (a numpy object array): every ``predict`` of a text cache takes raw
text, the teacher's tokenization and each student's own text processing included in its time.
A token cache's teacher and language-model students are timed on windows of its test ids, per
window at 1 and 8 windows per call (``teacher_b8_ms`` / ``student_b8_ms`` in place of b256).
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import numpy as np

from pipeline.cache import TeacherCache
from pipeline.errors import KdError, first_line
from pipeline.cache import format as fmt
from pipeline.latency import BATCH_SIZES, WINDOW_BATCHES, per_sample_ms, torch_predict

ROUNDS = 3  # alternations: each model's figure is the median of this many measurements
ROWS = 256


def side_by_side(predicts: dict[Any, Callable[[np.ndarray], object]], rows: np.ndarray,
                 rounds: int = ROUNDS, batch_sizes: tuple[int, ...] = BATCH_SIZES) -> dict[Any, dict[str, float]]:
    """``{key: {"b1_ms", "b256_ms"}}`` (one ``b{size}_ms`` per batch size): each ``predict``
    timed per sample (:func:`pipeline.latency.per_sample_ms`), the models alternated
    ``rounds`` times, each figure the median over the rounds."""
    times: dict[Any, list[dict]] = {key: [] for key in predicts}
    for _ in range(rounds):
        for key, predict in predicts.items():
            times[key].append(per_sample_ms(predict, rows, batch_sizes))
    return {key: {f"b{size}_ms": statistics.median(t[f"batch_{size}_ms"] for t in ts) for size in batch_sizes}
            for key, ts in times.items()}


def load_teacher(cache: TeacherCache):
    """The cache's teacher on the CPU, from the weights its manifest names (their fingerprint
    checked), as ``predict(batch)``; or the reason it cannot be loaded here, as text."""
    from pipeline.teachers import TeacherSpec, build_teacher

    from pipeline.hf import HfTeacher
    from pipeline.hf_lm import HfCausalLM

    spec = TeacherSpec.of_record(cache.manifest["teacher"])
    try:
        model = build_teacher(spec)
        return model.predict if isinstance(model, (HfTeacher, HfCausalLM)) else torch_predict(model)
    except KdError as exc:
        return f"the teacher cannot be loaded here: {first_line(exc, 160)}"


def compare(cache: TeacherCache, students: dict[Any, Callable[[np.ndarray], object]],
            seed: int = 0) -> dict[Any, dict[str, float] | str]:
    """Each student against the cache's teacher, timed side by side: ``{key: {"teacher_b1_ms",
    "teacher_b256_ms", "student_b1_ms", "student_b256_ms"}}``, or for every key the reason the
    teacher could not be timed (text). The teacher is timed once per round, beside all the
    students, so every ratio shares the teacher's figure."""
    teacher = load_teacher(cache)
    if isinstance(teacher, str):
        return {key: teacher for key in students}
    if fmt.is_token_cache(cache.manifest):  # windows of real test ids, timed per window at 1 and 8
        rows = cache.stored(fmt.tokens_key("test", "ids"), 0, min(WINDOW_BATCHES[-1], cache.num_rows("test")))
        timed = side_by_side({"__teacher__": teacher, **students}, rows.astype(np.int64),
                             batch_sizes=WINDOW_BATCHES)
        t = timed.pop("__teacher__")
        seq_len = int(cache.lm["seq_len"])  # per window: tokens/s = seq_len · 1000 / ms
        return {key: {**{f"teacher_{k}": v for k, v in t.items()}, **{f"student_{k}": v for k, v in s.items()},
                      "seq_len": seq_len} for key, s in timed.items()}
    if "tokenizer" in cache.manifest:  # a text cache: real documents, whose length is their cost
        try:
            texts = cache.open_dataset().texts("train")
        except KdError as exc:
            return {key: f"the documents cannot be read here: {first_line(exc, 160)}" for key in students}
        rows = texts[:ROWS]
    else:
        shape = tuple(cache.manifest["teacher"]["input_shape"])
        rows = np.random.default_rng(seed).standard_normal((ROWS, *shape)).astype(np.float32)
    timed = side_by_side({"__teacher__": teacher, **students}, rows)
    t = timed.pop("__teacher__")
    return {key: {"teacher_b1_ms": t["b1_ms"], "teacher_b256_ms": t["b256_ms"],
                  "student_b1_ms": s["b1_ms"], "student_b256_ms": s["b256_ms"]}
            for key, s in timed.items()}
