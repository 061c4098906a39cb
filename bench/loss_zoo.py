"""Loss zoo: every registered loss, trained from a cache, against CE and KD.

Students and data: digits (scikit-learn's 8×8 digits; teacher cnn_small as `make teacher-cache`
trains it) with the cnn_small student, and MNIST-1D (the views benchmark's dataset and cnn1d
teacher) with the cnn1d and mlp (width 128) students. Every arm is the same student, optimiser,
schedule, batch size (64) and epochs (digits 60, MNIST-1D 100); losses run with their declared
defaults (the papers' weights, except pkt, sp and at, whose docstrings say why), temperature
losses at the cache's temperature 4, `kd+Z` is KD
with logit standardisation. Feature losses read the cache's pooled penultimate features
(`embed`, 128-d) and the student's `embed`; `at` reads an unpooled cache of the teacher's last
conv block (digits: `block3.2`, [128, 4, 4]; MNIST-1D: `act3`, [128, 40]) and the student's
layer of that name (the mlp has no maps: no `at` arm).

Accuracy: `kdcache student` runs (the real path: a row in the results table each), test split,
mean ± sample std over seeds 0, 1, 2. Information, no floor: whether a method beats CE on these
small datasets is the method's property, and at 3 seeds the spread between seeds (std up to
0.02) is larger than the 0.01 margin a floor of "≥ CE − 0.01" allowed; that kdcache computes
each loss right is held by tests/test_loss_zoo.py (every loss equal to its reference in value
and gradient).

Step time: one optimisation step as training takes it (`pipeline.training.train_step`: the batch
to tensors, forward, loss, backward, fused AdamW), batch 64, on in-memory cached targets as the
data path hands them over (soft targets computed once per shuffle buffer, outside the step).
Floor: each loss's step ≤ 1.1× the step of the same loss in its reference implementation
(bench/reference_losses.py: the formulas of RepDistiller, mdistiller and the papers' code, plain
torch graphs, the teacher's softmax computed inside the loss from the raw cached logits as those
repositories do): the same student (same initial weights), batches and optimiser, the two steps
back to back in a random order within every cycle, the cycles' arms interleaved one by one; the
median over cycles of the two steps' ratio. ce against the very same F.cross_entropy step
measures the timing's noise (no floor).

Steps are timed in CPU time of the process, wall time shown for context: on this shared VM a
1-5 ms step's wall time measured the scheduler (at load 15 on 2 cores, ce against itself read
0.78-1.29x in wall time, 0.94-0.95x in CPU time); with OMP_WAIT_POLICY=PASSIVE no thread spins,
so CPU time is the work done.

What a method costs over CE (rkd's angle term compares every triplet of the batch: B³·D
multiply-adds; crd trains two projection heads and contrasts with 512 remembered rows) is the
method's price, not kdcache's: each step / CE is shown as information.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import base_dirs, digits_cache, ensure_cache, figure, log, main_for, median, result, table

NAME = "loss_zoo"
STEP_FLOOR = 1.1  # each loss's step / the same loss's step in its reference implementation
BATCH = 64
REF = "ref "  # prefix of a reference arm's name in the timings


def arms() -> list[tuple[str, dict]]:
    """(arm name, StudentConfig overrides): every registered loss, and KD with standardisation."""
    from pipeline.losses import classification_losses

    out = [(name, {"loss": name}) for name in ["ce", "kd"] + sorted(set(classification_losses()) - {"ce", "kd"})]
    out.insert(2, ("kd+Z", {"loss": "kd", "standardize_logits": True}))
    return out


class Setting:
    """One dataset and student: its caches (pooled features; a map for map losses)."""

    def __init__(self, workdir: Path, dataset: str, model: str, width: int, epochs: int,
                 pooled: Path, maps: Path | None):
        self.workdir, self.dataset, self.model, self.width, self.epochs = workdir, dataset, model, width, epochs
        self.pooled, self.maps = pooled, maps

    def cache_for(self, overrides: dict) -> Path | None:
        from pipeline.losses import LOSSES

        return self.maps if LOSSES.declared(overrides["loss"]).maps else self.pooled

    def cfg(self, overrides: dict, seed: int, **extra):
        from pipeline.config import StudentConfig
        from pipeline.settings import resolve

        return resolve(StudentConfig, {"cache": self.cache_for(overrides), "model": self.model,
                                       "width": self.width, "epochs": self.epochs, "seed": seed,
                                       "batch_size": BATCH, "runs_dir": self.workdir / "runs",
                                       **overrides, **extra})

    def accuracy(self, overrides: dict, seed: int) -> float:
        from pipeline.runs import train_student

        with contextlib.redirect_stdout(io.StringIO()):
            return train_student(self.cfg(overrides, seed), progress=False)["test_accuracy"]

    def step_arm(self, overrides: dict, reference: bool = False):
        """A callable taking one training step of this arm (cycling through a fixed set of
        batches) and returning its seconds: (CPU time of the process, wall time).

        With ``reference``, the same student (same initial weights, head included), batches
        and optimiser, but the loss is
        bench/reference_losses.py's, fed as the reference code is: the raw teacher logits, the
        teacher features, and for crd the batch's row indices (its memory's way of leaving a
        batch's own rows out)."""
        from pipeline import training
        from pipeline.cache import open_cache
        from pipeline.losses import LOSSES, soft_targets
        from pipeline.runs import resolve_run
        from pipeline.students import StudentData, create_student
        from pipeline.students.data import joined_inputs

        cache = open_cache(self.cache_for(overrides))
        cfg, _ = resolve_run(self.cfg(overrides, 0), cache)
        needs = LOSSES.declared(cfg.loss)
        data = StudentData(cache, cfg.layer)
        x = joined_inputs(data.dataset, cache, "train")
        y = cache.labels("train")
        z_t = cache.raw_logits("train")
        f_t = cache.features("train", data.layer).reshape(len(y), *data.feature_shape) if needs.features else None
        order = np.random.default_rng(0).permutation(len(y))
        batches = [order[a:a + BATCH] for a in range(0, len(order) - BATCH + 1, BATCH)]
        student = create_student(cfg.model, cfg)
        objective = student._build(tuple(x.shape[1:]), cache.num_classes,
                                   data.feature_shape if needs.features else None,
                                   data.layer if needs.features else None, cfg.temperature)
        model = student.model_.to(student.device_).train()
        opt = training.optimizer(model, cfg.lr, cfg.weight_decay)
        if reference:
            objective = reference_objective(student, cfg.loss)
        # each batch's targets as the data path hands them over (it computes soft targets once
        # per shuffle buffer, outside the step; the reference code computes them in its loss)
        prepared = []
        for rows in batches:
            targets = {}
            if needs.logits:
                targets["z_t"] = z_t[rows]
                if needs.temperature and not reference:
                    targets.update(soft_targets(targets["z_t"], cfg.temperature, cfg.standardize_logits))
            if needs.features:
                targets["f_t"] = f_t[rows]
            if reference and needs.head is not None:
                targets["idx"] = rows
            prepared.append((x[rows], y[rows], targets))
        position = [0]

        def step() -> tuple[float, float]:
            xb, yb, targets = prepared[position[0] % len(prepared)]
            position[0] += 1
            wall, cpu = time.perf_counter(), time.process_time()
            training.train_step(model, opt, xb, yb, targets, objective, student.device_)
            return time.process_time() - cpu, time.perf_counter() - wall

        return step


