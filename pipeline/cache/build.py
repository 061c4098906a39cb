"""The build: one builder per cache (a lock, or a lease on object storage), a new cache created
with its manifest written last, the shards that have no completion record computed, and the
manifest finalised once every shard is done. An interrupted build resumes byte-identically;
re-running a complete one does nothing; a cache is only ever resumed by a build with its own key.

The commit protocol needs no rename, so it holds on object stores too (docs/CACHE_FORMAT.md,
"Commit protocol"): every object is written whole, once per content (a retried shard writes
the same bytes); a shard is done when its completion record exists, written after its data;
the manifest is the commit point, of the cache's creation (status ``building``) and of its
completion (status ``complete``, written after the index). Locally, creation is also
atomic: the new cache is assembled in a private directory and renamed into place."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.cache import format as fmt
from pipeline.cache.execute import run_jobs, shard_jobs
from pipeline.cache.lock import cache_lock
from pipeline.cache.plan import codecs, now
from pipeline.config import CacheConfig, from_record
from pipeline.data import Dataset
from pipeline.errors import Interrupted, KdError, first_line
from pipeline.hf import tokenizer_difference
from pipeline.io import fsync_dir
from pipeline.provenance import save_config
from pipeline.settings import resolve
from pipeline.sparse import mode_of
from pipeline.teachers import TeacherSpec


def build_cache(root: Path, cfg: CacheConfig, dataset: Dataset, spec: TeacherSpec,
                manifest: dict[str, Any], progress: bool = True,
                measure_teacher: Callable[[], dict] | None = None) -> tuple[dict[str, Any], dict]:
    """Build (or resume, or skip) the cache at ``root``. Returns (manifest, this run's stats).
    ``measure_teacher()`` (e.g. :func:`pipeline.cache.plan.teacher_cost`) is called once, when
    the cache is created, and what it returns is recorded in the manifest's ``teacher``."""
    with _storage_errors(root), cache_lock(root) as lock:
        # Holding the lock, no live writer owns a temporary file: what is left was a killed run's.
        fmt.remove_temporaries(root)
        if (root / fmt.MANIFEST).is_file():
            existing = fmt.read_manifest(root)
            if existing.get("key") != manifest["key"]:
                if not cfg.overwrite:
                    raise KdError(f"cache {root} was built from {_difference(existing, manifest)}; "
                                  "pass cache=NEW_PATH for a new cache, or overwrite=true to replace it")
                remove_cache(root)
            elif existing["status"] == "complete":
                # A run killed between the final manifest and the clean-up leaves parts/ behind.
                storage.remove_tree(root / fmt.PARTS)
                if cfg.repair:
                    return existing, _repair(root, cfg, dataset, spec, existing, progress)
                # (the fast path: a complete cache is not re-read; repair=true checks every byte)
                return existing, {"computed_rows": 0, "computed_outputs": 0, "skipped": True,
                                  "seconds": 0.0, "repaired": []}
            else:
                manifest = existing  # resume: keep the original creation record
        elif _foreign(root):
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
        except KdError as exc:
            # Bad input (e.g. the teacher emits NaN) would fail again on resume: leave nothing
            # half-written behind. Interruptions, crashes and disk errors keep it resumable.
            if created and not isinstance(exc, Interrupted):
                storage.remove_tree(root)
            raise
        seconds = time.perf_counter() - t0
        # A dask worker killed mid-write leaves its temporaries (its shard was written whole
        # again elsewhere); every shard is done and the lock is held: none is live.
        fmt.remove_temporaries(root)
        lock.check()  # a build that lost its lease must not commit
        manifest = _finalise(root, manifest, done, {"seconds": round(seconds, 3),
                                                    "computed_rows": todo_rows})
        return manifest, {"computed_rows": todo_rows, "computed_outputs": todo_outputs,
                          "skipped": False, "seconds": seconds, "repaired": []}


# What a repair may take from its own command line: how the work runs, never what it computes.
RUN_KEYS = ("scheduler", "workers", "streams", "threads", "decoders")


def repair_settings(cfg: CacheConfig) -> CacheConfig:
    """For ``repair=true``: the settings the cache at ``cfg.cache`` was built with (its
    config.json), so that ``kdcache cache cache=PATH repair=true`` needs nothing else. Of
    ``cfg``, only the :data:`RUN_KEYS` given (not at their defaults) are taken: the recorded
    ones by default, since torch's thread count per forward can change the last bits of an
    output. Any other key given that differs from the record is refused (a repair with other
    settings would be another cache)."""
    if not cfg.cache:
        raise KdError("repair=true needs cache=PATH, the cache to repair")
    root = storage.location(cfg.cache)
    with _storage_errors(root):
        fmt.read_manifest(root)  # a clear error for a path that is no cache
        try:
            record = json.loads((root / fmt.CONFIG).read_text())["config"]
        except (FileNotFoundError, ValueError, UnicodeDecodeError, KeyError, TypeError):
            raise KdError(f"{root / fmt.CONFIG} is missing or damaged, so the settings the cache "
                          "was built with are unknown; delete the cache and build it again") from None
    built = from_record(CacheConfig, record)
    default = resolve(CacheConfig, [])
    given = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(CacheConfig)
             if getattr(cfg, f.name) != getattr(default, f.name) and f.name not in ("cache", "repair")}
    for key, value in given.items():
        if key not in RUN_KEYS and value != getattr(built, key):
            raise KdError(f"{key}={value} differs from the {getattr(built, key)!r} cache {root} was "
                          "built with; repair=true uses the cache's own settings: drop the key")
    return dataclasses.replace(built, cache=cfg.cache, repair=True,
                               **{k: v for k, v in given.items() if k in RUN_KEYS})


