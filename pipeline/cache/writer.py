"""Stage one's engine: run the teacher over every shard of every split and write the cache.

One shard = ``shard_size`` consecutive rows of one split = one task. A task reads its inputs
(the next batch loads on a thread while the teacher runs on the current one), runs the teacher
under ``torch.inference_mode``, writes each array's whole Zarr shard in one call, fsyncs it,
writes the shard's index part, and only then writes its completion record. A re-run computes
exactly the shards without a record, so an interrupted build resumes and ends byte-identical to
an uninterrupted one. Tasks are idempotent, so Dask may safely run one twice.

In one process (the default, ``workers=1``) the shards share one pipeline: a thread loads
input batches ahead, ``streams`` threads run batches through the teacher side by side (on CPU,
one per core: see ``forward_streams``), the main thread collects each shard's outputs in batch
order, and a writer thread writes shard k while shard k+1 is computed.

Why whole shards, written once by one task: with Zarr v3 sharding, concurrent writers of one
shard lose rows silently, and many small writes into a shard are ~20x slower (PITFALLS.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import runtime
from pipeline.cache import format as fmt
from pipeline.config import CacheConfig, DataConfig, fingerprint, resolve, save_config
from pipeline.data import Dataset, open_dataset
from pipeline.errors import KdError
from pipeline.io import atomic_path, atomic_write_text, fsync_dir, fsync_file, sha256_file
from pipeline.teachers import Tapped, TeacherSpec, build_teacher

T = TypeVar("T")


# =========================================================================== the plan

def codecs(compression: str) -> list:
    """Inner-chunk codecs: optionally zstd, then always a CRC32C so a flipped byte fails loudly
    on read. Not compressing is the default: float16 already halves the bytes, zstd saves ~10%
    more on dense features but halves streaming speed (docs/BENCHMARKS.md)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return ([ZstdCodec(level=3)] if compression == "zstd" else []) + [Crc32cCodec()]


def codec_names(compression: str) -> list[str]:
    return (["zstd(level=3)"] if compression == "zstd" else []) + ["crc32c"]


AUTO_CHUNK_ROWS = (32, 256)  # the chunk sizes chunk_size=0 chooses from (rows)


