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
from pipeline.errors import KdError

# A row is the run's config — its run keys and every hyperparameter its student and loss
# declare (pipeline.students.hyperparameters), one column each, typed by the value — plus the
# measurements below, whose columns are fixed. So a new hyperparameter reaches the table (and
# the leaderboard's experiment key, pipeline.report) with nothing here to edit. Rows of
# different students hold different columns; read together, a column a row lacks is null
# (also for tables written before a hyperparameter existed).
# Run keys: model, loss, layer, views (the cached views the student drew from; 1: view 0),
# seed. None (null) in loss, layer or a hyperparameter means the run does not use it.
# views_policy: the augmentation policy of the cached views it drew from (views > 1).
# Costs: weights_bytes is the size on disk of the weights as safetensors, latency_b1_ms and
# latency_b256_ms the CPU milliseconds per sample at batch 1 and 256 (pipeline.latency),
# measured when the run finished; the teacher_ columns are the same figures of the teacher,
# measured when its cache was built (context only: `kdcache report` compares teacher and
# students side by side). calibration_temperature: the temperature fitted on val that turns a
# margin student's scores (LinearSVC) into the probabilities KL and ECE are scored on.
# Language-model runs (a token cache): test_accuracy / val_accuracy are next-token accuracy over
# the positions with a target, teacher_agreement the share where the student's top token is the
# teacher's top-1, kl_teacher_student the KL on the K + tail support at T = 1 (null from sample:
# caches), ece null; LM_MEASURED holds their perplexities (exp of the mean NLL of the true next
# tokens) and tokens per second (CPU, at 8 windows per call), the teacher's beside them (its
# test perplexity from the cache's index, its speed as timed at build); latency_b1_ms is per
# window at batch 1, latency_b256_ms null. Classification rows hold null in LM_MEASURED.
RUN_KEYS = pa.schema([("model", pa.string()), ("loss", pa.string()), ("layer", pa.string()),
                      ("views", pa.int64()), ("seed", pa.int64())])
MEASURED = pa.schema([
    ("run_id", pa.string()), ("time", pa.string()), ("kind", pa.string()),
    ("views_policy", pa.string()),
    ("test_accuracy", pa.float64()), ("val_accuracy", pa.float64()),
    ("teacher_agreement", pa.float64()), ("kl_teacher_student", pa.float64()), ("ece", pa.float64()),
    ("calibration_temperature", pa.float64()),
    ("params", pa.int64()), ("weights_bytes", pa.int64()), ("fit_seconds", pa.float64()),
    ("latency_b1_ms", pa.float64()), ("latency_b256_ms", pa.float64()),
    ("teacher_params", pa.int64()), ("teacher_weights_bytes", pa.int64()),
    ("teacher_latency_b1_ms", pa.float64()), ("teacher_latency_b256_ms", pa.float64()),
    ("teacher_test_accuracy", pa.float64()), ("teacher_fingerprint", pa.string()),
    ("dataset_fingerprint", pa.string()), ("cache", pa.string()), ("run_dir", pa.string()),
    ("test_perplexity", pa.float64()), ("val_perplexity", pa.float64()), ("tokens_per_s", pa.float64()),
    ("teacher_test_perplexity", pa.float64()), ("teacher_tokens_per_s", pa.float64()),
])
LM_MEASURED = ("test_perplexity", "val_perplexity", "tokens_per_s", "teacher_test_perplexity",
               "teacher_tokens_per_s")  # null in classification rows
# Columns of rows written before the config was derived from the declarations, which no
# declaration names any more: "augment" (now the student's hyperparameter of that name, or
# views_policy), "C" as text (now a number or "auto" kept as text)
_TYPES = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}


