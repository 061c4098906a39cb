"""Running a sweep's student runs: one after another in this process, or as Dask tasks on local
worker processes (``scheduler=local workers=N``) or a scheduler's workers (``scheduler=ADDRESS``).

Every run's run_id is decided here, before any run starts: Dask may run a task twice (its worker
died mid-run, or after finishing but before its result came back), and a second attempt with
the same run_id replaces the first one's run directory and results row instead of adding a
row of its own. Each run is resolved against the cache here too, so that a run that cannot
work is refused, in one line, before the cluster starts.
"""

from __future__ import annotations

from typing import Iterator

from pipeline import runtime
from pipeline.cache import open_cache
from pipeline.cache.execute import in_process  # the same rule as for a build's shards
from pipeline.config import StudentConfig, SweepConfig
from pipeline.paths import cache_path
from pipeline.runs import new_run_id, resolve_run, train_student

Finished = Iterator[tuple[int, dict]]  # (position in the grid, results row), as runs finish


def run_sweep(cfg: SweepConfig, runs: list[StudentConfig]) -> Finished:
    """Check the scheduler and every run, decide the run ids, and return the runs' results as
    they finish (training starts when they are first asked for). A run's KdError is raised
    as it was; runs finished before it keep their rows."""
    if not in_process(cfg):
        from pipeline.cluster import check_reachable

        check_reachable(cfg.scheduler)
    cache = open_cache(cache_path(cfg))
    run_ids = [new_run_id(resolve_run(run, cache)[0]) for run in runs]
    return (_here if in_process(cfg) else _on_dask)(cfg, runs, run_ids)


def _here(cfg: SweepConfig, runs: list[StudentConfig], run_ids: list[str]) -> Finished:
    with runtime.torch_threads(cfg.threads):
        for i, (run, run_id) in enumerate(zip(runs, run_ids)):
            yield i, train_student(run, progress=False, run_id=run_id)


def _on_dask(cfg: SweepConfig, runs: list[StudentConfig], run_ids: list[str]) -> Finished:
    from pipeline import cluster

    with cluster.connect(cfg.scheduler, cfg.workers, processes=True,
                         settings=cluster.WorkerSettings(cfg.threads)) as client:
        futures = [client.submit(student_task, run, run_id, key=f"kdcache-run-{run_id}", pure=False)
                   for run, run_id in zip(runs, run_ids)]
        yield from cluster.finished(futures, lambda i: f"run {run_ids[i]}")


def student_task(cfg: StudentConfig, run_id: str) -> dict:
    """One run, as a Dask task: on the worker's torch threads (:func:`pipeline.cluster.use_threads`)."""
    from pipeline.cluster import use_threads

    use_threads()
    return train_student(cfg, progress=False, run_id=run_id)