def resolve_layout(cfg: CacheConfig, dataset: Dataset) -> CacheConfig:
    """``cfg`` with ``chunk_size=0`` (auto) made concrete for this dataset.

    Zarr stores the last chunk of every split whole, padding included: a fixed 256-row chunk
    pads digits' splits (1,221 / 216 / 360 rows) by 251 rows, 14% of the data. Auto takes the
    largest chunk of 32-256 rows (at most ``shard_size``) that pads the splits by at most 1% of
    their rows (256 for any large dataset; 72 for digits, 3 rows of padding), or failing that
    the one that pads least. ``shard_size`` is rounded down to a multiple of the chunk and
    capped at the largest split (a shard index has an entry per chunk, used or not).
    """
    if cfg.chunk_size:
        return cfg
    rows = [len(split) for split in dataset.splits.values()]
    smallest, largest = AUTO_CHUNK_ROWS[0], min(AUTO_CHUNK_ROWS[1], cfg.shard_size)
    candidates = range(largest, min(smallest, largest) - 1, -1)

    def padding(chunk: int) -> int:
        return sum(-n % chunk for n in rows)

    fitting = [c for c in candidates if padding(c) <= 0.01 * sum(rows)]
    chunk = fitting[0] if fitting else min(candidates, key=lambda c: (padding(c), -c))
    shard = min(max(1, cfg.shard_size // chunk), -(-max(rows) // chunk)) * chunk
    return dataclasses.replace(cfg, chunk_size=chunk, shard_size=shard)


def plan(cfg: CacheConfig, dataset: Dataset, spec: TeacherSpec, shapes: dict[str, tuple],
         num_params: int) -> dict[str, Any]:
    """The manifest of the cache these inputs define, before any shard is computed.

    ``key`` hashes everything that determines the cached bytes; two builds with the same key
    produce identical caches, and a cache is only ever resumed by a build with its own key.
    """
    splits = {}
    for name, split in dataset.splits.items():
        n = len(split)
        splits[name] = {"rows": n, "shards": -(-n // cfg.shard_size)}
    identity = {
        "teacher_fingerprint": spec.fingerprint,
        "dataset_fingerprint": dataset.fingerprint,
        "preprocessing": dataset.preprocessing,
        "layers": list(spec.layers), "pool": spec.pool,
        "dtype": cfg.dtype, "shard_size": cfg.shard_size, "chunk_size": cfg.chunk_size,
        "compression": cfg.compression, "views": fmt.VIEWS, "format_version": fmt.FORMAT_VERSION,
    }
    data_cfg = {f: getattr(cfg, f) for f in DataConfig.__dataclass_fields__}
    return {
        "format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION,
        "status": "building", "key": fingerprint(identity),
        "created": _now(),
        "teacher": {"arch": spec.arch, "ckpt": spec.ckpt, "seed": spec.seed if spec.ckpt == "random" else None,
                    "fingerprint": spec.fingerprint, "num_params": num_params,
                    "input_shape": list(spec.input_shape), "num_classes": spec.num_classes},
        "dataset": {**dataset.describe(), "fingerprint": dataset.fingerprint, "config": data_cfg},
        "preprocessing": dataset.preprocessing,
        "temperature": cfg.t, "views": fmt.VIEWS, "dtype": cfg.dtype,
        "shard_size": cfg.shard_size, "chunk_size": cfg.chunk_size,
        "compression": cfg.compression, "codecs": codec_names(cfg.compression),
        "layers": {name: list(shape) for name, shape in shapes.items() if name != "logits"},
        "num_classes": spec.num_classes, "pool": spec.pool,
        "splits": splits,
        "versions": _versions(),
    }


def probe(model: Tapped, dataset: Dataset) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Per-sample output shapes, and whether every output is finite, from one forward pass on
    two real training rows (so bad weights fail before anything is written)."""
    x = torch.from_numpy(dataset.inputs("train", 0, min(2, len(dataset.splits["train"]))))
    with torch.inference_mode():
        logits, feats = model(x)
    shapes = {"logits": tuple(logits.shape[1:])}
    shapes.update({name: tuple(f.shape[1:]) for name, f in feats.items()})
    finite = all(bool(torch.isfinite(t).all()) for t in (logits, *feats.values()))
    return shapes, finite


# =========================================================================== one shard

@dataclass(frozen=True)
class ShardJob:
    root: str
    split: str
    shard: int
    start: int
    stop: int
    data_cfg: dict
    dataset_fingerprint: str
    teacher: TeacherSpec
    dtype: str
    batch_size: int
    threads: int
    cache_key: str


# Per-process state of a worker: the dataset and the teacher are loaded once per process and
# reused by every shard task that lands there (Dask workers, or this process when local).
_STATE: dict[Any, Any] = {}
_STATE_LOCK = threading.Lock()


def _worker_dataset(job: ShardJob) -> Dataset:
    key = ("dataset", job.dataset_fingerprint)
    with _STATE_LOCK:
        if key not in _STATE:
            dataset = open_dataset(resolve(DataConfig, job.data_cfg))
            if dataset.fingerprint != job.dataset_fingerprint:
                raise KdError(f"dataset {dataset.spec} on worker {socket.gethostname()} differs "
                              "from the one the cache was planned with; workers must see the "
                              "same files (shared storage)")
            _STATE[key] = dataset
        return _STATE[key]


def _worker_teacher(spec: TeacherSpec) -> tuple[torch.nn.Module, torch.device]:
    # TeacherSpec's equality ignores the fingerprint, but a checkpoint file can be replaced at
    # the same path (e.g. a retrained teacher): key by the weights too, never reuse stale ones.
    key = ("teacher", spec, spec.fingerprint)
    with _STATE_LOCK:
        if key not in _STATE:
            device = runtime.pick_device(spec.device)
            model = Tapped(build_teacher(spec), spec.layers, spec.pool, spec.arch).to(device).eval()
            _STATE[key] = (runtime.maybe_compile(model, spec.compile), device)
        return _STATE[key]


def build_shard(job: ShardJob) -> dict[str, Any]:
    """Compute, write and record one shard. Returns its completion record. (One Dask task.)"""
    # a dask worker's own process starts on 1 thread (its nanny sets OMP_NUM_THREADS=1)
    runtime.set_threads(job.threads)
    return write_shard(compute_shard(job))


@dataclass
class ComputedShard:
    """A shard's teacher outputs, in the cache dtype, not yet written."""

    job: ShardJob
    bufs: dict[str, np.ndarray]
    inputs_sha256: str
    started: float


@dataclass
class ShardInputs:
    """How to load a shard's input batches, in order, and the running sha256 of their bytes.
    Loading hashes too, so the hash is computed off the forward pass's thread."""

    job: ShardJob
    bounds: list[tuple[int, int]]
    sha256: Any = field(default_factory=hashlib.sha256)

    @classmethod
    def of(cls, job: ShardJob) -> "ShardInputs":
        return cls(job, [(a, min(a + job.batch_size, job.stop))
                         for a in range(job.start, job.stop, job.batch_size)])

    def loads(self) -> list[Callable[[], np.ndarray]]:
        dataset = _worker_dataset(self.job)

        def load(a: int, b: int) -> np.ndarray:
            x = np.ascontiguousarray(dataset.inputs(self.job.split, a, b), np.float32)
            self.sha256.update(x)  # loads of one shard run in order, on one thread
            return x
        return [functools.partial(load, a, b) for a, b in self.bounds]


def ordered(calls: Iterable[Callable[[], T]], pool: Executor, ahead: int) -> Iterator[T]:
    """Each call's result in order, while up to ``ahead`` later calls run on ``pool``: bounded
    look-ahead, so memory holds a few batches, never a whole shard's inputs."""
    pending: deque = deque()
    try:
        for call in calls:
            pending.append(pool.submit(call))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # abandoned (an error, Ctrl-C): drop the calls not yet started
        for future in pending:
            future.cancel()


def prefetched(loads: Iterable[Callable[[], T]]) -> Iterator[T]:
    """Each load's result in order, the next one running on a thread while the caller works on
    the current one (including across shard boundaries, when given several shards' loads)."""
    with ThreadPoolExecutor(1, thread_name_prefix="kdcache-prefetch") as pool:
        yield from ordered(loads, pool, ahead=1)


def forwarded(job: ShardJob, batches: Iterable[np.ndarray], pool: Executor | None = None,
              streams: int = 1) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], bool]]:
    """The teacher's outputs (see ``_forward``) for each input batch, in order. With ``pool``
    (``streams`` threads) up to ``streams`` batches go through the teacher at once; without
    it, one after another on this thread. The batches may span several shards of one build."""
    model, device = _worker_teacher(job.teacher)
    calls = (functools.partial(_forward, model, device, job.dtype, x) for x in batches)
    return ordered(calls, pool, ahead=2 * streams) if pool else (call() for call in calls)


def compute_shard(job: ShardJob, inputs: ShardInputs | None = None,
                  outputs: Iterator | None = None) -> ComputedShard:
    """Collect the teacher's outputs for the shard's rows and check that every one is finite.

    ``outputs`` yields the outputs of the batches of ``inputs``, in order (by default computed
    here: inputs prefetched on a thread, forwards one after another). A caller running many
    shards passes one stream across them, so neither loading nor the forwards stall at a
    shard boundary."""
    t0 = time.perf_counter()
    if inputs is None:
        inputs = ShardInputs.of(job)
    if outputs is None:
        outputs = forwarded(job, prefetched(inputs.loads()))
    n = job.stop - job.start
    bufs: dict[str, np.ndarray] = {}
    finite = True
    for a, b in inputs.bounds:
        logits, feats, ok = next(outputs)
        finite &= ok
        named = {fmt.logits_key(job.split): logits,
                 **{fmt.feature_key(job.split, k): v for k, v in feats.items()}}
        for key, value in named.items():
            if key not in bufs:
                bufs[key] = np.empty((n, fmt.VIEWS) + value.shape[1:], job.dtype)
            bufs[key][a - job.start:b - job.start, 0] = value
    if not finite:
        bad = next(k for k, buf in bufs.items() if not np.isfinite(buf).all())
        what = "logits" if bad.endswith("logits") else f"features {bad}"
        hint = " or use dtype=float32 (float16 overflowed)" if job.dtype == "float16" else ""
        raise KdError(f"teacher produced NaN/inf {what} in {job.split} rows {job.start}-"
                      f"{job.stop}; check the checkpoint and the inputs{hint}")
    return ComputedShard(job, bufs, inputs.sha256.hexdigest(), t0)


def _forward(model: Tapped, device: torch.device, dtype: str,
             x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], bool]:
    """One batch through the teacher: (logits, {layer: features}) in the cache dtype on the
    host, and whether all of them are finite. Safe to run on several threads at once."""
    store_dtype = {"float16": torch.float16, "float32": torch.float32}[dtype]
    finite = True

    def stored(value: torch.Tensor) -> np.ndarray:
        nonlocal finite
        # + 0.0 turns -0.0 into +0.0: Zarr stores an all-zero chunk as "empty" and reads it
        # back as +0.0, so the bytes hashed on writing must be the ones read back. A float16
        # overflow becomes inf here and is reported by the caller.
        value = (value.float() + 0.0).to(store_dtype).cpu()
        finite &= bool(torch.isfinite(value).all())
        return value.numpy()

    with torch.inference_mode(), runtime.autocast(device):
        logits, feats = model(runtime.to_device(torch.from_numpy(x), device))
        return stored(logits), {name: stored(f) for name, f in feats.items()}, finite