def config_columns(cfg) -> dict[str, Any]:
    """A run's config as results columns: its run keys and every hyperparameter (a
    ``float | str`` value such as C=auto as text)."""
    hyper = {k: (str(v) if k == "C" and v is not None else v) for k, v in cfg.params.items()}
    clash = set(hyper) & (set(RUN_KEYS.names) | set(MEASURED.names))
    if clash:
        raise KdError(f"model {cfg.model} declares hyperparameters named like results columns "
                      f"({', '.join(sorted(clash))}); rename them in its constructor")
    return {"model": cfg.model, "loss": cfg.loss, "layer": cfg.layer, "views": int(cfg.views),
            "seed": cfg.seed, **hyper}


def config_names(table_names: list[str]) -> list[str]:
    """The columns of a results table that come from runs' configs (run keys and
    hyperparameters), in a stable order: run keys first, then hyperparameters by name."""
    measured = set(MEASURED.names)
    hyper = sorted(n for n in table_names if n not in measured and n not in RUN_KEYS.names)
    return [*RUN_KEYS.names, *hyper]


def _schema_of(row: dict[str, Any]) -> pa.Schema:
    fields = [RUN_KEYS.field(n) if n in RUN_KEYS.names else MEASURED.field(n)
              if n in MEASURED.names else pa.field(n, pa.null() if v is None else _TYPES.get(type(v), pa.string()))
              for n, v in row.items()]
    return pa.schema(fields)


def results_dir(cache_root) -> storage.Location:
    cache_root = storage.location(cache_root)
    return cache_root.parent / f"{cache_root.name}.results"


def append_row(directory, row: dict[str, Any]) -> storage.Location:
    """Write ``row`` (every run key and measured column, plus the run's hyperparameters) as one
    new Parquet file of the table. A measured column missing is a bug, not a choice."""
    missing = sorted((set(RUN_KEYS.names) | set(MEASURED.names)) - set(row))
    if missing:
        raise ValueError(f"a results row lacks columns: {missing}")
    table = pa.Table.from_pylist([row], schema=_schema_of(row))
    path = storage.location(directory) / f"{row['run_id']}.parquet"
    storage.write_bytes(path, storage.parquet_bytes(table))
    return path


def read_results(directory) -> pa.Table:
    """Every row of the table; a column some rows lack is null in those rows."""
    directory = storage.location(directory)
    names = sorted(n for n in storage.files(directory) if n.endswith(".parquet") and "/" not in n)
    if not names:
        return pa.schema([*RUN_KEYS, *MEASURED]).empty_table()
    tables = [_read_row(directory / n) for n in names]
    return pa.concat_tables(tables, promote_options="permissive").sort_by("time")


def _read_row(path) -> pa.Table:
    """One row file. Rows written before the results table had one name per concept (a column
    ``T``, 0 for "unused"; ``loss`` holding ``target=labels``, ``soft`` or ``-`` for students
    without a loss) and before hyperparameters were derived from declarations (``augment``
    holding the cached views' policy) are translated; columns they lack read as null."""
    table = storage.read_table(path)
    row = table.to_pylist()[0]
    if "T" in row:
        loss = row.get("loss") or ""
        row["temperature"] = row.pop("T") or None
        row["target"] = loss[len("target="):] if loss.startswith("target=") else None
        row["loss"] = None if loss in ("-", "soft", "") or loss.startswith("target=") else loss
        row["layer"] = row.get("layer") or None
        row["C"] = row.get("C") or None
    row.setdefault("views", 1)
    if "views_policy" not in row:  # before: "augment" held the views' policy with views > 1
        row["views_policy"] = row.get("augment") if (row.get("views") or 1) > 1 else None
        if (row.get("views") or 1) > 1:
            row["augment"] = None
    # latency_ms (rows before the teacher comparison) timed a block of up to 1,024 rows: no
    # column now measures that, so it is dropped rather than renamed
    row.pop("latency_ms", None)
    for name in MEASURED.names:
        row.setdefault(name, None)
    return pa.Table.from_pylist([row], schema=_schema_of(row))