def reference_objective(student, loss: str):
    """The training objective of ``student`` (built by ``_build``) with its loss replaced by
    the reference implementation's, called with the same settings."""
    from bench import reference_losses

    ref = reference_losses.REFERENCES[loss]
    head = student.model_.head
    memory = reference_losses.Memory() if loss == "crd" else None

    def objective(out, labels, targets):
        z_s, hint = out
        return ref(z_s, labels, hint=hint, head=head, memory=memory, T=student.temperature_,
                   alpha=student.alpha, weight=student.loss_weight_, standardize=student.standardize_logits,
                   dkd_alpha=student.dkd_alpha, dkd_beta=student.dkd_beta, **targets)

    return objective


def interleaved(steps: dict, cycles: int, seed: int = 0) -> dict[str, list]:
    """What every step of each arm returned (its seconds), ``cycles`` per arm, after a warm-up
    of ten steps each; with NumPy's BLAS on one thread, as ``pipeline.training.fit`` runs it.

    Steps are interleaved one by one, in a fresh random order every cycle (so that no arm
    always follows the same one: a heavy step leaves the thread pool awake, which speeds the
    next). An arm ``REF + name`` is paired with arm ``name``: the pair's two steps run back to
    back, in a random order, so that a burst of load from another process hits both alike
    (their ratio is taken cycle by cycle, :func:`paired_ratio`)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        return _interleaved(steps, cycles, seed)


def _interleaved(steps: dict, cycles: int, seed: int) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    groups = [[n] + ([REF + n] if REF + n in steps else []) for n in steps if not n.startswith(REF)]
    for name in steps:
        for _ in range(10):
            steps[name]()
    times: dict[str, list] = {n: [] for n in steps}
    for _ in range(cycles):
        for g in rng.permutation(len(groups)):
            for i in rng.permutation(len(groups[g])):
                name = groups[g][i]
                times[name].append(steps[name]())
    return times


def paired_ratio(times: dict[str, list[float]], arm: str) -> float:
    """Median over cycles of the arm's step time over its reference's in the same cycle."""
    return median([a / b for a, b in zip(times[arm], times[REF + arm])])


def settings(workdir: Path, quick: bool) -> list[Setting]:
    from bench.views import mnist1d_npz

    digits = digits_cache(workdir)
    digits_maps = ensure_cache({"dataset": "digits", "layers": "block3.2", "pool": "false",
                                "cache": workdir / "caches" / "zoo-digits-block3.2", **base_dirs(workdir)})
    spec = f"npz:{mnist1d_npz(workdir)}"
    teacher = {"dataset": spec, "teacher": "cnn1d", "teacher_augment": "shift:3",
               "epochs": 20 if quick else 60, **base_dirs(workdir)}
    # the views benchmark's single-view cache (same teacher), and a map of its last conv block
    mnist = ensure_cache({**teacher, "cache": workdir / "caches" / "views-mnist1d-1"})
    mnist_maps = ensure_cache({**teacher, "layers": "act3", "pool": "false",
                               "cache": workdir / "caches" / "zoo-mnist1d-act3"})
    return [Setting(workdir, "digits", "cnn_small", 0, 15 if quick else 60, digits, digits_maps),
            Setting(workdir, "MNIST-1D", "cnn1d", 0, 20 if quick else 100, mnist, mnist_maps),
            Setting(workdir, "MNIST-1D", "mlp", 128, 20 if quick else 100, mnist, None)]


def label_figures(label: str, names: list[str], t: dict[str, float], ratios: dict[str, float],
                  accuracy: dict[str, list[float]]) -> list[dict]:
    """The figures of one dataset and student, from its median step seconds ``t`` (arms and
    reference arms), each loss's paired ratio to its reference and its accuracies.

    The floor takes the slowest loss against its reference, ce left out: kdcache's ce *is*
    F.cross_entropy, the reference's, so its ratio is the timing's noise and is reported as
    such (a figure without a floor)."""
    worst = max((a for a in names if a != "ce"), key=lambda a: ratios[a])
    dearest = max((a for a in names if a != "ce"), key=lambda a: t[a])
    lowest = min(names, key=lambda a: statistics.mean(accuracy[a]))
    return [
        figure(f"{label}: slowest loss step / its reference's step ({worst})", round(ratios[worst], 3), "x",
               floor=STEP_FLOOR, op="<=", ratios={a: round(v, 4) for a, v in ratios.items()},
               ms={a: round(v * 1e3, 4) for a, v in t.items()}),
        figure(f"{label}: ce step / the same F.cross_entropy step (information: the timing's noise)",
               round(ratios["ce"], 3), "x"),
        figure(f"{label}: slowest loss step / ce step ({dearest}; information: the method's cost)",
               round(t[dearest] / t["ce"], 3), "x"),
        figure(f"{label}: lowest loss accuracy - ce ({lowest}; information)",
               round(statistics.mean(accuracy[lowest]) - statistics.mean(accuracy["ce"]), 4)),
    ]


def run(quick: bool, workdir: Path) -> dict:
    from pipeline.losses import LOSSES

    t_start = time.perf_counter()
    seeds = (0,) if quick else (0, 1, 2)
    cycles = 50 if quick else 300
    figures, acc_rows, step_rows, measured, step_s, wall_s, ratios = [], [], [], {}, {}, {}, {}
    for s in settings(workdir, quick):
        usable = [(arm, o) for arm, o in arms() if not (LOSSES.declared(o["loss"]).maps and s.maps is None)]
        label = f"{s.dataset} {s.model}"
        log(f"{NAME}: {label}: timing {cycles} interleaved steps of each loss and of its reference")
        steps = {arm: s.step_arm(o) for arm, o in usable}
        steps.update({REF + arm: s.step_arm(o, reference=True) for arm, o in usable})
        times = interleaved(steps, cycles)
        cpu = {n: [c for c, _ in v] for n, v in times.items()}
        t = step_s[label] = {n: median(v) for n, v in cpu.items()}
        wall = wall_s[label] = {n: median([w for _, w in v]) for n, v in times.items()}
        ratios[label] = {a: paired_ratio(cpu, a) for a, _ in usable}
        for arm, o in usable:
            t0 = time.perf_counter()
            accs = [s.accuracy(o, seed) for seed in seeds]
            measured[(label, arm)] = accs
            mean = statistics.mean(accs)
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            vs_ref, vs_ce = ratios[label][arm], t[arm] / t["ce"]
            log(f"{NAME}: {label} {arm}: {mean:.4f} ± {std:.4f}, step {t[arm] * 1e3:.2f} ms "
                f"({vs_ref:.2f}x reference, {vs_ce:.2f}x ce) ({time.perf_counter() - t0:.0f}s)")
            acc_rows.append([s.dataset, s.model, arm, f"{mean:.4f} ± {std:.4f}", len(accs)])
            step_rows.append([s.dataset, s.model, arm, f"{t[arm] * 1e3:.3f}", f"{t[REF + arm] * 1e3:.3f}",
                              f"{vs_ref:.2f}", f"{vs_ce:.2f}", f"{wall[arm] * 1e3:.3f}",
                              f"{wall[REF + arm] * 1e3:.3f}"])
        figures += label_figures(label, [a for a, _ in usable], t, ratios[label],
                                 {a: measured[(label, a)] for a, _ in usable})
    tables = [
        table("Test accuracy, mean ± std over seeds (every arm the same student and schedule)",
              ["dataset", "student", "loss", "test accuracy", "seeds"], acc_rows,
              note="Losses at their declared defaults (the papers' weights; pkt, sp, at: see their "
                   "docstrings); temperature losses at "
                   "the cache's temperature 4 (kd, fitnet alpha 0.9); kd+Z = kd with "
                   f"standardize_logits=true. digits: {15 if quick else 60} epochs; MNIST-1D: "
                   f"{20 if quick else 100} epochs, no augmentation (a single-view cache); batch 64, "
                   "lr 1e-2. Information: no floor (see above)."),
        table("Time per training step (CPU of the process; wall for context), batch 64, median of "
              "steps interleaved across the losses and their reference implementations",
              ["dataset", "student", "loss", "CPU ms / step", "reference CPU ms / step",
               f"vs reference (≤ {STEP_FLOOR:.2f})", "vs ce (information)", "wall ms / step",
               "reference wall ms / step"], step_rows,
              note=f"median of {cycles} steps of each arm, interleaved one by one in a random order "
                   "per cycle after a warm-up; a step: tensors, forward, loss, backward, fused AdamW "
                   "(pipeline.training.train_step); kdcache's soft targets are the data path's work, "
                   "done per shuffle buffer outside the step, the reference computes them in its "
                   "loss as its code does; reference = bench/reference_losses.py, same student, "
                   "weights, batches and optimiser, its step run back to back with kdcache's; "
                   "vs reference = median over the cycles of the two steps' ratio of CPU time; "
                   "wall times for context."),
    ]
    return result(NAME, "every loss from the cache: accuracy, and step time against its reference implementation",
                  figures, tables, [], {"quick": quick, "seeds": list(seeds), "cycles": cycles},
                  time.perf_counter() - t_start) | {
        "accuracy": {" / ".join(k): v for k, v in measured.items()},
        "step_seconds": step_s, "step_wall_seconds": wall_s, "step_ratio_to_reference": ratios}


if __name__ == "__main__":
    main_for(run)