def write_shard(shard: ComputedShard) -> dict[str, Any]:
    """Write a computed shard whole, fsync it, write its index part, and only then its
    completion record. Returns the record."""
    job, bufs = shard.job, shard.bufs
    root = Path(job.root)
    arrays = _worker_arrays(job)
    sums = {}
    for key, buf in bufs.items():
        # Inner chunks equal to the fill value are not stored (nor the padding chunks past the
        # end of a split), but the shard file itself must exist, or a missing file could not be
        # told from damage: only an all-zero shard needs write_empty_chunks to be stored at all.
        arr = arrays[key].with_config({"write_empty_chunks": not buf.any()})
        arr[job.start:job.stop] = buf  # the whole shard, in one write
        _fsync_shard(root / fmt.ARRAYS / key, arr, job.shard)
        sums[key] = hashlib.sha256(buf.tobytes()).hexdigest()

    index = _index_part(job, _worker_dataset(job), bufs[fmt.logits_key(job.split)][:, 0].astype(np.float32))
    part_path, record_path = fmt.part_paths(root, job.split, job.shard)
    with atomic_path(part_path) as tmp:
        pq.write_table(index, tmp)
    record = {
        "split": job.split, "shard": job.shard, "start": job.start, "stop": job.stop,
        "sha256": sums, "inputs_sha256": shard.inputs_sha256,
        "index_sha256": sha256_file(part_path),
        "correct": int(index.column("correct").to_numpy().sum()),
        "seconds": round(time.perf_counter() - shard.started, 4), "host": socket.gethostname(),
    }
    # The record is the only "done" signal, and it is written after the data is durable.
    atomic_write_text(record_path, json.dumps(record, sort_keys=True))
    return record


