"""Leaderboard and plots of a cache's results table.

    kdcache report [cache=PATH]

Prints a Markdown leaderboard (mean ± std over seeds, one row per experiment, the
hyperparameters that differ between experiments as columns; each student against the teacher:
N× smaller, M× faster — teacher and student timed side by side now, in this process — and K%
of its accuracy kept) and writes it with four PNG plots to ``<cache>.results/report/``: accuracy vs parameters and vs CPU latency (the teacher
a point on both), accuracy vs temperature, and each student against its label-only baseline.
On a token cache (language models) the leaderboard and the plots are in test perplexity
(lower is better): vs parameters and vs CPU tokens/s (the teacher a star on both), vs
temperature, and each student against the next-token CE baseline.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cache import format as fmt
from pipeline.cache import open_cache
from pipeline.config import ReportConfig
from pipeline.costs import compare
from pipeline.errors import KdError, first_line
from pipeline.export import load_fitted, open_run
from pipeline.paths import cache_path
from pipeline.report import leaderboard, markdown, plots, teacher_of
from pipeline.results import read_results, results_dir
from pipeline.settings import resolve
from pipeline.storage import is_remote, location, storage_errors, write_text


def main(args: list[str]) -> dict:
    cfg = resolve(ReportConfig, args, verb="report")
    root = cache_path(cfg)
    with storage_errors(root):
        fmt.read_manifest(root)  # a clear error for a path that is no cache
    table_dir = results_dir(root)
    table = read_results(table_dir)
    if table.num_rows == 0:
        raise KdError(f"no results for cache {root} yet ({table_dir} is empty); run "
                      "`make student` or `make sweep` first")
    rows = table.to_pylist()
    if cfg.runs_dir:  # only the runs whose directories went there
        rows = [r for r in rows if str(r.get("run_dir") or "").startswith(cfg.runs_dir.rstrip("/") + "/")]
        if not rows:
            raise KdError(f"no run of cache {root} went to runs_dir={cfg.runs_dir}; drop runs_dir= "
                          "to report every run")
    board = leaderboard(rows)
    time_side_by_side(root, board)
    teacher = teacher_of(rows)
    text = markdown(board, teacher, str(root))
    out = location(cfg.out, "out") if cfg.out else table_dir / "report"
    if not is_remote(out):
        out.mkdir(parents=True, exist_ok=True)
    with storage_errors(out, "out"):
        write_text(out / "leaderboard.md", text)
        pngs = plots(board, teacher, out)
    print(text)
    print(f"wrote {out / 'leaderboard.md'} and {len(pngs)} plots in {out}")
    return {"runs": table.num_rows, "groups": len(board), "leaderboard": board,
            "report": str(out / "leaderboard.md"), "plots": [str(p) for p in pngs]}


def time_side_by_side(root, board: list[dict]) -> None:
    """Each input student's newest run timed against the teacher, side by side, now
    (pipeline.costs); an entry whose student or teacher cannot be loaded says why."""
    cache = open_cache(root)
    students = {}
    for i, b in enumerate(board):
        if b["kind"] != "inputs":
            continue
        run_dir = next((d for d in reversed(b["run_dirs"]) if d and Path(d).is_dir()), None)
        if run_dir is None:
            b["side_by_side"] = "its run directory is gone"
            continue
        try:
            students[i] = load_fitted(open_run(run_dir), cache).cpu_predict()
        except KdError as exc:
            b["side_by_side"] = f"its run cannot be loaded: {first_line(exc, 120)}"
    for i, timed in compare(cache, students).items():
        board[i]["side_by_side"] = timed
