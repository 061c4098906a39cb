"""The results table: one row per student run, beside the cache it was trained from.

The table is a directory of one-row Parquet files (``<cache>.results/<run_id>.parquet``), read
together as one Arrow table. Appending is writing one new file atomically (one PUT on an
object store), so concurrent runs never lose or tear each other's rows, an interrupted run
leaves no row at all, and a retried run (same run_id) replaces its own row.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline import storage

# One column per concept. None (null) in loss, target, temperature, layer or C means the run
# does not use it (e.g. a feature student has no loss; label-only training no temperature).
# views: the cached views the student drew from (1: view 0 only); augment: the policy its
# training inputs went through (the cache's, replayed, with views > 1; fresh with views = 1).
# Costs: weights_bytes is the size on disk of the weights as safetensors, latency_b1_ms and
# latency_b256_ms the CPU milliseconds per sample at batch 1 and 256 (pipeline.latency); the
# teacher_ columns are the same figures of the teacher, measured when its cache was built
# (null for caches built before). calibration_temperature: the temperature fitted on val that
# turns a margin student's scores (LinearSVC) into the probabilities KL and ECE are scored on.
SCHEMA = pa.schema([
    ("run_id", pa.string()), ("time", pa.string()), ("model", pa.string()), ("kind", pa.string()),
    ("loss", pa.string()), ("target", pa.string()), ("temperature", pa.float64()),
    ("layer", pa.string()), ("views", pa.int64()), ("augment", pa.string()), ("alpha", pa.float64()),
    ("loss_weight", pa.float64()), ("standardize_logits", pa.bool_()), ("student_layer", pa.string()),
    ("seed", pa.int64()), ("epochs", pa.int64()),
    ("C", pa.string()),
    ("test_accuracy", pa.float64()), ("val_accuracy", pa.float64()),
    ("teacher_agreement", pa.float64()), ("kl_teacher_student", pa.float64()), ("ece", pa.float64()),
    ("calibration_temperature", pa.float64()),
    ("params", pa.int64()), ("weights_bytes", pa.int64()), ("fit_seconds", pa.float64()),
    ("latency_b1_ms", pa.float64()), ("latency_b256_ms", pa.float64()),
    ("teacher_params", pa.int64()), ("teacher_weights_bytes", pa.int64()),
    ("teacher_latency_b1_ms", pa.float64()), ("teacher_latency_b256_ms", pa.float64()),
    ("teacher_test_accuracy", pa.float64()), ("teacher_fingerprint", pa.string()),
    ("dataset_fingerprint", pa.string()), ("cache", pa.string()), ("run_dir", pa.string()),
])


def results_dir(cache_root) -> storage.Location:
    cache_root = storage.location(cache_root)
    return cache_root.parent / f"{cache_root.name}.results"


def append_row(directory, row: dict[str, Any]) -> storage.Location:
    """Write ``row`` (exactly the SCHEMA's keys: a key the schema lacks would vanish from the
    table, so it is a bug, not a choice) as one new Parquet file of the table."""
    if set(row) != set(SCHEMA.names):
        raise ValueError(f"a results row must hold exactly the SCHEMA's columns; extra: "
                         f"{sorted(set(row) - set(SCHEMA.names))}, missing: {sorted(set(SCHEMA.names) - set(row))}")
    table = pa.Table.from_pylist([row], schema=SCHEMA)
    path = storage.location(directory) / f"{row['run_id']}.parquet"
    storage.write_bytes(path, storage.parquet_bytes(table))
    return path


def read_results(directory) -> pa.Table:
    directory = storage.location(directory)
    names = sorted(n for n in storage.files(directory) if n.endswith(".parquet") and "/" not in n)
    if not names:
        return SCHEMA.empty_table()
    return pa.concat_tables([_read_row(directory / n) for n in names]).sort_by("time")


def _read_row(path) -> pa.Table:
    """One row file as the current SCHEMA. Rows written before the results table had one name
    per concept (a column ``T``, 0 for "unused"; ``loss`` holding ``target=labels``, ``soft`` or
    ``-`` for students without a loss) are translated; columns they lack get their "unused"
    value (``views``: 1, the others null)."""
    table = storage.read_table(path)
    if set(table.column_names) == set(SCHEMA.names):
        return table.select(SCHEMA.names).cast(SCHEMA)
    row = table.to_pylist()[0]
    if "T" in row:
        loss = row.get("loss") or ""
        row["temperature"] = row.pop("T") or None
        row["target"] = loss[len("target="):] if loss.startswith("target=") else None
        row["loss"] = None if loss in ("-", "soft", "") or loss.startswith("target=") else loss
        row["layer"] = row.get("layer") or None
        row["C"] = row.get("C") or None
    row.setdefault("views", 1)
    # latency_ms (rows before the teacher comparison) timed a block of up to 1,024 rows: no
    # column now measures that, so it is dropped rather than renamed
    return pa.Table.from_pylist([{n: row.get(n) for n in SCHEMA.names}], schema=SCHEMA)