class StorageError(KdError):
    """The filesystem refused a read or write (full disk, permissions, I/O error). Unlike bad
    input, the cache built so far stays: fix the storage and re-run to resume."""


@contextlib.contextmanager
def _storage_errors(root):
    try:
        yield
    except KdError:
        raise
    except Exception as exc:
        remote = storage.describe_error(exc, root) if storage.is_remote(root) else None
        if remote is None and not isinstance(exc, OSError):
            raise
        what = remote or f"{exc.strerror or exc} ({exc.filename or root})"
        try:
            started = (root / fmt.MANIFEST).is_file()
        except Exception:  # e.g. the very path is too long, or the store is unreachable
            started = False
        if not started:
            raise StorageError(remote or f"cannot create cache {root}: {what}; choose a writable "
                               "cache=PATH or fix its permissions") from None
        if remote:
            raise StorageError(f"{remote}; the shards done so far stay: re-run the same command "
                               "to resume") from None
        raise StorageError(f"storage failed while building cache {root}: {what}; free space or fix "
                           "permissions, then re-run the same command to resume") from None


def _foreign(root) -> bool:
    """Whether ``root`` holds something that is not a kdcache cache (there is no manifest).
    On an object store, a creation killed before its manifest (or a deletion killed after it)
    leaves kdcache's own objects only, beside a config.json of a cache build: those are
    removed here, so the creation starts again."""
    if not storage.is_remote(root):
        return root.exists() and (not root.is_dir() or any(root.iterdir()))
    names = storage.files(root)
    ours = (fmt.ARRAYS + "/", fmt.INDEX + "/", fmt.PARTS + "/")
    if names and all(n == fmt.CONFIG or n.startswith(ours) for n in names) and _cache_config(root):
        storage.remove_tree(root)
        return False
    return bool(names)


def _cache_config(root) -> bool:
    try:
        return json.loads((root / fmt.CONFIG).read_text()).get("kind") == CacheConfig.__name__
    except (FileNotFoundError, ValueError, UnicodeDecodeError, AttributeError):
        return False


def remove_cache(root) -> None:
    """Delete a cache, its manifest (the commit point) first: a reader, or a deletion killed
    mid-way, never meets a manifest whose arrays are gone."""
    storage.remove_file(root / fmt.MANIFEST)
    storage.remove_tree(root)


def _difference(old: dict, new: dict) -> str:
    if "tokenizer" in old and "tokenizer" in new:  # text caches: how documents became ids first
        what = tokenizer_difference(old["tokenizer"], new["tokenizer"])
        if what:
            return f"another tokenization ({what})"
        if old.get("tokens") != new.get("tokens"):
            differ = sorted(s for s in old["tokens"] if old["tokens"][s] != new["tokens"].get(s))
            return (f"other token ids of the same tokenizer on {', '.join(differ)} (another version of "
                    "the tokenizers library?)" if old["dataset"]["fingerprint"] == new["dataset"]["fingerprint"]
                    else "other documents (another dataset fingerprint)")
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


