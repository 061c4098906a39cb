"""KD from the cache vs plain training, and vs online KD (the teacher run at every step).

Measured, per student (cnn_small and mlp, kdcache's torch students), wall seconds per epoch:
    kd (cache)   the path of ``kdcache student loss=kd``: ``TorchStudent.fit_cache``
                 streams the train split's cached logits from the cache (block-shuffled chunks)
                 and joins each chunk's inputs by sample_id.
    ce (cache)   the same with loss=ce (labels only; the same stream, the same loop).
    online kd    the same student, loss, batch size, optimiser, schedule and training loop
                 (``TorchStudent._fit_batches`` → ``pipeline.training.fit``) fed in-memory batches
                 whose teacher logits come from a forward pass of the teacher (resnet18, the
                 very weights the cache holds) at every step, as frameworks without a cache do.
                 Its inputs are held in memory: the online arm's best case.
    teacher fwd  the teacher's inference forward over one epoch of train inputs at the
                 student's batch size: what the online arm adds to every epoch.
    ce (memory)  context: the same student and loop, loss=ce, on in-memory arrays
                 (``training.array_batches``); no cache involved.

An epoch's time is measured from the call that starts its batches to the call that starts the
next epoch's (or the end of training), so it includes the validation pass every epoch runs and
excludes one-off set-up (opening the cache and the dataset, building the network); the set-up
is reported separately as ``fit_seconds`` minus the epochs. Figures are medians over every
epoch of every repeat; all arms of a student are alternated within each repeat.

Floors:
    kd/ce epoch time ≤ 1.15 — distilling from the cache should cost about what training on
        labels costs: the teacher's work was paid once, in stage one.
    speedup / ideal ≥ 0.8, with speedup = t_online / t_kd(cache) and
        ideal = (t_teacher_fwd + t_ce(cache)) / t_ce(cache): the cache should remove (almost)
        all of the teacher's forward pass from every epoch.

The data is synthetic (3x32x32, 10 classes) written once to an ``.npz``, so inputs are an
in-memory gather as with real npz / torchvision / digits data (the ``synthetic:`` source would
instead regenerate each row's noise on every read, a cost of the generator, not of the cache).
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import numpy as np

from bench.common import (EpochClock, alternate, ensure_cache, figure, log, main_for,
                          median, result, synthetic_npz, table)

NAME = "kd_training"
KD_CE_FLOOR = 1.15
SPEEDUP_FLOOR = 0.8


def run(quick: bool, workdir: Path) -> dict:
    import torch

    from pipeline import training
    from pipeline.cache import open_cache
    from pipeline.students import student_config
    from pipeline.runs import resolve_run
    from pipeline.students import StudentData, create_student
    from pipeline.students.data import joined_inputs
    from pipeline.students.networks import _with_soft_targets as with_soft_targets
    from pipeline.teachers import TeacherSpec, build_teacher, state_fingerprint

    t_start = time.perf_counter()
    n = 2_000 if quick else 8_000
    epochs = 2 if quick else 3
    repeats = 2 if quick else 3
    students = ("cnn_small", "mlp")
    npz = synthetic_npz(workdir, f"synthetic:{n}:3x32x32:10")
    root = ensure_cache({"dataset": f"npz:{npz}", "teacher": "resnet18", "teacher_ckpt": "random",
                         "cache": workdir / "caches" / f"kd-resnet18-{n}"})
    cache = open_cache(root)
    dataset = cache.open_dataset()
    X = {s: joined_inputs(dataset, cache, s) for s in ("train", "val")}
    y = {s: cache.labels(s) for s in ("train", "val")}
    n_train = len(y["train"])
    man = cache.manifest["teacher"]
    teacher = build_teacher(TeacherSpec(man["arch"], tuple(man["input_shape"]), man["num_classes"],
                                        "random", man["seed"]))
    assert state_fingerprint(teacher, man["arch"], man["input_shape"], man["num_classes"]) == \
        cache.teacher_fingerprint, "online teacher must be the cached teacher"

    def cfg(model: str, loss: str):
        return student_config({"cache": root, "model": model, "loss": loss, "epochs": epochs,
                                       "runs_dir": workdir / "runs", "seed": 0})

    def student(model: str, loss: str):
        # exactly the student pipeline.runs.train_student builds
        return create_student(model, resolve_run(cfg(model, loss), cache)[0])

    bs = cfg("mlp", "kd").param("batch_size")
    per_epoch: dict[str, list[float]] = {}
    setup: dict[str, list[float]] = {}

    def clocked(s, key: str, t0: float):
        """Make ``s._fit_batches`` stamp its epochs; record them (and the set-up) under ``key``."""
        inner = s._fit_batches

        def fit_batches(batches, *a, **kw):
            clock = EpochClock(batches)
            out = inner(clock, *a, **kw)
            end = time.perf_counter()
            per_epoch.setdefault(key, []).extend(clock.epochs(end))
            setup.setdefault(key, []).append(clock.starts[0] - t0)
            return out
        s._fit_batches = fit_batches
        return s

    def cached(model: str, loss: str):
        key = f"{loss}_cache"

        def arm() -> float:
            # pipeline.runs.train_student's fit step, with a clocked student
            t0 = time.perf_counter()
            c = cfg(model, loss)
            ch = open_cache(c.cache)
            s = clocked(student(model, loss), key, t0)
            with contextlib.redirect_stdout(io.StringIO()):
                s.fit_cache(StudentData(ch))
            return time.perf_counter() - t0
        return arm

    def online(model: str):
        def batches(epoch: int):
            order = np.random.default_rng([0, epoch]).permutation(n_train)
            for a in range(0, n_train, bs):
                rows = order[a:a + bs]
                xb = X["train"][rows]
                with torch.inference_mode():  # the teacher, at every step
                    z_t = teacher(torch.from_numpy(xb)).numpy()
                yield xb, y["train"][rows], {"z_t": z_t}

        def arm() -> float:
            t0 = time.perf_counter()
            clocked(student(model, "kd"), "online_kd", t0)._fit_batches(
                with_soft_targets(batches, cache.temperature, False), -(-n_train // bs), X["val"], y["val"],
                cache.num_classes, None, None, cache.temperature)
            return time.perf_counter() - t0
        return arm

    def ce_memory(model: str):
        def arm() -> float:
            t0 = time.perf_counter()
            clocked(student(model, "ce"), "ce_memory", t0)._fit_batches(
                training.array_batches(X["train"], y["train"], bs, 0), -(-n_train // bs),
                X["val"], y["val"], cache.num_classes, None, None, None)
            return time.perf_counter() - t0
        return arm

    def teacher_fwd() -> float:
        order = np.random.default_rng(0).permutation(n_train)
        with torch.inference_mode():
            t0 = time.perf_counter()
            for a in range(0, n_train, bs):
                teacher(torch.from_numpy(X["train"][order[a:a + bs]]))
            seconds = time.perf_counter() - t0
        per_epoch.setdefault("teacher_fwd", []).append(seconds)
        return seconds

    with torch.inference_mode():
        teacher(torch.from_numpy(X["train"][:bs]))  # warm-up
    measured, figures, rows = [], [], []
    for model in students:
        log(f"{NAME}: student {model}, {n_train:,} train rows, {epochs} epochs x {repeats} repeats, batch {bs}")
        arms = {"kd_cache": cached(model, "kd"), "ce_cache": cached(model, "ce"),
                "online_kd": online(model), "teacher_fwd": teacher_fwd, "ce_memory": ce_memory(model)}
        for arm in arms.values():  # warm-up: one untimed run of every arm
            arm()
        per_epoch.clear()
        setup.clear()
        alternate(arms, repeats, label=model, warmup=False)
        t = {k: median(v) for k, v in per_epoch.items()}
        kd_ce = t["kd_cache"] / t["ce_cache"]
        speedup = t["online_kd"] / t["kd_cache"]
        ideal = (t["teacher_fwd"] + t["ce_cache"]) / t["ce_cache"]
        kd_mem = t["kd_cache"] / t["ce_memory"]
        measured.append({"student": model, "epoch_s": t, "kd_ce": kd_ce, "speedup": speedup,
                         "ideal": ideal, "kd_cache_over_ce_memory": kd_mem,
                         "epoch_seconds": {k: [round(x, 4) for x in v] for k, v in per_epoch.items()},
                         "setup_seconds": {k: [round(x, 4) for x in v] for k, v in setup.items()}})
        figures.append(figure(f"kd/ce epoch time, {model}", round(kd_ce, 3), "x",
                              floor=KD_CE_FLOOR, op="<=", kd_epoch_s=round(t["kd_cache"], 4),
                              ce_epoch_s=round(t["ce_cache"], 4)))
        figures.append(figure(f"online-KD speedup / ideal, {model}", round(speedup / ideal, 3), "x",
                              floor=SPEEDUP_FLOOR, op=">=", speedup=round(speedup, 3),
                              ideal=round(ideal, 3), online_epoch_s=round(t["online_kd"], 4),
                              teacher_fwd_epoch_s=round(t["teacher_fwd"], 4)))
        figures.append(figure(f"kd(cache) / ce(in-memory) epoch time, {model}", round(kd_mem, 3), "x",
                              ce_memory_epoch_s=round(t["ce_memory"], 4)))
        rows.append([model, f"{t['kd_cache']:.3f}", f"{t['ce_cache']:.3f}", f"{kd_ce:.3f}",
                     "PASS" if kd_ce <= KD_CE_FLOOR else "FAIL",
                     f"{t['online_kd']:.3f}", f"{t['teacher_fwd']:.3f}", f"{speedup:.2f}",
                     f"{ideal:.2f}", f"{speedup / ideal:.3f}",
                     "PASS" if speedup / ideal >= SPEEDUP_FLOOR else "FAIL",
                     f"{t['ce_memory']:.3f}", f"{kd_mem:.2f}",
                     f"{median(setup['kd_cache']):.2f}"])
    tables = [table("Seconds per epoch: KD from the cache, CE, and online KD",
                    ["student", "kd (cache)", "ce (cache)", "kd/ce (≤ 1.15)", "verdict",
                     "online kd", "teacher fwd", "speedup", "ideal", "speedup/ideal (≥ 0.8)",
                     "verdict", "ce (in-memory)", "kd(cache)/ce(memory)", "kd set-up s"], rows,
                    note=f"resnet18 teacher (random weights), {n_train:,} train rows of 3x32x32 "
                         f"(npz), batch {bs}, {epochs} epochs per run, median over "
                         f"{epochs} epochs x {repeats} alternated repeats; an epoch includes its "
                         "validation pass. 'kd set-up' = opening cache and dataset, joining "
                         "val inputs, building the network (once per run, not per epoch).")]
    notes = ["Online KD holds its inputs in memory and runs the plain teacher under "
             "torch.inference_mode at every step; everything else (student, loss, optimiser, "
             "schedule, validation) is the code path of `kdcache student`."]
    return result(NAME, "KD from cache vs CE and vs online KD", figures, tables, notes,
                  {"quick": quick, "rows": n, "train_rows": n_train, "epochs": epochs,
                   "repeats": repeats, "batch_size": bs, "students": list(students)},
                  time.perf_counter() - t_start) | {"measured": measured}


if __name__ == "__main__":
    main_for(run)
