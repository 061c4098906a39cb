"""Cluster: stage one and a sweep on a real multi-process Dask cluster on this machine.

Measured
    build ratio (floor: cluster / in-process throughput >= 0.8)
        rows / wall time of ``build_cache`` into a fresh cache directory, the same rows,
        teacher and cores in both arms: in this process (the default, ``workers=1``: streams
        of forwards on all cores), and as a client of ``dask scheduler`` with ``dask worker
        ADDRESS --nworkers 2 --nthreads 1`` (two worker processes of one thread each, with
        their nannies, started by this benchmark as a user starts them). The cluster arm's
        timed region holds everything a build does there: connecting, registering the
        worker settings (every worker sets its torch threads and loads the teacher and the
        dataset), one task per shard, unregistering and closing. Warm workers: the cluster
        is started and one build done before timing, as on a long-running cluster; every
        timed build is of a new cache. Dataset synthetic:20000:3x16x16:10, teacher
        resnet_small with random weights.
    sweep speed-up (floor >= 1.6)
        wall time of a 12-run sweep (mlp and cnn_small × losses kd and ce × seeds 0, 1, 2 on
        the digits cache of the trained cnn_small teacher, 20 epochs) on a cluster of 1
        worker / on a cluster of 2 workers, one torch thread per run in both (``threads=1``):
        the same runs, the same numbers, one or two at a time. For context, the same sweep
        in this process as `kdcache sweep` runs it by default (torch on all cores). Each
        cluster runs the sweep for one epoch before timing (every worker imports torch and
        runs each student once).
    malloc (context, no floor)
        the seconds of the shard phase of `kdcache cache` children, with glibc's default
        malloc thresholds and with those the cluster's workers are given
        (``pipeline.cluster._undo_nanny_malloc``): how much of the cluster arm's speed comes
        from that setting, which the in-process arm does not have.

Why fair: the same machine and cores for every arm, arms alternated in every repeat, medians;
only the scheduler, the client's connection and this process's imports differ. The machine is
shared: the load average is reported with every repeat.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import time
from pathlib import Path

from bench.common import (alternate, digits_cache, figure, log, main_for, median,
                          prepare_build, result, spread, table)
from bench.dask_processes import ProcessCluster

NAME = "cluster"
BUILD_FLOOR = 0.8
SWEEP_FLOOR = 1.6
DATASET = "synthetic:20000:3x16x16:10"
GRID = {"models": "mlp cnn_small", "losses": "kd ce", "seeds": "0 1 2"}  # 12 runs
EPOCHS = 20  # a few seconds per run on 2 cores


def measure_build(workdir: Path, address: str, repeats: int) -> dict:
    from pipeline.cache import build

    where = workdir / NAME / "build"
    shutil.rmtree(where, ignore_errors=True)
    args = dict(dataset=DATASET, teacher="resnet_small", teacher_ckpt="random",
                cache=where / "cache")
    root, cfg, dataset, spec, manifest = prepare_build(args)
    on_cluster = dataclasses.replace(cfg, scheduler=address)
    rows = sum(len(s) for s in dataset.splits.values())
    records: list[list[dict]] = []

    def arm(config) -> float:
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        done, _ = build.build_cache(root, config, dataset, spec, manifest, progress=False)
        seconds = time.perf_counter() - t0
        if config is on_cluster:
            records.append([r for split in done["shards"].values() for r in split])
        return seconds

    times = alternate({"in-process": lambda: arm(cfg), "cluster": lambda: arm(on_cluster)},
                      repeats, label=f"{NAME} build")
    shutil.rmtree(where, ignore_errors=True)
    here, there = median(times["in-process"]), median(times["cluster"])
    # where a cluster build's time goes: the workers' busy time (compute + write of each shard,
    # as its record says) against their wall time, per timed repeat
    busy = [sum(r["seconds"] for r in rec) / (2 * t) for rec, t in zip(records[1:], times["cluster"])]
    return {"rows": rows, "shards": len(records[-1]), "shard_size": cfg.shard_size,
            "in_process_samples_s": rows / here, "cluster_samples_s": rows / there,
            "ratio": here / there, "ratio_fastest": min(times["in-process"]) / min(times["cluster"]),
            "worker_busy_fraction": median(busy),
            "seconds": {k: spread(v) for k, v in times.items()}}


def measure_sweep(workdir: Path, one: str, two: str, repeats: int) -> dict:
    from stages import sweep

    cache = digits_cache(workdir)
    runs = workdir / NAME / "runs"
    results = cache.parent / f"{cache.name}.results"
    accuracy: dict[str, list] = {}

    def arm(label: str, scheduler: str, threads: int = 0, epochs: int = EPOCHS) -> float:
        shutil.rmtree(results, ignore_errors=True)
        args = [f"cache={cache}", f"runs_dir={runs}", f"epochs={epochs}", f"scheduler={scheduler}",
                f"threads={threads}", *(f"{k}={v}" for k, v in GRID.items())]
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            summary = sweep.main(args)
        seconds = time.perf_counter() - t0
        accuracy[label] = [(r["model"], r["loss"], r["seed"], r["test_accuracy"]) for r in summary["rows"]]
        shutil.rmtree(results, ignore_errors=True)
        shutil.rmtree(runs, ignore_errors=True)
        return seconds

    for address in (one, two):  # every worker imports torch and runs each student once
        arm("warm-up", address, threads=1, epochs=1)
    times = alternate({"1 worker": lambda: arm("1 worker", one, threads=1),
                       "2 workers": lambda: arm("2 workers", two, threads=1),
                       "in-process": lambda: arm("in-process", "local")},
                      repeats, label=f"{NAME} sweep", warmup=False)
    t1, t2, here = (median(times[k]) for k in ("1 worker", "2 workers", "in-process"))
    return {"runs": len(accuracy["2 workers"]), "epochs": EPOCHS, "speedup": t1 / t2,
            "speedup_fastest": min(times["1 worker"]) / min(times["2 workers"]),
            "two_workers_vs_in_process": here / t2,
            "same_accuracy_1_vs_2_workers": accuracy["1 worker"] == accuracy["2 workers"],
            "same_accuracy_2_workers_vs_in_process": accuracy["2 workers"] == accuracy["in-process"],
            "accuracy": accuracy, "seconds": {k: spread(v) for k, v in times.items()}}


def measure_malloc(workdir: Path, repeats: int) -> dict:
    """Context: the in-process shard phase (the seconds ``kdcache cache`` reports for its
    shards) in child processes with glibc's default malloc thresholds and with those the
    cluster's workers get (pipeline.cluster), to tell that setting's share of a cluster
    build's speed from the rest."""
    import os

    from bench.common import KDCACHE, run_child
    from pipeline.cluster import _MMAP_THRESHOLD, _TRIM_THRESHOLD

    root = workdir / NAME / "malloc"
    args = [f"dataset={DATASET}", "teacher=resnet_small", "teacher_ckpt=random", f"cache={root}", "--json"]
    tuned = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD),
             "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD)}

    def arm(env: dict) -> float:
        shutil.rmtree(root, ignore_errors=True)
        out = run_child([KDCACHE, "cache", *args], cwd=workdir, env=env)["stdout"]
        return json.loads(out.strip().splitlines()[-1])["seconds"]

    times = alternate({"glibc default": lambda: arm(dict(os.environ)), "workers' thresholds": lambda: arm(tuned)},
                      repeats, label=f"{NAME} malloc", warmup=False)
    shutil.rmtree(root, ignore_errors=True)
    return {"speedup": median(times["glibc default"]) / median(times["workers' thresholds"]),
            "seconds": {k: spread(v) for k, v in times.items()}}


