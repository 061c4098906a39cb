"""A sweep: its grid expanded into student runs, and those runs run.

The grid: ``grid.KEY=V1,V2,...`` for any run key (model, loss, seed, layer, views) or any
hyperparameter a student or loss declares (width, lr, temperature, C, ...), crossed in the
order given; keys given once (``epochs=5``) apply to every run. A value of an axis that a
run's student and loss do not declare is dropped for that run (a feature student has no loss
or width axis), and runs that become equal are run once; an axis or key that applies to no
run at all is refused.

Running: one after another in this process, or as Dask tasks on local
worker processes (``scheduler=local workers=N``) or a scheduler's workers (``scheduler=ADDRESS``).

Every run's run_id is decided here, before any run starts: Dask may run a task twice (its worker
died mid-run, or after finishing but before its result came back), and a second attempt with
the same run_id replaces the first one's run directory and results row instead of adding a
row of its own. Each run is resolved against the cache here too, so that a run that cannot
work is refused, in one line, before the cluster starts.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterator

from pipeline import runtime
from pipeline.cache import open_cache
from pipeline.config import Params, StudentConfig, SweepConfig, coerce_field, in_process  # a build's rule too
from pipeline.errors import KdError
from pipeline.losses import LOSSES, loss_params
from pipeline.paths import cache_path
from pipeline.runs import new_run_id, resolve_run, train_student
from pipeline.students import STUDENTS, complete, hyperparameters, run_loss, student_params

RUN_AXES = ("model", "loss", "seed", "layer", "views")  # grid axes that are StudentConfig fields


def complete_sweep(cfg: SweepConfig, given: dict[str, Any]) -> SweepConfig:
    """The ``complete`` hook of :func:`pipeline.config.resolve` for sweeps: ``given`` (the
    hyperparameters set for every run) kept as given, and the whole grid expanded once, so
    that every key and value is checked before the first run."""
    cfg = dataclasses.replace(cfg, params=Params({k: str(v) for k, v in given.items()}))
    expand(cfg)
    return cfg


def expand(cfg: SweepConfig) -> list[StudentConfig]:
    """Every run of the sweep ``cfg``, each a completed StudentConfig, in grid order."""
    axes = [*cfg.default_grid, *cfg.grid]
    for key, values in axes:  # every name checked before the first run
        for value in values if key in ("model", "loss") else ():
            (STUDENTS if key == "model" else LOSSES).get(value)
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(StudentConfig)}
    runs, seen, applied = [], set(), set()
    for combination in itertools.product(*(values for _, values in axes)):
        chosen = dict(zip((key for key, _ in axes), combination))
        fields = {k: coerce_field(StudentConfig, k, v) for k, v in chosen.items() if k in RUN_AXES}
        run = StudentConfig(**{**base, **fields, "params": Params()})
        run.check()
        model_has_loss = STUDENTS.declared(run.model).loss
        if not model_has_loss:
            run = dataclasses.replace(run, loss=None)
        loss = run_loss(run.model, run.loss)
        declared = hyperparameters(run.model, loss)
        hyper = {**dict(cfg.params), **{k: v for k, v in chosen.items() if k not in RUN_AXES}}
        given = {k: v for k, v in hyper.items() if k in declared}
        applied |= set(given) | {k for k in fields if k != "loss" or model_has_loss}
        run = complete(run, given)
        key = (run.model, run.loss, run.layer, run.views, run.seed, run.params)
        if key not in seen:
            seen.add(key)
            runs.append(run)
    for key in [*(k for k, _ in cfg.grid), *cfg.params]:  # what the user gave must apply
        if key not in applied:
            spelled = f"grid.{key}={','.join(dict(cfg.grid)[key])}" if key in dict(cfg.grid) \
                else f"{key}={cfg.params[key]}"
            takers = [m for m in STUDENTS if key in student_params(m)] + \
                [f"loss {name}" for name in LOSSES if key in loss_params(name)]
            raise KdError(f"{spelled} applies to no run of this sweep: no model or loss in it "
                          f"({', '.join(sorted({r.model for r in runs}))}) takes {key}; drop it"
                          + (f", or sweep one that does ({', '.join(takers)})" if takers else ""))
    return runs


def selection_metric(rows: list[dict]) -> tuple[str, bool]:
    """The validation figure a sweep's runs are ranked by, and whether lower is better:
    ``val_perplexity`` (lower) for language models (a token cache's runs record it), else
    ``val_accuracy`` (higher)."""
    if rows and all(r.get("val_perplexity") is not None for r in rows):
        return "val_perplexity", True
    return "val_accuracy", False


def ranked(rows: list[dict]) -> list[dict]:
    """The sweep's rows best first on the validation split (:func:`selection_metric`; the test
    split is only reported); ties keep grid order, so ``ranked(rows)[0]`` is the run selected."""
    key, lower = selection_metric(rows)
    return sorted(rows, key=lambda r: r[key] if lower else -r[key])


Finished = Iterator[tuple[int, dict]]  # (position in the grid, results row), as runs finish


def run_sweep(cfg: SweepConfig, runs: list[StudentConfig]) -> Finished:
    """Check the scheduler and every run, decide the run ids, and return the runs' results as
    they finish (training starts when they are first asked for). A run's KdError is raised
    as it was; runs finished before it keep their rows."""
    if not in_process(cfg):
        from pipeline.cluster import check_reachable  # imports distributed: only for a scheduler

        check_reachable(cfg.scheduler)
    cache = open_cache(cache_path(cfg))
    run_ids = [new_run_id(resolve_run(run, cache)[0]) for run in runs]
    return (_here if in_process(cfg) else _on_dask)(cfg, runs, run_ids)


def _here(cfg: SweepConfig, runs: list[StudentConfig], run_ids: list[str]) -> Finished:
    with runtime.torch_threads(cfg.threads):
        for i, (run, run_id) in enumerate(zip(runs, run_ids)):
            yield i, train_student(run, progress=False, run_id=run_id)


def _on_dask(cfg: SweepConfig, runs: list[StudentConfig], run_ids: list[str]) -> Finished:
    from pipeline import cluster  # imports distributed: only when dask runs the runs

    with cluster.connect(cfg.scheduler, cfg.workers, processes=True,
                         settings=cluster.WorkerSettings(cfg.threads)) as client:
        futures = [client.submit(student_task, run, run_id, key=f"kdcache-run-{run_id}", pure=False)
                   for run, run_id in zip(runs, run_ids)]
        yield from cluster.finished(futures, lambda i: f"run {run_ids[i]}")


def student_task(cfg: StudentConfig, run_id: str) -> dict:
    """One run, as a Dask task: on the worker's torch threads (:func:`pipeline.cluster.use_threads`)."""
    from pipeline.cluster import use_threads  # (on a dask worker, where distributed is loaded)

    use_threads()
    return train_student(cfg, progress=False, run_id=run_id)