def _worker_arrays(job: ShardJob) -> dict[str, Any]:
    """The cache's Zarr arrays, opened once per process and cache key (each open costs
    milliseconds; the key changes when a cache at the same path is rebuilt differently)."""
    import zarr

    key = ("arrays", job.root, job.cache_key)
    with _STATE_LOCK:
        if key not in _STATE:
            group = zarr.open_group(Path(job.root) / fmt.ARRAYS, mode="r+")
            _STATE[key] = {name: member for name, member in group.members(max_depth=None)
                           if hasattr(member, "shape")}
        return _STATE[key]


def _fsync_shard(array_dir: Path, arr, shard: int) -> None:
    coords = (shard,) + (0,) * (arr.ndim - 1)
    path = array_dir / arr.metadata.encode_chunk_key(coords)
    fsync_file(path)
    fsync_dir(path.parent)


def _index_part(job: ShardJob, dataset: Dataset, logits: np.ndarray) -> pa.Table:
    split = dataset.splits[job.split]
    labels = split.labels[job.start:job.stop]
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    top2 = np.sort(p, axis=1)[:, -2:] if p.shape[1] > 1 else np.concatenate([np.zeros_like(p), p], 1)
    pred = p.argmax(axis=1)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    return pa.table({
        "sample_id": pa.array(split.sample_ids[job.start:job.stop], pa.int64()),
        "row": pa.array(np.arange(job.start, job.stop), pa.int64()),
        "label": pa.array(labels, pa.int32()),
        "teacher_pred": pa.array(pred, pa.int32()),
        "teacher_prob": pa.array(top2[:, 1], pa.float32()),
        "margin": pa.array(top2[:, 1] - top2[:, 0], pa.float32()),
        "entropy": pa.array(entropy, pa.float32()),
        "correct": pa.array(pred == labels, pa.bool_()),
        "shard": pa.array(np.full(len(labels), job.shard), pa.int32()),
    })