def run(quick: bool, workdir: Path) -> dict:
    t_start = time.perf_counter()
    repeats = 3 if quick else 5
    where = workdir / NAME
    with ProcessCluster(where / "two", workers=2) as two, ProcessCluster(where / "one", workers=1) as one:
        log(f"{NAME}: clusters up: 2 workers at {two.address}, 1 worker at {one.address}")
        b = measure_build(workdir, two.address, repeats)
        s = measure_sweep(workdir, one.address, two.address, 1 if quick else 3)
    m = measure_malloc(workdir, repeats)
    figures = [
        figure("cluster/in-process build throughput (2 one-thread workers, warm)", round(b["ratio"], 3),
               "x", floor=BUILD_FLOOR, rows=b["rows"], shards=b["shards"],
               in_process_samples_s=round(b["in_process_samples_s"], 1),
               cluster_samples_s=round(b["cluster_samples_s"], 1),
               ratio_from_fastest_repeats=round(b["ratio_fastest"], 3),
               worker_busy_fraction=round(b["worker_busy_fraction"], 3)),
        figure(f"sweep speed-up, {s['runs']} runs, 2 workers vs 1 (1 torch thread per run)",
               round(s["speedup"], 3), "x",
               floor=SWEEP_FLOOR, speedup_from_fastest_repeats=round(s["speedup_fastest"], 3),
               two_workers_vs_in_process=round(s["two_workers_vs_in_process"], 3)),
        figure("in-process shard phase, workers' malloc thresholds vs glibc's defaults (context)",
               round(m["speedup"], 3), "x"),
    ]
    sec = b["seconds"]
    tables = [
        table("Stage one: in-process vs a 2-worker cluster on the same cores",
              ["arm", "median s", "samples/s", "repeats (s)"],
              [[arm, f"{sec[arm]['median']:.2f}", f"{b['rows'] / sec[arm]['median']:,.0f}",
                ", ".join(f"{v:.2f}" for v in sec[arm]["repeats"])] for arm in sec],
              note=f"{DATASET}, resnet_small (random weights), {b['shards']} shards of "
                   f"{b['shard_size']} rows; ratio {b['ratio']:.3f} (floor ≥ {BUILD_FLOOR}); "
                   f"workers busy {b['worker_busy_fraction']:.0%} of the cluster build's wall time "
                   "(the rest: connecting, settings, scheduling, the last shard's tail)."),
        table(f"Sweep of {s['runs']} runs ({EPOCHS} epochs each) on 1 and 2 workers",
              ["arm", "median s", "repeats (s)"],
              [[arm, f"{v['median']:.1f}", ", ".join(f"{x:.1f}" for x in v["repeats"])]
               for arm, v in s["seconds"].items()],
              note=f"1 and 2 workers: threads=1 (one torch thread per run); in-process: the "
                   f"default (torch on all cores). Speed-up 2 vs 1 worker {s['speedup']:.2f} "
                   f"(floor ≥ {SWEEP_FLOOR}); 2 workers vs in-process {s['two_workers_vs_in_process']:.2f}. "
                   f"The same test accuracies on 1 and 2 workers: {s['same_accuracy_1_vs_2_workers']}; "
                   f"on 2 workers and in-process: {s['same_accuracy_2_workers_vs_in_process']} "
                   "(runs on 1 torch thread and on 2 may round differently)."),
        table("Context: the in-process shard phase and glibc's malloc thresholds",
              ["malloc", "median s", "repeats (s)"],
              [[arm, f"{v['median']:.2f}", ", ".join(f"{x:.2f}" for x in v["repeats"])]
               for arm, v in m["seconds"].items()],
              note="`kdcache cache` children, the seconds of their shard phase; \"workers' thresholds\" "
                   "= MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ as the cluster's workers get them "
                   f"(pipeline.cluster): {m['speedup']:.2f}x. The cluster's workers have them, the "
                   "in-process arm above does not."),
    ]
    notes = [("Both clusters are `dask scheduler` + `dask worker --nworkers N --nthreads 1` processes "
              "on 127.0.0.1, started and stopped (by process group) by the benchmark.")]
    return result(NAME, "stage one and sweeps on a multi-process dask cluster", figures, tables, notes,
                  {"quick": quick, "repeats": repeats, "dataset": DATASET, **GRID, "epochs": EPOCHS},
                  time.perf_counter() - t_start) | {"build": b, "sweep": s, "malloc": m}


if __name__ == "__main__":
    main_for(run)
