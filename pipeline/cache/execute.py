"""Running a build's shard jobs: in this process, or as tasks on a Dask cluster.

In one process (the default, ``workers=1``) the shards share one pipeline: a thread loads
input batches ahead, ``streams`` threads run batches through the teacher side by side (on CPU,
one per core: see :func:`forward_streams`), the main thread collects each shard's outputs in
batch order, and a writer thread writes shard k while shard k+1 is computed. On Dask, each
shard is one task (:func:`pipeline.cache.shard.build_shard`); workers that are processes of
their own decide their torch threads themselves and load the teacher and dataset once, before
their first task (:class:`pipeline.cluster.WorkerSettings`).
"""

from __future__ import annotations

import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from pipeline import runtime
from pipeline.cache import format as fmt
from pipeline.cache import shard
from pipeline.cache.shard import ShardInputs, ShardJob
from pipeline.config import CacheConfig, in_process
from pipeline.data import Dataset
from pipeline.lookahead import prefetched
from pipeline.teachers import TeacherSpec, is_text_teacher


MAX_AUTO_STREAMS = 4  # beyond a few, one forward's own threads use the cores well enough


def check_scheduler(cfg: CacheConfig) -> None:
    """Before any work: a scheduler address nothing listens at is refused in one line."""
    if cfg.scheduler not in ("local", "synchronous"):
        from pipeline.cluster import check_reachable  # imports distributed: only for a scheduler

        check_reachable(cfg.scheduler)


def local_threads(cfg: CacheConfig, spec: TeacherSpec) -> int:
    """Torch threads per forward when the shards run on this machine's cores, in this process
    (in-process, or local dask workers, which are threads of this process)."""
    return cfg.threads or max(1, runtime.cores() // (cfg.workers * forward_streams(cfg, spec)))


def forward_streams(cfg: CacheConfig, spec: TeacherSpec) -> int:
    """How many batches an in-process build runs through the teacher at once (dask workers run
    one each). Auto (``streams=0``) is one per core on CPU, at most ``MAX_AUTO_STREAMS``, each
    forward on ``cores / streams`` torch threads: an OpenMP team waits for its slowest thread
    at every layer, so on small inputs two one-thread forwards beat one two-thread forward
    (resnet18 at 32x32, 2 cores: 2,800 vs 2,200 samples/s; at 128x128 they tie). On a GPU,
    one forward keeps the device busy. A text teacher runs one forward on every core: its
    batches are few, large and sorted by length (the longest last), so a second stream would
    leave a core idle while the longest batch runs alone (all-MiniLM-L6-v2 on 820 documents, 2
    cores: 83 s with one stream, 117 s with two, alternated)."""
    if not in_process(cfg):
        return 1
    if cfg.streams:
        return cfg.streams
    if is_text_teacher(spec.arch):
        return 1
    if spec.compile or runtime.pick_device(spec.device).type != "cpu":
        return 1  # compiled graphs are not safe to first-run from several threads at once
    return max(1, min(MAX_AUTO_STREAMS, runtime.cores()))


def shard_jobs(root, cfg, dataset, spec, manifest, done) -> Iterable[ShardJob]:
    """The jobs of the shards not yet done. On a scheduler's workers the jobs carry only the
    user's ``threads`` (0: each worker decides from its own cores); here, this process's share."""
    threads = cfg.threads if cfg.scheduler not in ("local", "synchronous") else local_threads(cfg, spec)
    for split, info in manifest["splits"].items():
        for k in range(info["shards"]):
            if (split, k) in done:
                continue
            start = k * cfg.shard_size
            yield ShardJob(str(root), split, k, start, min(info["rows"], start + cfg.shard_size),
                           manifest["dataset"]["config"], dataset.fingerprint, spec, cfg.dtype,
                           cfg.infer_batch_size, threads, manifest["key"],
                           fmt.split_views(manifest, split), cfg.augment, cfg.seed,
                           cfg.logits, cfg.temperature, fmt.is_token_cache(manifest))


def run_jobs(jobs: list[ShardJob], cfg: CacheConfig, dataset: Dataset, on_done: Callable,
             progress: bool, total: int, initial: int) -> None:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit="sample", unit_scale=True, desc="caching",
               disable=None if progress else True,  # None: only on a terminal, never in logs
               dynamic_ncols=True, smoothing=0.1)

    def finish(record: dict) -> None:
        on_done(record)
        bar.update(record["stop"] - record["start"])

    # In this process the workers reuse the dataset already opened (and fingerprinted) here.
    shard.share_dataset(dataset)
    try:
        if jobs:
            threads = jobs[0].threads  # 0: decided by each remote worker, nothing to set here
            with runtime.torch_threads(threads):
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
        batches = prefetched(load for each in inputs for load in each.loads())
        outputs = shard.forwarded(jobs[0], batches, forwards if streams > 1 else None, streams)
        pending = None
        with contextlib.closing(batches), contextlib.closing(outputs):
            for job, shard_inputs in zip(jobs, inputs):
                computed = shard.compute_shard(job, shard_inputs, outputs)
                if pending is not None:
                    finish(pending.result())
                pending = writer.submit(shard.write_shard, computed)
        if pending is not None:
            finish(pending.result())


def _run_on_dask(jobs: list[ShardJob], cfg: CacheConfig, finish: Callable) -> None:
    """Each shard a dask task (``build_shard``), on local workers (threads of this process,
    which already holds the dataset) or the given scheduler's (processes of their own, set up
    by :class:`pipeline.cluster.WorkerSettings` before their first task)."""
    from pipeline import cluster  # imports distributed: only when dask runs the shards

    settings = None if cfg.scheduler == "local" else cluster.WorkerSettings(
        cfg.threads, functools.partial(shard.warm, jobs[0]))
    with cluster.connect(cfg.scheduler, cfg.workers, processes=False, settings=settings) as client:
        futures = client.map(shard.build_shard, jobs, pure=False)
        for i, record in cluster.finished(futures, lambda i: f"shard {jobs[i].shard} of {jobs[i].split}"):
            finish(record)
