"""Storage: bytes per sample on disk vs dense float32.

Measured at each setting, dtype float16 / float32 × compression none / zstd (floor, for the
default float16 + none: on-disk / dense float32 ≤ 0.55)
    on disk      the sum of the sizes of every file under ``arrays.zarr/<split>/logits`` (and,
                 separately, ``arrays.zarr/<split>/features/<layer>``) over all three splits:
                 compressed chunks, shard indexes, CRCs and Zarr metadata included.
    dense f32    rows × values per row × 4 bytes: what the same numbers take as one plain
                 float32 array (e.g. a ``.npy``, minus its header).

float16 halves the dense size, so the floor allows 10% for metadata, shard indexes and CRCs.
The other settings are reported for comparison (no floor).
Values must be realistic for compression to mean anything: a *trained* digits teacher
(cnn_small, trained once in the work dir) and a random-weight resnet18 on synthetic 3x32x32.
The whole cache directory (index Parquet files, manifest) is reported too, for context.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.common import digits_cache, dir_bytes, ensure_cache, figure, log, main_for, result, table

NAME = "storage"
FLOOR = 0.55


def measure(root: Path) -> list[dict]:
    from pipeline.cache import format as fmt
    from pipeline.cache import open_cache

    cache = open_cache(root)
    rows = sum(cache.num_rows(s) for s in cache.splits)
    kinds = {"logits": [fmt.logits_key(s) for s in cache.splits]}
    for layer in cache.layers:
        kinds[f"features/{layer}"] = [fmt.feature_key(s, layer) for s in cache.splits]
    out = []
    for kind, keys in kinds.items():
        values = int(np.prod(cache._array(keys[0]).shape[1:]))  # per row (views x values)
        disk = sum(dir_bytes(root / fmt.ARRAYS / k) for k in keys)
        dense = rows * values * 4
        out.append({"cache": root.name, "dtype": cache.manifest["dtype"],
                    "compression": cache.manifest["compression"], "array": kind,
                    "rows": rows, "values_per_row": values, "disk_bytes": disk,
                    "dense_f32_bytes": dense, "bytes_per_sample": disk / rows,
                    "dense_bytes_per_sample": dense / rows, "ratio": disk / dense,
                    "cache_dir_bytes": dir_bytes(root)})
    return out


def run(quick: bool, workdir: Path) -> dict:
    t_start = time.perf_counter()
    n = 2_000 if quick else 10_000
    caches = []
    for dtype in ("float16", "float32"):
        for compression in ("none", "zstd"):
            caches.append(digits_cache(workdir, dtype, compression))
            caches.append(ensure_cache({
                "dataset": f"synthetic:{n}:3x32x32:10", "teacher": "resnet18",
                "teacher_ckpt": "random", "dtype": dtype, "compression": compression,
                "cache": workdir / "caches" / f"storage-resnet18-{n}-{dtype}-{compression}"}))
    measured = [m for root in caches for m in measure(root)]
    log(f"{NAME}: measured {len(caches)} caches")
    figures, rows = [], []
    for m in sorted(measured, key=lambda m: (m["cache"][:6], m["dtype"], m["compression"], m["array"])):
        default = m["dtype"] == "float16" and m["compression"] == "none"
        floor = FLOOR if default else None  # the floor is for the default settings
        figures.append(figure(f"on-disk/dense f32, {m['cache']} {m['array']} ({m['dtype']}, "
                              f"compression {m['compression']})",
                              round(m["ratio"], 4), "x", floor=floor, op="<=",
                              bytes_per_sample=round(m["bytes_per_sample"], 2),
                              dense_bytes_per_sample=m["dense_bytes_per_sample"], rows=m["rows"]))
        verdict = "—" if floor is None else ("PASS" if m["ratio"] <= floor else "FAIL")
        rows.append([m["cache"], m["dtype"], m["compression"], m["array"], f"{m['rows']:,}",
                     m["values_per_row"],
                     f"{m['bytes_per_sample']:.2f}", f"{m['dense_bytes_per_sample']:.0f}",
                     f"{m['ratio']:.3f}", verdict, f"{m['cache_dir_bytes'] / m['rows']:.1f}"])
    tables = [table("Bytes per sample on disk vs dense float32",
                    ["cache", "dtype", "compression", "array", "rows", "values/row",
                     "bytes/sample on disk", "dense f32 bytes/sample",
                     "ratio (default float16 + none: floor ≤ 0.55)", "verdict",
                     "whole cache dir bytes/sample"], rows,
                    note="on disk = every file under arrays.zarr/<split>/<array> summed over the "
                         "three splits (chunks, shard indexes, CRCs, zarr.json).")]
    return result(NAME, "bytes per sample on disk vs dense float32", figures, tables, [],
                  {"quick": quick, "synthetic_rows": n}, time.perf_counter() - t_start) | {"measured": measured}


if __name__ == "__main__":
    main_for(run)
