"""Leaderboard and plots of a cache's results table.

    kdcache report [cache=PATH]

Prints a Markdown leaderboard (mean ± std over seeds, one row per experiment; each student
against the teacher: N× smaller, M× faster, K% of its accuracy kept) and writes it with four
PNG plots to ``<cache>.results/report/``: accuracy vs parameters and vs CPU latency (the teacher
a point on both), accuracy vs temperature, and each student against its label-only baseline.
"""

from __future__ import annotations

from pipeline.cache import format as fmt
from pipeline.config import ReportConfig
from pipeline.errors import KdError
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
    board = leaderboard(rows)
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
