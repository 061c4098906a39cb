"""The build: one builder per cache (a lock), a new cache assembled privately and renamed into
place, the shards that have no completion record computed, and the manifest finalised once
every shard is done. An interrupted build resumes byte-identically; re-running a complete one
does nothing; a cache is only ever resumed by a build with its own key."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache import format as fmt
from pipeline.cache.execute import run_jobs, shard_jobs
from pipeline.cache.plan import codecs, now
from pipeline.config import CacheConfig, save_config
from pipeline.data import Dataset
from pipeline.errors import KdError
from pipeline.io import atomic_path, fsync_dir, sha256_file
from pipeline.sparse import mode_of
from pipeline.teachers import TeacherSpec


class CacheLock:
    """One builder per cache directory. ``flock`` is released by the kernel when its holder dies,
    so a lock left by a killed run never blocks the next one."""

    def __init__(self, root: Path):
        self.path = root.parent / f".{root.name}.lock"

    def __enter__(self) -> "CacheLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise KdError(f"cache {self.path.parent / self.path.name[1:-5]} is being built by "
                          f"{holder}; wait for it to finish (a second build would race it)") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def build_cache(root: Path, cfg: CacheConfig, dataset: Dataset, spec: TeacherSpec,
                manifest: dict[str, Any], progress: bool = True,
                measure_teacher: Callable[[], dict] | None = None) -> tuple[dict[str, Any], dict]:
    """Build (or resume, or skip) the cache at ``root``. Returns (manifest, this run's stats).
    ``measure_teacher()`` (e.g. :func:`pipeline.cache.plan.teacher_cost`) is called once, when
    the cache is created, and what it returns is recorded in the manifest's ``teacher``."""
    with _storage_errors(root), CacheLock(root):
        # Holding the lock, no live writer owns a temporary file: what is left was a killed run's.
        fmt.remove_temporaries(root)
        if (root / fmt.MANIFEST).is_file():
            existing = fmt.read_manifest(root)
            if existing.get("key") != manifest["key"]:
                if not cfg.overwrite:
                    raise KdError(f"cache {root} was built from {_difference(existing, manifest)}; "
                                  "pass cache=NEW_PATH for a new cache, or overwrite=true to replace it")
                shutil.rmtree(root)
            elif existing["status"] == "complete":
                # A run killed between the final manifest and the clean-up leaves parts/ behind.
                shutil.rmtree(root / fmt.PARTS, ignore_errors=True)
                return existing, {"computed_rows": 0, "computed_outputs": 0, "skipped": True,
                                  "seconds": 0.0}
            else:
                manifest = existing  # resume: keep the original creation record
        elif root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise KdError(f"{root} exists and is not a kdcache cache; choose another cache=PATH")
        created = not (root / fmt.MANIFEST).is_file()
        if created:
            if measure_teacher is not None:
                manifest = {**manifest, "teacher": {**manifest["teacher"], **measure_teacher()}}
            _initialise(root, cfg, manifest)

        done = _records(root, manifest)
        jobs = list(shard_jobs(root, cfg, dataset, spec, manifest, done))
        total = sum(s["rows"] for s in manifest["splits"].values())
        todo_rows = sum(j.stop - j.start for j in jobs)
        todo_outputs = sum((j.stop - j.start) * j.views for j in jobs)  # teacher forwards, per row and view
        t0 = time.perf_counter()
        try:
            run_jobs(jobs, cfg, dataset, lambda r: done.__setitem__((r["split"], r["shard"]), r),
                 progress, total, total - todo_rows)
        except KdError:
            # Bad input (e.g. the teacher emits NaN) would fail again on resume: leave nothing
            # half-written behind. Interruptions, crashes and disk errors keep it resumable.
            if created:
                shutil.rmtree(root, ignore_errors=True)
            raise
        seconds = time.perf_counter() - t0
        manifest = _finalise(root, manifest, done, {"seconds": round(seconds, 3),
                                                    "computed_rows": todo_rows})
        return manifest, {"computed_rows": todo_rows, "computed_outputs": todo_outputs,
                          "skipped": False, "seconds": seconds}


class StorageError(KdError):
    """The filesystem refused a read or write (full disk, permissions, I/O error). Unlike bad
    input, the cache built so far stays: fix the storage and re-run to resume."""


@contextlib.contextmanager
def _storage_errors(root: Path):
    try:
        yield
    except OSError as exc:
        what = f"{exc.strerror or exc} ({exc.filename or root})"
        try:
            started = (root / fmt.MANIFEST).is_file()
        except OSError:  # e.g. the very path is too long
            started = False
        if not started:
            raise StorageError(f"cannot create cache {root}: {what}; choose a writable cache=PATH "
                               "or fix its permissions") from None
        raise StorageError(f"storage failed while building cache {root}: {what}; free space or fix "
                           "permissions, then re-run the same command to resume") from None


def _difference(old: dict, new: dict) -> str:
    if old["teacher"]["fingerprint"] != new["teacher"]["fingerprint"]:
        return (f"another teacher (fingerprint {old['teacher']['fingerprint'][:12]}, this one is "
                f"{new['teacher']['fingerprint'][:12]})")
    if old["dataset"]["fingerprint"] != new["dataset"]["fingerprint"]:
        return (f"other data or splits (dataset fingerprint {old['dataset']['fingerprint'][:12]}, "
                f"this one is {new['dataset']['fingerprint'][:12]})")
    if old["preprocessing"] != new["preprocessing"]:
        return "other preprocessing"
    if old.get("logits") != new.get("logits"):
        return f"other logits (logits={mode_of(old).spec}, this one is {mode_of(new).spec})"
    if (old["views"], old.get("augment")) != (new["views"], new.get("augment")):
        return (f"other views ({old['views']} views, augment "
                f"{(old.get('augment') or {}).get('policy', 'none')})")
    return "other cache settings (layers, pool, dtype, compression or shard layout)"


def _initialise(root: Path, cfg: CacheConfig, manifest: dict) -> None:
    """Create arrays, config and manifest in a private directory, then rename it into place,
    so a crash here leaves either nothing or a whole empty cache."""
    import zarr

    tmp = root.parent / f".{root.name}.init-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        # compact zarr.json (~0.6 KB, not ~1.2 KB indented): a fixed cost per array that shows
        # in bytes per sample for small datasets
        with zarr.config.set({"json_indent": None}):
            group = zarr.open_group(tmp / fmt.ARRAYS, mode="w", zarr_format=3)
            _create_arrays(group, cfg, manifest)
        save_config(cfg, tmp / fmt.CONFIG)
        fmt.write_manifest(tmp, manifest)
        if root.exists():
            root.rmdir()  # an empty directory the user made for us
        os.rename(tmp, root)
        fsync_dir(root.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _create_arrays(group, cfg: CacheConfig, manifest: dict) -> None:
    for split, info in manifest["splits"].items():
        views = fmt.split_views(manifest, split)
        arrays = {fmt.logits_key(split): ((manifest["num_classes"],), cfg.dtype)}
        if "logits" in manifest:  # sparse: the mode's arrays in place of the dense logits
            k = manifest["logits"]["k"]
            arrays = {key: ((k,) if not key.endswith("/tail") else (2,), fmt.array_dtype(key, manifest))
                      for key in fmt.logits_keys(split, manifest)}
        arrays.update({fmt.feature_key(split, k): (tuple(v), cfg.dtype) for k, v in manifest["layers"].items()})
        if views > 1:
            arrays[fmt.augment_key(split)] = ((len(manifest["augment"]["params"]),), fmt.AUGMENT_DTYPE)
        for key, (shape, dtype) in arrays.items():
            group.create_array(key, shape=(info["rows"], views) + shape, dtype=dtype,
                               shards=(cfg.shard_size, views) + shape,
                               chunks=(cfg.chunk_size, views) + shape,
                               compressors=codecs(cfg.compression), fill_value=0,
                               dimension_names=("row", "view") + tuple(f"d{i}" for i in range(len(shape))))


def _records(root: Path, manifest: dict) -> dict[tuple[str, int], dict]:
    done = {}
    for split in manifest["splits"]:
        for path in sorted((root / fmt.PARTS / split).glob("*.json")):
            record = json.loads(path.read_text())
            part, _ = fmt.part_paths(root, split, record["shard"])
            if part.is_file():
                done[(split, record["shard"])] = record
    return done


def _finalise(root: Path, manifest: dict, done: dict, run: dict) -> dict:
    """Fold the shard records into the manifest and write the per-split index, once all
    shards are done; otherwise leave the cache resumable."""
    missing = [(s, k) for s, info in manifest["splits"].items() for k in range(info["shards"])
               if (s, k) not in done]
    if missing:
        raise KdError(f"{len(missing)} shards of {root} are not done; re-run to finish them")
    shards, splits = {}, {}
    for split, info in manifest["splits"].items():
        parts = [fmt.part_paths(root, split, k)[0] for k in range(info["shards"])]
        table = pa.concat_tables([pq.read_table(p) for p in parts])
        rows = table.column("row").to_numpy()
        if len(rows) != info["rows"] or not np.array_equal(rows, np.arange(info["rows"])):
            raise KdError(f"index parts of {split} in {root} do not cover rows 0..{info['rows'] - 1}; "
                          "delete the cache and rebuild it")
        path = fmt.index_path(root, split)
        table = table.replace_schema_metadata({"kdcache.split": split, "kdcache.key": manifest["key"]})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        correct = sum(done[(split, k)]["correct"] for k in range(info["shards"]))
        splits[split] = {**info, "accuracy": round(correct / info["rows"], 6),
                         "index_sha256": sha256_file(path)}
        shards[split] = [{k: v for k, v in done[(split, k)].items() if k not in ("host",)}
                         for k in range(info["shards"])]
    manifest = {**manifest, "status": "complete", "completed": now(), "splits": splits,
                "shards": shards, "last_run": run}
    manifest["bytes"] = _disk_bytes(root)
    fmt.write_manifest(root, manifest)
    shutil.rmtree(root / fmt.PARTS, ignore_errors=True)
    return manifest


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and fmt.PARTS not in p.parts)


