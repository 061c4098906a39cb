"""Memory scaling: peak RSS of stage one and of streamed students at N and 10·N rows.

Measured (floor: peak RSS(10N) / peak RSS(N) ≤ 1.2, per command)
    Each command runs in a fresh ``kdcache`` child process; its peak RSS is the kernel's
    ``ru_maxrss`` for that child (reported by a small wrapper process, see
    ``bench.common.run_child``), i.e. the high-water mark of the whole run.
    - ``kdcache cache`` on ``synthetic:N:3x32x32:10`` (12 KB of float32 input per row, so the
      inputs would dominate if they were ever held whole) with a light teacher (mlp, random
      weights) so the run stays short;
    - ``kdcache student model=sgd`` (scikit-learn, streamed with partial_fit), 1 epoch;
    - ``kdcache student model=mlp loss=kd`` (a torch student, train split streamed), 1 epoch.
    Stage one and the streamed students promise memory bounded by a shard / a stream buffer,
    not by N: 10x the rows should cost (almost) no more memory. Also reported: wall time
    (10N)/(N) of each child and of the stage's own timed work (cache ``seconds``, student
    ``fit_seconds``), which should be ~10 once fixed costs (imports, start-up) are small.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import sys

from bench.common import figure, kdcache_json, log, main_for, median, result, run_child, table

NAME = "memory"
FLOOR = 1.2


def run(quick: bool, workdir: Path) -> dict:
    t_start = time.perf_counter()
    n = 1_000 if quick else 20_000
    repeats = 1
    where = workdir / NAME
    measured = {}  # (command, rows) -> list of child records
    commands = ("kdcache cache (mlp teacher)", "kdcache student model=sgd",
                "kdcache student model=mlp loss=kd")
    for rep in range(repeats):
        for rows in (n, 10 * n):
            cache = where / f"mem-{rows}"
            # every repeat builds afresh: the build is what is measured
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(Path(str(cache) + ".results"), ignore_errors=True)
            calls = [
                ("cache", {"dataset": f"synthetic:{rows}:3x32x32:10", "teacher": "mlp",
                           "teacher_ckpt": "random", "cache": cache}),
                ("student", {"cache": cache, "model": "sgd", "epochs": 1, "runs_dir": where / "runs"}),
                ("student", {"cache": cache, "model": "mlp", "loss": "kd", "epochs": 1,
                             "runs_dir": where / "runs"}),
            ]
            for label, (verb, args) in zip(commands, calls):
                log(f"{NAME}: {label} at {rows:,} rows (repeat {rep + 1}/{repeats})")
                res = kdcache_json(verb, args, cwd=workdir)
                s = res["summary"]
                inner = s.get("seconds") if verb == "cache" else s.get("fit_seconds")
                rec = {"peak_rss_mb": res["peak_rss_mb"], "wall_s": res["seconds"], "stage_s": inner,
                       "cmd": res["cmd"]}
                measured.setdefault((label, rows), []).append(rec)
                log(f"  peak RSS {rec['peak_rss_mb']:,.0f} MB, {rec['wall_s']:.1f}s wall, {inner:.1f}s stage")

    figures, rows_out, raw = [], [], []
    for label in commands:
        a, b = measured[(label, n)], measured[(label, 10 * n)]
        rss = {k: median([r["peak_rss_mb"] for r in v]) for k, v in (("n", a), ("10n", b))}
        wall = {k: median([r["wall_s"] for r in v]) for k, v in (("n", a), ("10n", b))}
        stage = {k: median([r["stage_s"] for r in v]) for k, v in (("n", a), ("10n", b))}
        ratio = rss["10n"] / rss["n"]
        figures.append(figure(f"peak RSS(10N)/RSS(N), {label}", round(ratio, 3), "x", floor=FLOOR,
                              op="<=", rss_n_mb=round(rss["n"], 1), rss_10n_mb=round(rss["10n"], 1),
                              rss_growth_mb=round(rss["10n"] - rss["n"], 1),
                              wall_ratio=round(wall["10n"] / wall["n"], 2),
                              stage_time_ratio=round(stage["10n"] / stage["n"], 2)))
        rows_out.append([label, f"{rss['n']:,.0f}", f"{rss['10n']:,.0f}",
                         f"{rss['10n'] - rss['n']:+,.0f}", f"{ratio:.3f}",
                         "PASS" if ratio <= FLOOR else "FAIL",
                         f"{wall['n']:.1f} / {wall['10n']:.1f}", f"{wall['10n'] / wall['n']:.2f}",
                         f"{stage['n']:.1f} / {stage['10n']:.1f}", f"{stage['10n'] / stage['n']:.2f}"])
        raw.append({"command": label, "n": a, "10n": b})
    # Context: what importing the stages alone costs (torch, zarr, dask, scikit-learn).
    imports = run_child([sys.executable, "-c", "import stages.cache, stages.student"], cwd=workdir)
    tables = [table(f"Peak RSS at N = {n:,} and 10·N = {10 * n:,} rows (3x32x32 inputs)",
                    ["command", "RSS(N) MB", "RSS(10N) MB", "growth MB", "ratio (≤ 1.2)", "verdict",
                     "wall s N / 10N", "wall ratio", "stage s N / 10N", "stage ratio"], rows_out,
                    note=f"fresh child process per run; peak RSS = the command's ru_maxrss (via a small "
                         f"wrapper's getrusage(RUSAGE_CHILDREN)); median of "
                         f"{repeats} run(s). Stage s = the cache's own build seconds / the "
                         "student's fit_seconds (excludes interpreter start-up and imports). "
                         f"Importing the stages alone peaks at {imports['peak_rss_mb']:,.0f} MB.")]
    return result(NAME, "peak RSS scaling N -> 10N", figures, tables, [],
                  {"quick": quick, "n": n, "repeats": repeats}, time.perf_counter() - t_start) | {
                      "measured": raw, "import_only_peak_rss_mb": imports["peak_rss_mb"]}


if __name__ == "__main__":
    main_for(run)