# =========================================================================== the build

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
                manifest: dict[str, Any], progress: bool = True) -> tuple[dict[str, Any], dict]:
    """Build (or resume, or skip) the cache at ``root``. Returns (manifest, this run's stats)."""
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
                return existing, {"computed_rows": 0, "skipped": True, "seconds": 0.0}
            else:
                manifest = existing  # resume: keep the original creation record
        elif root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise KdError(f"{root} exists and is not a kdcache cache; choose another cache=PATH")
        created = not (root / fmt.MANIFEST).is_file()
        if created:
            _initialise(root, cfg, manifest)

        done = _records(root, manifest)
        jobs = list(_jobs(root, cfg, dataset, spec, manifest, done))
        total = sum(s["rows"] for s in manifest["splits"].values())
        todo_rows = sum(j.stop - j.start for j in jobs)
        t0 = time.perf_counter()
        try:
            _run(jobs, cfg, dataset, lambda r: done.__setitem__((r["split"], r["shard"]), r),
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
        return manifest, {"computed_rows": todo_rows, "skipped": False, "seconds": seconds}


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
        shapes = {fmt.logits_key(split): (manifest["num_classes"],)}
        shapes.update({fmt.feature_key(split, k): tuple(v) for k, v in manifest["layers"].items()})
        for key, shape in shapes.items():
            group.create_array(key, shape=(info["rows"], fmt.VIEWS) + shape, dtype=cfg.dtype,
                               shards=(cfg.shard_size, fmt.VIEWS) + shape,
                               chunks=(cfg.chunk_size, fmt.VIEWS) + shape,
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


MAX_AUTO_STREAMS = 4  # beyond a few, one forward's own threads use the cores well enough


def in_process(cfg: CacheConfig) -> bool:
    """Whether shards run in this process (one local worker gains nothing from dask but its
    start-up, ~0.5 s) rather than as dask tasks."""
    return cfg.scheduler == "synchronous" or (cfg.scheduler == "local" and cfg.workers == 1)


def forward_streams(cfg: CacheConfig, spec: TeacherSpec) -> int:
    """How many batches an in-process build runs through the teacher at once (dask workers run
    one each). Auto (``streams=0``) is one per core on CPU, at most ``MAX_AUTO_STREAMS``, each
    forward on ``cores / streams`` torch threads: an OpenMP team waits for its slowest thread
    at every layer, so on small inputs two one-thread forwards beat one two-thread forward
    (resnet18 at 32x32, 2 cores: 2,800 vs 2,200 samples/s; at 128x128 they tie). On a GPU,
    one forward keeps the device busy."""
    if not in_process(cfg):
        return 1
    if cfg.streams:
        return cfg.streams
    if spec.compile or runtime.pick_device(spec.device).type != "cpu":
        return 1  # compiled graphs are not safe to first-run from several threads at once
    return max(1, min(MAX_AUTO_STREAMS, runtime.cores()))


def _jobs(root, cfg, dataset, spec, manifest, done) -> Iterable[ShardJob]:
    threads = cfg.threads or max(1, runtime.cores() // (cfg.workers * forward_streams(cfg, spec)))
    for split, info in manifest["splits"].items():
        for shard in range(info["shards"]):
            if (split, shard) in done:
                continue
            start = shard * cfg.shard_size
            yield ShardJob(str(root), split, shard, start, min(info["rows"], start + cfg.shard_size),
                           manifest["dataset"]["config"], dataset.fingerprint, spec, cfg.dtype,
                           cfg.infer_batch_size, threads, manifest["key"])


def _run(jobs: list[ShardJob], cfg: CacheConfig, dataset: Dataset, on_done: Callable,
         progress: bool, total: int, initial: int) -> None:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit="sample", unit_scale=True, desc="caching",
               disable=None if progress else True,  # None: only on a terminal, never in logs
               dynamic_ncols=True, smoothing=0.1)

    def finish(record: dict) -> None:
        on_done(record)
        bar.update(record["stop"] - record["start"])

    # In this process the workers reuse the dataset already opened (and fingerprinted) here.
    _STATE[("dataset", dataset.fingerprint)] = dataset
    try:
        if jobs:
            with runtime.torch_threads(jobs[0].threads):
                (_run_in_process if in_process(cfg) else _run_on_dask)(jobs, cfg, finish)
    finally:
        bar.close()


def _run_in_process(jobs: list[ShardJob], cfg: CacheConfig, finish: Callable) -> None:
    """One stream of input loads and teacher forwards across all shards, so none starts or ends
    cold; shard k is written and fsynced on a thread while shard k+1 is computed, so the disk's
    latency hides behind the forwards. At most two shards are held in memory."""
    inputs = [ShardInputs.of(job) for job in jobs]
    streams = forward_streams(cfg, jobs[0].teacher)
    with ThreadPoolExecutor(1, thread_name_prefix="kdcache-writer") as writer, \
            ThreadPoolExecutor(streams, thread_name_prefix="kdcache-forward") as forwards:
        batches = prefetched(load for shard in inputs for load in shard.loads())
        outputs = forwarded(jobs[0], batches, forwards if streams > 1 else None, streams)
        pending = None
        with contextlib.closing(batches), contextlib.closing(outputs):
            for job, shard_inputs in zip(jobs, inputs):
                computed = compute_shard(job, shard_inputs, outputs)
                if pending is not None:
                    finish(pending.result())
                pending = writer.submit(write_shard, computed)
        if pending is not None:
            finish(pending.result())


def _run_on_dask(jobs: list[ShardJob], cfg: CacheConfig, finish: Callable) -> None:
    """Each shard a dask task (``build_shard``), on a local cluster or the given scheduler."""
    from dask.distributed import Client, LocalCluster, as_completed

    if cfg.scheduler == "local":
        # ":0" = a free port: None still binds 8787 and warns when another cluster has it
        # (distributed #8136), e.g. two builds of different caches at once.
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=False,
                               dashboard_address=":0", silence_logs=logging.ERROR)
        client = Client(cluster)
    else:
        cluster = None
        try:
            client = Client(cfg.scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a malformed address
            raise KdError(f"cannot reach the dask scheduler at {cfg.scheduler} ({exc}); "
                          "start one or use scheduler=local") from None
    try:
        futures = client.map(build_shard, jobs, pure=False)
        for future in as_completed(futures):
            finish(future.result())
    except BaseException:
        _quiet_distributed()
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _quiet_distributed() -> None:
    """Silence dask.distributed for the rest of the process. After Ctrl-C or a failed shard the
    cluster's comms are torn down mid-flight, and distributed logs each closed comm with a
    traceback, some of them after ``cluster.close()`` has restored its log levels. The user is
    owed one line saying what happened, not that noise; real errors still raise."""
    for name in ["distributed", *logging.root.manager.loggerDict]:
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)


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
    manifest = {**manifest, "status": "complete", "completed": _now(), "splits": splits,
                "shards": shards, "last_run": run}
    manifest["bytes"] = _disk_bytes(root)
    fmt.write_manifest(root, manifest)
    shutil.rmtree(root / fmt.PARTS, ignore_errors=True)
    return manifest


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and fmt.PARTS not in p.parts)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    import dask
    import sklearn
    import torchvision
    import zarr

    import pipeline

    return {"kdcache": pipeline.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "zarr": zarr.__version__, "pyarrow": pa.__version__, "numpy": np.__version__,
            "dask": dask.__version__, "scikit-learn": sklearn.__version__}
