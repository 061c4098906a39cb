"""The results table: one row per student run, beside the cache it was trained from.

The table is a directory of one-row Parquet files (``<cache>.results/<run_id>.parquet``), read
together as one Arrow table. Appending is writing one new file atomically, so concurrent runs
never lose or tear each other's rows, and an interrupted run leaves no row at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import atomic_path

SCHEMA = pa.schema([
    ("run_id", pa.string()), ("time", pa.string()), ("model", pa.string()), ("kind", pa.string()),
    ("loss", pa.string()), ("T", pa.float64()), ("alpha", pa.float64()), ("seed", pa.int64()),
    ("epochs", pa.int64()), ("C", pa.string()), ("layer", pa.string()),
    ("test_accuracy", pa.float64()), ("val_accuracy", pa.float64()),
    ("teacher_agreement", pa.float64()), ("kl_teacher_student", pa.float64()), ("ece", pa.float64()),
    ("params", pa.int64()), ("fit_seconds", pa.float64()), ("latency_ms", pa.float64()),
    ("teacher_test_accuracy", pa.float64()), ("teacher_fingerprint", pa.string()),
    ("dataset_fingerprint", pa.string()), ("cache", pa.string()), ("run_dir", pa.string()),
])


def results_dir(cache_root: str | Path) -> Path:
    cache_root = Path(cache_root)
    return cache_root.parent / f"{cache_root.name}.results"


def append_row(directory: Path, row: dict[str, Any]) -> Path:
    table = pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names}], schema=SCHEMA)
    path = Path(directory) / f"{row['run_id']}.parquet"
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_results(directory: Path) -> pa.Table:
    files = sorted(Path(directory).glob("*.parquet")) if Path(directory).is_dir() else []
    if not files:
        return SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files]).sort_by("time")
