"""Student threads under load: ``kdcache student`` while two other torch processes keep the
cores busy, as kdcache ships (no thread setting) against ``threads=1``, and the product before
issue #28 (libgomp's spin-waiting, forced here with ``OMP_WAIT_POLICY=ACTIVE``).

Measured (floor: default fit time / threads=1 fit time <= 1.5)
    default    ``kdcache student model=cnn_small loss=kd epochs=E`` on a digits cache, in a
               child process whose environment has no OMP_WAIT_POLICY: the CLI sets PASSIVE
               before torch loads (pipeline/__init__.py), torch uses every core.
    threads=1  the same command with ``threads=1``.
    before     the same command as ``default`` with ``OMP_WAIT_POLICY=ACTIVE`` in its
               environment: the CLI leaves a user's value alone, so this is libgomp spinning
               between parallel regions (issue #28 measured 247.7 s against 3.5 s with one
               thread while another kdcache job ran).

The load: two ``python -c`` processes, each a one-thread torch matmul loop, started before the
first arm and stopped (by pid) after the last; each also stops itself after a time limit, so a
bench that dies leaves nothing running for long. Every arm is the run's own ``fit_seconds``
(training only: not the child's start-up and imports), the arms alternated (order rotated) in
every repeat after one untimed warm-up of each; the load runs through all of them alike. A
random cnn_small teacher: the figure is time, not accuracy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (KDCACHE, alternate, base_dirs, ensure_cache, figure, log, main_for, median,
                          result, run_child, spread, table)

NAME = "student_threads"
FLOOR = 1.5
LOAD_PROCESSES = 2
LOAD_LIMIT_S = 1800  # a load process ends by itself after this, whatever happens to the bench

# one core's worth of torch work, until stopped or out of time
_LOAD = """
import sys, time, torch
torch.set_num_threads(1)
a = torch.randn(384, 384)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    a = torch.tanh(a @ a)
"""


def start_load(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", _LOAD, str(LOAD_LIMIT_S)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            for _ in range(n)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(quick: bool, workdir: Path) -> dict:
    t_start = time.perf_counter()
    epochs = 2 if quick else 3
    repeats = 1 if quick else 3
    root = ensure_cache({"dataset": "digits", "teacher": "cnn_small", "teacher_ckpt": "random",
                         "cache": workdir / "caches" / "digits-cnn_small-random", **base_dirs(workdir)})
    base_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}

    def arm(policy: str | None, **extra) -> callable:
        env = dict(base_env, **({"OMP_WAIT_POLICY": policy} if policy else {}))
        args = {"cache": root, "model": "cnn_small", "loss": "kd", "epochs": epochs,
                "runs_dir": workdir / "runs", **extra}

        def go() -> float:
            res = run_child([KDCACHE, "student", *[f"{k}={v}" for k, v in args.items()], "--json"],
                            cwd=workdir, env=env)
            import json

            return float(json.loads(res["stdout"].strip().splitlines()[-1])["fit_seconds"])
        return go

    arms = {"default": arm(None), "threads=1": arm(None, threads=1), "before (ACTIVE)": arm("ACTIVE")}
    load = start_load(LOAD_PROCESSES)
    log(f"{NAME}: {LOAD_PROCESSES} load processes (pids {', '.join(str(p.pid) for p in load)}); "
        f"cnn_small kd, {epochs} epochs, {repeats} repeats")
    try:
        times = alternate(arms, repeats, label=NAME)
    finally:
        stop_load(load)
    t = {k: median(v) for k, v in times.items()}
    after = t["default"] / t["threads=1"]
    before = t["before (ACTIVE)"] / t["threads=1"]
    figures = [
        figure("default/threads=1 student fit time under load", round(after, 3), "x", floor=FLOOR,
               op="<=", default_s=round(t["default"], 3), threads1_s=round(t["threads=1"], 3)),
        figure("before (OMP_WAIT_POLICY=ACTIVE)/threads=1 under load", round(before, 3), "x",
               active_s=round(t["before (ACTIVE)"], 3), threads1_s=round(t["threads=1"], 3)),
    ]
    rows = [[name, f"{t[name]:.2f}", f"{t[name] / t['threads=1']:.2f}"] for name in arms]
    tables = [table("kdcache student (cnn_small, kd) while two one-thread torch processes load the cores",
                    ["arm", "fit s (median)", "vs threads=1"], rows,
                    note=f"digits, random cnn_small teacher, {epochs} epochs, {os.cpu_count()} cores, "
                         f"median of {repeats} alternated repeats; floor: default/threads=1 <= {FLOOR}.")]
    notes = ["`before (ACTIVE)` is the product's behaviour before it set OMP_WAIT_POLICY=PASSIVE "
             "itself (libgomp spinning), forced through the environment the CLI leaves alone."]
    return result(NAME, "student threads while other processes load the cores", figures, tables, notes,
                  {"quick": quick, "epochs": epochs, "repeats": repeats, "load_processes": LOAD_PROCESSES},
                  time.perf_counter() - t_start) | {"seconds_per_arm": {k: spread(v) for k, v in times.items()}}


if __name__ == "__main__":
    main_for(run)