def _initialise(root, cfg: CacheConfig, manifest: dict) -> None:
    """Create arrays, config and manifest in a private directory, then rename it into place,
    so a crash here leaves either nothing or a whole empty cache. On an object store (no
    rename) they are written in place, the manifest last: without it, what is there is
    recognised as a killed creation (:func:`_foreign`) and redone."""
    import zarr

    if storage.is_remote(root):
        with zarr.config.set({"json_indent": None}):
            group = zarr.open_group(storage.zarr_store(root / fmt.ARRAYS, read_only=False),
                                    mode="w", zarr_format=3)
            _create_arrays(group, cfg, manifest)
        save_config(cfg, root / fmt.CONFIG)
        fmt.write_manifest(root, manifest)
        return
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
    if fmt.is_token_cache(manifest):
        return _create_token_arrays(group, cfg, manifest)
    for split, info in manifest["splits"].items():
        views = fmt.split_views(manifest, split)
        arrays = {fmt.logits_key(split): ((manifest["num_classes"],), cfg.dtype)}
        if "logits" in manifest:  # sparse: the mode's arrays in place of the dense logits
            arrays = {key: (fmt.sparse_width(key, manifest), fmt.array_dtype(key, manifest))
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


def _create_token_arrays(group, cfg: CacheConfig, manifest: dict) -> None:
    """A token cache's arrays: per split the windows' ids, mask and segments [N, T], and the
    logits mode's arrays [N, T, ...] (positions in place of views; see pipeline.cache.format)."""
    seq_len = int(manifest["lm"]["seq_len"])
    for split, info in manifest["splits"].items():
        arrays = {fmt.tokens_key(split, part): ((), dtype) for part, dtype in fmt.TOKEN_PARTS.items()}
        if manifest["logits"]["mode"] == "dense":
            arrays[fmt.logits_key(split)] = ((manifest["num_classes"],), cfg.dtype)
        else:
            arrays.update({key: (fmt.sparse_width(key, manifest), fmt.array_dtype(key, manifest))
                           for key in fmt.logits_keys(split, manifest)})
        for key, (shape, dtype) in arrays.items():
            group.create_array(key, shape=(info["rows"], seq_len) + shape, dtype=dtype,
                               shards=(cfg.shard_size, seq_len) + shape,
                               chunks=(cfg.chunk_size, seq_len) + shape,
                               compressors=codecs(cfg.compression), fill_value=0,
                               dimension_names=("row", "position") + tuple(f"d{i}" for i in range(len(shape))))


def _records(root, manifest: dict) -> dict[tuple[str, int], dict]:
    """The completion records of the shards that are done (record and index part present),
    from one listing of parts/."""
    names = storage.files(root / fmt.PARTS)
    done = {}
    for split in manifest["splits"]:
        for name in sorted(n for n in names if n.startswith(f"{split}/") and n.endswith(".json")):
            record = json.loads((root / fmt.PARTS / name).read_text())
            part, _ = fmt.part_paths(root, split, record["shard"])
            # a record of another cache once at this path (a straggling writer of a build
            # overwritten since) is not done: its shard is computed again
            if f"{split}/{part.name}" in names and record.get("key", manifest["key"]) == manifest["key"]:
                done[(split, record["shard"])] = record
    return done


def _finalise(root, manifest: dict, done: dict, run: dict) -> dict:
    """Fold the shard records into the manifest and write the per-split index, once all
    shards are done; otherwise leave the cache resumable."""
    missing = [(s, k) for s, info in manifest["splits"].items() for k in range(info["shards"])
               if (s, k) not in done]
    if missing:
        raise KdError(f"{len(missing)} shards of {root} are not done; re-run to finish them")
    shards, splits = {}, {}
    for split, info in manifest["splits"].items():
        correct = sum(done[(split, k)]["correct"] for k in range(info["shards"]))
        splits[split] = {**info, "accuracy": round(correct / info["rows"], 6),
                         "index_sha256": _write_index(root, manifest, split)}
        if fmt.is_token_cache(manifest):  # per target token: next-token accuracy and mean NLL
            tokens = sum(done[(split, k)]["tokens"] for k in range(info["shards"]))
            nll = sum(done[(split, k)]["nll_sum"] for k in range(info["shards"]))
            splits[split].update(accuracy=round(correct / max(1, tokens), 6), tokens=tokens,
                                 teacher_nll=round(nll / max(1, tokens), 6))
        shards[split] = [{k: v for k, v in done[(split, k)].items() if k not in ("host", "key")}
                         for k in range(info["shards"])]
    manifest = {**manifest, "status": "complete", "completed": now(), "splits": splits,
                "shards": shards, "last_run": run}
    manifest["bytes"] = _disk_bytes(root)
    fmt.write_manifest(root, manifest)  # the commit point
    storage.remove_tree(root / fmt.PARTS)
    return manifest


def _write_index(root, manifest: dict, split: str) -> str:
    """Write ``index/<split>.parquet`` from the split's index parts (every shard's); returns
    its sha256."""
    info = manifest["splits"][split]
    parts = [fmt.part_paths(root, split, k)[0] for k in range(info["shards"])]
    table = pa.concat_tables([storage.read_table(p) for p in parts])
    rows = table.column("row").to_numpy()
    if len(rows) != info["rows"] or not np.array_equal(rows, np.arange(info["rows"])):
        raise KdError(f"index parts of {split} in {root} do not cover rows 0..{info['rows'] - 1}; "
                      "delete the cache and rebuild it")
    table = table.replace_schema_metadata({"kdcache.split": split, "kdcache.key": manifest["key"]})
    data = storage.parquet_bytes(table)
    storage.write_bytes(fmt.index_path(root, split), data)
    return hashlib.sha256(data).hexdigest()


def _repair(root, cfg: CacheConfig, dataset: Dataset, spec: TeacherSpec, manifest: dict,
            progress: bool) -> dict:
    """``repair=true`` on a complete cache: recompute every shard whose stored bytes fail
    their recorded sha256, and every shard of a split whose index fails its own (the index
    parts are gone once a cache is complete: the index is rebuilt from fresh ones). A shard is
    a pure function of the cache's key (the resume guarantee), so the repaired cache is
    byte-identical to an undamaged build and its manifest stays as it is; the whole cache is
    checked again after. Reads every shard once, which is why only repair=true does it."""
    from pipeline.cache.reader import TeacherCache
    from pipeline.cache.verify import damaged_indexes, damaged_shards  # imports the teachers' code

    cache = TeacherCache(root, manifest)
    indexes = damaged_indexes(cache)
    bad = set(damaged_shards(cache))
    bad |= {(s, k) for s in indexes for k in range(manifest["splits"][s]["shards"])}
    recorded = {(s, r["shard"]): r for s, records in manifest["shards"].items() for r in records}
    jobs = list(shard_jobs(root, cfg, dataset, spec, manifest,
                           {at: r for at, r in recorded.items() if at not in bad}))
    fresh: dict[tuple[str, int], dict] = {}
    t0 = time.perf_counter()
    if jobs:
        total = sum(s["rows"] for s in manifest["splits"].values())
        try:
            run_jobs(jobs, cfg, dataset, lambda r: fresh.__setitem__((r["split"], r["shard"]), r),
                     progress, total, total - sum(j.stop - j.start for j in jobs))
        except (KdError, OSError):
            raise
        except Exception as exc:  # e.g. Zarr refusing a write through damaged array metadata
            raise KdError(f"cache {root} cannot be repaired ({type(exc).__name__}: "
                          f"{first_line(exc)}); delete the cache and build it again") from None
        for split in indexes:
            _write_index(root, manifest, split)
        storage.remove_tree(root / fmt.PARTS)
    # What was recorded must be what is stored now: a teacher that computes other bytes than
    # it did at build time (another device or library version) cannot repair this cache.
    differ = sorted(f"{s} shard {k}" for (s, k), r in fresh.items()
                    if r["sha256"] != recorded[(s, k)]["sha256"])
    if differ:
        raise KdError(f"cache {root} cannot be repaired: {', '.join(differ[:5])} recomputed to other "
                      "bytes than were recorded (another device or library version?); delete the "
                      "cache and build it again")
    cache = TeacherCache(root, manifest)
    still = [f"{s} shard {k}" for s, k in damaged_shards(cache)] + [f"index {s}" for s in damaged_indexes(cache)]
    if still:
        raise KdError(f"cache {root} cannot be repaired: {', '.join(still[:5])} still fail their "
                      "checksums (is its array metadata damaged?); delete the cache and build it again")
    return {"computed_rows": sum(j.stop - j.start for j in jobs),
            "computed_outputs": sum((j.stop - j.start) * j.views for j in jobs),
            "skipped": not jobs, "seconds": time.perf_counter() - t0,
            "repaired": sorted(f"{s} shard {k}" for s, k in bad)}


def _disk_bytes(root) -> int:
    return sum(size for name, size in storage.files(root).items() if not name.startswith(fmt.PARTS + "/"))


