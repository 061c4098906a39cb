"""One shard: ``shard_size`` consecutive rows of one split, the unit of work, of writing and of
resuming.

A shard's inputs are loaded batch by batch (hashed on the loading thread), run through the
teacher under ``torch.inference_mode``, collected whole in the cache dtype and checked finite
(:func:`compute_shard`); then each array's whole Zarr shard is written in one call and fsynced,
the shard's index part is written, and only then its completion record (:func:`write_shard`).
The record is the only "done" signal, so a killed build resumes from the shards that have one.
Writing is idempotent, so Dask may safely run a shard's task twice.

Why whole shards, written once by one task: with Zarr v3 sharding, concurrent writers of one
shard lose rows silently, and many small writes into a shard are ~20x slower.

A text teacher's shard (``teacher=hf:DIR``) is tokenized whole by its first load, on the
loading thread: its inputs' sha256 is that of its rows' token ids in row order (whatever the
batching), and its batches are **bucketed by length** (rows sorted by token count, then cut
into ``infer_batch_size`` batches), so that a batch pads to rows like its own. Each batch's
outputs are scattered back to their rows; the index gains each row's token count
(``tokens``) and whether truncation cut it (``truncated``). Token ids are not stored.

A token cache's shard (a causal-LM teacher on a token dataset, format 4) loads windows of ids
(:meth:`TokenDataset.windows`; its inputs' sha256 is that of the ids, int64, in row order),
stores them with their mask and segments, and runs the teacher's body once per batch of
windows and its output layer on a chunk of positions at a time
(:meth:`pipeline.hf_lm.HfCausalLM.chunk_positions`): each chunk's logits are encoded at once
(``topk:K`` / ``sample:K`` / ``topk:K+sample:M`` exactly as a classification cache's rows, a
position in place of a view; ``dense`` in the cache dtype) and dropped, so memory never holds [B, T, vocabulary].
Padding positions hold zeros. The index gains per window the teacher's mean NLL of the true
next tokens, its mean entropy and top-K mass over the positions that have a target, their
count (``tokens``) and how many of them the teacher's top-1 predicts (``top1``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import socket
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

from pipeline import runtime, storage, tokens
from pipeline.augment import Policy, parse
from pipeline.cache import format as fmt
from pipeline.config import DataConfig, from_record
from pipeline.data import Dataset, open_dataset
from pipeline.errors import KdError
from pipeline.io import fsync_dir, fsync_file
from pipeline.keyed_random import view_random
from pipeline.numerics import logsumexp
from pipeline.lookahead import ordered, prefetched
from pipeline.sparse import (SAMPLE, TOPK, classes_dtype, draw, draw_tail, encode_topk, head_and_tail, parse_mode,
                             sample_uniforms)
from pipeline.teachers import ONNX, TeacherSpec, build_teacher, is_text_teacher, tap


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
    threads: int  # torch threads per forward; 0 = the worker's own choice (pipeline.cluster)
    cache_key: str
    views: int = 1  # of this split: view 0 is the input itself, views 1.. are augmented
    augment: str = "none"  # the views' policy
    seed: int = 0  # keys the views' augmentation parameters (with split, sample_id, view)
    logits: str = "dense"  # dense | topk:K | sample:K (pipeline.sparse)
    temperature: float = 1.0  # the cache's T: sample:K draws from softmax(z / T)
    tokens: bool = False  # a token cache (causal-LM teacher over windows of token ids)


# Per-process state of a worker: the dataset and the teacher are loaded once per process and
# reused by every shard task that lands there (Dask workers, or this process when local).
_STATE: dict[Any, Any] = {}
_STATE_LOCK = threading.Lock()


def share_dataset(dataset: Dataset) -> None:
    """Let shards computed in this process reuse a dataset already opened (and fingerprinted)."""
    with _STATE_LOCK:
        _STATE[("dataset", dataset.fingerprint)] = dataset


def _worker_dataset(job: ShardJob) -> Dataset:
    key = ("dataset", job.dataset_fingerprint)
    with _STATE_LOCK:
        if key not in _STATE:
            dataset = open_dataset(from_record(DataConfig, job.data_cfg))
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
            model = tap(build_teacher(spec), spec.layers, spec.pool, spec.arch).to(device).eval()
            compile = spec.compile and spec.arch != ONNX  # onnxruntime runs its own graph
            _STATE[key] = (runtime.maybe_compile(model, compile), device)
        return _STATE[key]


def _worker_policy(job: ShardJob) -> Policy | None:
    """The views' policy, parsed once per process (None with one view)."""
    if job.views == 1:
        return None
    shape = tuple(_worker_dataset(job).input_shape)
    key = ("policy", job.augment, shape)
    with _STATE_LOCK:
        if key not in _STATE:
            _STATE[key] = parse(job.augment, shape)
        return _STATE[key]


def view_params(policy: Policy, seed: int, split: str, sample_ids: np.ndarray, views: int) -> np.ndarray:
    """Augmentation parameters [n, views, P] of these samples' views: view 0 the identity,
    view v drawn from (seed, split, sample_id, v)."""
    n = len(sample_ids)
    return np.stack([policy.identity(n)] + [policy.sample(view_random(seed, split, sample_ids, v), n)
                                            for v in range(1, views)], axis=1)


def build_shard(job: ShardJob) -> dict[str, Any]:
    """Compute, write and record one shard. Returns its completion record. (One Dask task.)"""
    from pipeline.cluster import use_threads  # imports distributed: only where dask runs this

    use_threads(job.threads)  # the job's, or the worker's own choice (0)
    return write_shard(compute_shard(job))


def warm(job: ShardJob) -> None:
    """Load what every shard of ``job``'s build needs into this process's state (the dataset,
    the teacher, the open arrays), so a worker's first task starts warm."""
    _worker_dataset(job)
    _worker_teacher(job.teacher)
    _worker_arrays(job)


@dataclass
class ComputedShard:
    """A shard's teacher outputs, in the cache dtype, not yet written."""

    job: ShardJob
    bufs: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]  # teacher_stats of its rows, for the index
    inputs_sha256: str
    started: float


@dataclass
class ShardInputs:
    """How to load a shard's input batches, in order, and the running sha256 of their bytes.
    Loading hashes too, so the hash is computed off the forward pass's thread. Each load gives
    ``(x, params, policy)``: the normalised inputs, their views' augmentation parameters (None
    with one view), and the policy that applies them; for a text teacher, ``x`` is the batch's
    ``(input_ids, attention_mask)`` and the rows of batch i are :meth:`rows` (i), known once
    its load has run."""

    job: ShardJob
    bounds: list[tuple[int, int]]
    sha256: Any = field(default_factory=hashlib.sha256)
    # text: the shard's batches (rows within the shard, bucketed by length), each row's token
    # ids, token count and truncation; set by the first load
    batches: list[np.ndarray] | None = None
    token_ids: list[list[int]] | None = None
    tokens: np.ndarray | None = None
    truncated: np.ndarray | None = None

    @classmethod
    def of(cls, job: ShardJob) -> "ShardInputs":
        return cls(job, [(a, min(a + job.batch_size, job.stop))
                         for a in range(job.start, job.stop, job.batch_size)])

    def rows(self, i: int) -> slice | np.ndarray:
        """The rows of batch ``i`` within the shard: a run of rows, or a text shard's bucket."""
        if self.batches is not None:
            return self.batches[i]
        a, b = self.bounds[i]
        return slice(a - self.job.start, b - self.job.start)

    def loads(self) -> list[Callable[[], tuple[Any, np.ndarray | None, Policy | None]]]:
        job = self.job
        if job.tokens:
            return self._token_loads()
        if is_text_teacher(job.teacher.arch):
            return self._text_loads()
        dataset, policy = _worker_dataset(job), _worker_policy(job)
        ids = dataset.splits[job.split].sample_ids

        def load(a: int, b: int) -> tuple[np.ndarray, np.ndarray | None, Policy | None]:
            x = np.ascontiguousarray(dataset.inputs(job.split, a, b), np.float32)
            self.sha256.update(x)  # loads of one shard run in order, on one thread
            params = None if policy is None else view_params(policy, job.seed, job.split, ids[a:b], job.views)
            return x, params, policy
        return [functools.partial(load, a, b) for a, b in self.bounds]

    def _token_loads(self) -> list[Callable[[], tuple[dict, None, None]]]:
        job = self.job
        dataset = _worker_dataset(job)
        ids = dataset.splits[job.split].sample_ids

        def load(a: int, b: int) -> tuple[dict, None, None]:
            w = dataset.windows(job.split, a, b)
            batch = {"ids": np.ascontiguousarray(w["ids"], np.int64),
                     "mask": np.asarray(w["mask"], bool), "segments": np.asarray(w["segments"], np.int32),
                     "split": job.split, "sample_ids": ids[a:b]}
            self.sha256.update(batch["ids"])  # the windows' ids, in row order
            return batch, None, None
        return [functools.partial(load, a, b) for a, b in self.bounds]

    def _text_loads(self) -> list[Callable[[], tuple[Any, None, None]]]:
        job = self.job
        dataset = _worker_dataset(job)
        model = _worker_teacher(job.teacher)[0]

        def tokenize() -> None:  # the whole shard, once, so that its batches can be bucketed
            ids, truncated = model.tokenize(dataset.inputs(job.split, job.start, job.stop))
            tokens.update_hash(self.sha256, ids)  # row order: independent of the batching
            self.token_ids, self.truncated = ids, truncated
            self.tokens = np.array([len(r) for r in ids], dtype=np.int32)
            self.batches = tokens.buckets(self.tokens, job.batch_size)

        def load(i: int) -> tuple[tuple[np.ndarray, np.ndarray], None, None]:
            if i == 0:
                tokenize()
            batch = model.pad([self.token_ids[r] for r in self.batches[i]])
            return (batch["input_ids"], batch["attention_mask"]), None, None
        return [functools.partial(load, i) for i in range(len(self.bounds))]


def forwarded(job: ShardJob, batches: Iterable[tuple[np.ndarray, np.ndarray | None, Policy | None]],
              pool: Executor | None = None, streams: int = 1) -> Iterator[tuple]:
    """The teacher's outputs (``_forward``'s (logits, features, params, finite)) for each input
    batch, in order. With ``pool``
    (``streams`` threads) up to ``streams`` batches go through the teacher at once; without
    it, one after another on this thread. The batches may span several shards (and splits,
    with their own views) of one build."""
    model, device = _worker_teacher(job.teacher)
    if job.tokens:  # the mode and its settings are the build's; split and ids come with each batch
        calls = (functools.partial(_forward_tokens, model, device, job, x) for x, _, _ in batches)
        return ordered(calls, pool, ahead=2 * streams) if pool else (call() for call in calls)
    # sparse modes select classes from the float32 logits; only what they keep is rounded
    logits_dtype = "float32" if parse_mode(job.logits).sparse else job.dtype
    forward = _forward_text if is_text_teacher(job.teacher.arch) else _forward
    calls = (functools.partial(forward, model, device, job.dtype, x, params, policy, logits_dtype)
             for x, params, policy in batches)
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
    if job.tokens:
        return _compute_token_shard(job, inputs, outputs, t0)
    n = job.stop - job.start
    bufs: dict[str, np.ndarray] = {}
    stats: dict[str, np.ndarray] = {}
    finite = True
    for i in range(len(inputs.bounds)):
        logits, feats, params, ok = next(outputs)
        at = inputs.rows(i)  # (known once batch i was loaded, which its outputs come after)
        finite &= ok
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite logits are refused below
            for name, value in teacher_stats(logits[:, 0].astype(np.float32)).items():
                if name not in stats:
                    stats[name] = np.empty(n, value.dtype)
                stats[name][at] = value
        named = {**stored_logits(job, logits, at),
                 **{fmt.feature_key(job.split, k): v for k, v in feats.items()}}
        if params is not None:
            named[fmt.augment_key(job.split)] = params.astype(fmt.AUGMENT_DTYPE)
        for key, value in named.items():
            if key not in bufs:
                bufs[key] = np.empty((n,) + value.shape[1:], value.dtype)
            bufs[key][at] = value
    bad = [k for k, buf in bufs.items() if buf.dtype.kind == "f" and not np.isfinite(buf).all()]
    if not finite or bad:
        bad = bad or [fmt.logits_key(job.split)]  # non-finite logits that sparse modes did not keep
        what = f"features {bad[0]}" if "/features/" in bad[0] else "logits"
        hint = " or use dtype=float32 (float16 overflowed)" if job.dtype == "float16" else ""
        raise KdError(f"teacher produced NaN/inf {what} in {job.split} rows {job.start}-"
                      f"{job.stop}; check the checkpoint and the inputs{hint}")
    if inputs.tokens is not None:  # text: the index's tokens and truncated columns
        stats.update(tokens=inputs.tokens, truncated=inputs.truncated)
    return ComputedShard(job, bufs, stats, inputs.sha256.hexdigest(), t0)


def _compute_token_shard(job: ShardJob, inputs: ShardInputs, outputs: Iterator, t0: float) -> ComputedShard:
    """:func:`compute_shard` of a token cache: each batch's arrays (from
    :func:`_forward_tokens`) put at its rows, its windows' statistics kept for the index."""
    n = job.stop - job.start
    bufs: dict[str, np.ndarray] = {}
    stats: dict[str, np.ndarray] = {}
    for i in range(len(inputs.bounds)):
        named, window_stats, finite = next(outputs)
        at = inputs.rows(i)
        if not finite:
            a, b = inputs.bounds[i]
            raise KdError(f"teacher produced NaN/inf logits in {job.split} windows {a}-{b}; check the "
                          f"model{' or use dtype=float32 (float16 overflowed)' if job.dtype == 'float16' else ''}")
        for key, value in named.items():
            if key not in bufs:
                bufs[key] = np.empty((n,) + value.shape[1:], value.dtype)
            bufs[key][at] = value
        for name, value in window_stats.items():
            if name not in stats:
                stats[name] = np.empty(n, value.dtype)
            stats[name][at] = value
    return ComputedShard(job, bufs, stats, inputs.sha256.hexdigest(), t0)


def _forward_tokens(model, device: torch.device, job: ShardJob, batch: dict) -> tuple[dict, dict, bool]:
    """One batch of windows through a causal-LM teacher: ``(arrays by key, per-window
    statistics, finite)``. The body runs once; the output layer and the encoding run on
    :meth:`~pipeline.hf_lm.HfCausalLM.chunk_positions` real positions at a time. Safe to run
    on several threads at once."""
    split, ids, segments, mask = batch["split"], batch["ids"], batch["segments"], batch["mask"]
    rows, length = ids.shape
    real = segments >= 0
    mode = parse_mode(job.logits)
    vocab = job.teacher.num_classes
    flat_n = rows * length
    target = np.zeros((rows, length), np.int64)
    target[:, :-1] = ids[:, 1:]  # position j predicts token j + 1
    target, has_target = target.reshape(-1), mask.reshape(-1)
    named: dict[str, np.ndarray] = {
        fmt.tokens_key(split, "ids"): ids.astype(np.int32),
        fmt.tokens_key(split, "mask"): mask.astype(np.uint8),
        fmt.tokens_key(split, "segments"): segments.astype(np.int32)}
    out: dict[str, np.ndarray] = {}  # by array key: sparse arrays flat over positions [B · T, ...]
    if mode.has_topk:
        out = {fmt.sparse_key(split, TOPK, "classes"): np.zeros((flat_n, mode.k), classes_dtype(vocab)),
               fmt.sparse_key(split, TOPK, "logits"): np.zeros((flat_n, mode.k), job.dtype),
               fmt.sparse_key(split, TOPK, "tail"): np.zeros((flat_n, 2), np.float32)}
    if mode.has_draws:  # sample:K's draws, or topk:K+sample:M's draws from the tail
        out[fmt.sparse_key(split, SAMPLE, "classes")] = np.zeros((flat_n, mode.draws), classes_dtype(vocab))
    if not mode.sparse:
        out[fmt.logits_key(split)] = np.zeros((flat_n, vocab), job.dtype)
    nll, entropy, mass, top1 = (np.zeros(flat_n, np.float64) for _ in range(4))
    finite = True
    positions = np.flatnonzero(real.reshape(-1))
    with torch.inference_mode():
        x = runtime.to_device(torch.from_numpy(ids), device)
        attention = runtime.to_device(torch.from_numpy(real.astype(np.int64)), device)
        with runtime.autocast(device, runtime.text_autocast_dtype(device)):
            hidden = model.hidden(x, attention)
        hidden = hidden.reshape(flat_n, hidden.shape[-1])
        step = model.chunk_positions()
        for a in range(0, len(positions), step):
            at = positions[a:a + step]
            with runtime.autocast(device, runtime.text_autocast_dtype(device)):
                z = model.logits(hidden[torch.from_numpy(at).to(hidden.device)])
            z = z.float().cpu().numpy()  # a view on the CPU: the whole row is never copied
            # the top K (mode.k; 1 for the index's top-1 mass otherwise) and the tail: the index's
            # statistics come from them without another pass over the vocabulary
            k = mode.k if mode.has_topk else min(mode.k or 1, vocab - 1)
            found = head_and_tail(z, k, job.temperature, tail_mean=True)
            # a NaN or +inf logit reaches the head, the tail's sums or its mean (no extra pass)
            ok = bool(np.isfinite(found.values).all() and np.isfinite(found.tail).all()
                      and np.isfinite(found.tail_mean).all())
            finite &= ok
            if not ok:
                continue
            lse = found.log_partition()
            p_head = np.exp(found.values.astype(np.float64) - lse[:, None])
            p_tail = np.exp(found.tail[:, 0] - lse)
            # H = log Z − E_p[z]: the head's terms exactly, the tail's by its mean logit
            entropy[at] = lse - (p_head * found.values).sum(axis=1) - p_tail * found.tail_mean
            nll[at] = lse - z[np.arange(len(at)), target[at]]
            top1[at] = found.ids[:, 0] == target[at]  # the largest logit, ties to the smaller id
            mass[at] = p_head.sum(axis=1)
            if mode.has_topk:
                classes = found.ids.astype(classes_dtype(vocab))
                out[fmt.sparse_key(split, TOPK, "classes")][at] = classes
                # + 0.0: see _forward
                out[fmt.sparse_key(split, TOPK, "logits")][at] = (found.values + 0.0).astype(job.dtype)
                out[fmt.sparse_key(split, TOPK, "tail")][at] = found.tail.astype(np.float32)
            if mode.has_draws:  # keyed by (seed, split, window, position): the view's place
                b, j = np.divmod(at, length)
                uniforms = sample_uniforms(job.seed, split, batch["sample_ids"][b], j, mode.draws)
                out[fmt.sparse_key(split, SAMPLE, "classes")][at] = (
                    draw_tail(z, classes, job.temperature, uniforms, vocab) if mode.has_topk
                    else draw(z, job.temperature, uniforms, vocab))
            if not mode.sparse:
                stored = (z + 0.0).astype(job.dtype)  # + 0.0: see _forward
                finite &= bool(np.isfinite(stored).all())  # -inf, or a float16 overflow
                out[fmt.logits_key(split)][at] = stored
    named.update({key: v.reshape(rows, length, *v.shape[1:]) for key, v in out.items()})
    counted = has_target.reshape(rows, length)
    tokens = counted.sum(axis=1)

    def mean(values: np.ndarray) -> np.ndarray:  # over the positions with a target; NaN: none
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tokens > 0, (values.reshape(rows, length) * counted).sum(axis=1) / tokens, np.nan)

    window_stats = {"nll": mean(nll), "entropy": mean(entropy), "tokens": tokens.astype(np.int32),
                    "top1": (top1.reshape(rows, length) * counted).sum(axis=1).astype(np.int32),
                    "nll_sum": (nll.reshape(rows, length) * counted).sum(axis=1)}
    if mode.sparse:
        window_stats["topk_mass"] = mean(mass)
    return named, window_stats, finite


def stored_logits(job: ShardJob, logits: np.ndarray, at: slice | np.ndarray) -> dict[str, np.ndarray]:
    """What the cache keeps of the logits [B, V, C] of the shard's rows ``at`` (a run, or a
    text shard's bucket), by array key: all of them (dense), or the sparse arrays of the job's
    logits mode (:mod:`pipeline.sparse`)."""
    mode = parse_mode(job.logits)
    if not mode.sparse:
        return {fmt.logits_key(job.split): logits}
    rows, views, classes = logits.shape
    flat = logits.reshape(rows * views, classes)
    out = {}
    if mode.has_topk:
        ids, values, tail = encode_topk(flat, mode.k, classes, job.temperature)
        out = {fmt.sparse_key(job.split, TOPK, "classes"): ids.reshape(rows, views, -1),
               fmt.sparse_key(job.split, TOPK, "logits"): values.astype(job.dtype).reshape(rows, views, -1),
               fmt.sparse_key(job.split, TOPK, "tail"): tail.reshape(rows, views, 2)}
    if not mode.has_draws:
        return out
    sample_ids = _worker_dataset(job).splits[job.split].sample_ids[job.start:job.stop][at]
    uniforms = np.stack([sample_uniforms(job.seed, job.split, sample_ids, v, mode.draws)
                         for v in range(views)], axis=1).reshape(rows * views, mode.draws)
    # topk+sample: the draws come from the tail alone, the classes the top K left out
    drawn = (draw_tail(flat, ids, job.temperature, uniforms, classes) if mode.has_topk
             else draw(flat, job.temperature, uniforms, classes))
    out[fmt.sparse_key(job.split, SAMPLE, "classes")] = drawn.reshape(rows, views, -1)
    return out


def teacher_stats(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row summaries of the teacher's logits [B, C] (view 0) for the index."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    top2 = np.sort(p, axis=1)[:, -2:] if p.shape[1] > 1 else np.concatenate([np.zeros_like(p), p], 1)
    return {"teacher_pred": p.argmax(axis=1), "teacher_prob": top2[:, 1],
            "margin": top2[:, 1] - top2[:, 0],
            "entropy": -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)}


def _forward(model: torch.nn.Module, device: torch.device, dtype: str, x: np.ndarray,
             params: np.ndarray | None = None, policy: Policy | None = None,
             logits_dtype: str | None = None):
    """One batch through the teacher, once per view: (logits [B, V, C], {layer: features
    [B, V, ...]}) in the cache dtype on the host, the views' parameters [B, V, P] (or None),
    and whether every output is finite. The inputs move to the device once; view v > 0 is
    ``policy.apply(x, params[:, v])`` there. Safe to run on several threads at once."""
    torch_dtypes = {"float16": torch.float16, "float32": torch.float32}
    finite = True

    def stored(value: torch.Tensor, store_dtype: torch.dtype = torch_dtypes[dtype]) -> np.ndarray:
        nonlocal finite
        # + 0.0 turns -0.0 into +0.0: Zarr stores an all-zero chunk as "empty" and reads it
        # back as +0.0, so the bytes hashed on writing must be the ones read back. A float16
        # overflow becomes inf here and is reported by the caller.
        value = (value.float() + 0.0).to(store_dtype).cpu()
        finite &= bool(torch.isfinite(value).all())
        return value.numpy()

    with torch.inference_mode():
        x_dev = runtime.to_device(torch.from_numpy(x), device)
        outputs = []
        for v in range(1 if params is None else params.shape[1]):
            xv = x_dev if v == 0 else policy.apply(x_dev, params[:, v])  # moved where needed
            with runtime.autocast(device):
                logits, feats = model(xv)
            outputs.append((stored(logits, torch_dtypes[logits_dtype or dtype]),
                            {name: stored(f) for name, f in feats.items()}))
    def by_view(values: list[np.ndarray]) -> np.ndarray:  # [B, V, ...]; one view: no copy
        return values[0][:, None] if len(values) == 1 else np.stack(values, axis=1)

    logits = by_view([o[0] for o in outputs])
    feats = {name: by_view([o[1][name] for o in outputs]) for name in outputs[0][1]}
    return logits, feats, params, finite


def _forward_text(model: torch.nn.Module, device: torch.device, dtype: str,
                  x: tuple[np.ndarray, np.ndarray], params: None = None, policy: None = None,
                  logits_dtype: str | None = None):
    """:func:`_forward` for a text teacher: ``x`` is a batch's ``(input_ids, attention_mask)``
    (one view), run in inference mode with bfloat16 autocast on a GPU where it is supported."""
    torch_dtypes = {"float16": torch.float16, "float32": torch.float32}
    finite = True

    def stored(value: torch.Tensor, store_dtype: torch.dtype = torch_dtypes[dtype]) -> np.ndarray:
        nonlocal finite
        value = (value.float() + 0.0).to(store_dtype).cpu()  # + 0.0: see _forward
        finite &= bool(torch.isfinite(value).all())
        return value.numpy()[:, None]  # [B, 1, ...]: one view

    with torch.inference_mode():
        ids, mask = (runtime.to_device(torch.from_numpy(a), device) for a in x)
        with runtime.autocast(device, runtime.text_autocast_dtype(device)):
            logits, feats = model(ids, mask)
        return (stored(logits, torch_dtypes[logits_dtype or dtype]),
                {name: stored(f) for name, f in feats.items()}, None, finite)


def write_shard(shard: ComputedShard) -> dict[str, Any]:
    """Write a computed shard whole, fsync it, write its index part, and only then its
    completion record. Returns the record."""
    job, bufs = shard.job, shard.bufs
    root = storage.location(job.root)
    arrays = _worker_arrays(job)
    sums = {}
    for key, buf in bufs.items():
        # Inner chunks equal to the fill value are not stored (nor the padding chunks past the
        # end of a split), but the shard file itself must exist, or a missing file could not be
        # told from damage: only an all-zero shard needs write_empty_chunks to be stored at all.
        arr = arrays[key].with_config({"write_empty_chunks": not buf.any()})
        arr[job.start:job.stop] = buf  # the whole shard, in one write (one PUT on object stores)
        if not storage.is_remote(root):
            _fsync_shard(root / fmt.ARRAYS / key, arr, job.shard)
        sums[key] = hashlib.sha256(buf.tobytes()).hexdigest()

    index = (_token_index_part if job.tokens else _index_part)(job, _worker_dataset(job), shard.stats)
    part_path, record_path = fmt.part_paths(root, job.split, job.shard)
    part = storage.parquet_bytes(index)
    storage.write_bytes(part_path, part)
    record = {
        "split": job.split, "shard": job.shard, "start": job.start, "stop": job.stop,
        "sha256": sums, "inputs_sha256": shard.inputs_sha256,
        "index_sha256": hashlib.sha256(part).hexdigest(),
        "correct": int(index.column("top1" if job.tokens else "correct").to_numpy().sum()),
        "seconds": round(time.perf_counter() - shard.started, 4), "host": socket.gethostname(),
        "key": job.cache_key,  # whose shard this is (the manifest's shard list leaves it out)
    }
    if job.tokens:  # the split's next-token accuracy and mean NLL are per target token
        record.update(tokens=int(shard.stats["tokens"].sum()),
                      nll_sum=float(shard.stats["nll_sum"].sum()))
    # The record is the only "done" signal, and it is written after the data is durable.
    storage.write_text(record_path, json.dumps(record, sort_keys=True))
    return record


def _worker_arrays(job: ShardJob) -> dict[str, Any]:
    """The cache's Zarr arrays, opened once per process and cache key (each open costs
    milliseconds; the key changes when a cache at the same path is rebuilt differently)."""
    import zarr

    key = ("arrays", job.root, job.cache_key)
    with _STATE_LOCK:
        if key not in _STATE:
            store = storage.zarr_store(storage.location(job.root) / fmt.ARRAYS, read_only=False)
            group = zarr.open_group(store, mode="r+")
            _STATE[key] = {name: member for name, member in group.members(max_depth=None)
                           if hasattr(member, "shape")}
        return _STATE[key]


def _fsync_shard(array_dir: Path, arr, shard: int) -> None:
    coords = (shard,) + (0,) * (arr.ndim - 1)
    path = array_dir / arr.metadata.encode_chunk_key(coords)
    fsync_file(path)
    fsync_dir(path.parent)


def _index_part(job: ShardJob, dataset: Dataset, stats: dict[str, np.ndarray]) -> pa.Table:
    split = dataset.splits[job.split]
    labels = split.labels[job.start:job.stop]
    pred = stats["teacher_pred"]
    text = {"tokens": pa.array(stats["tokens"], pa.int32()),
            "truncated": pa.array(stats["truncated"], pa.bool_())} if "tokens" in stats else {}
    return pa.table({
        "sample_id": pa.array(split.sample_ids[job.start:job.stop], pa.int64()),
        "row": pa.array(np.arange(job.start, job.stop), pa.int64()),
        "label": pa.array(labels, pa.int32()),
        "teacher_pred": pa.array(pred, pa.int32()),
        "teacher_prob": pa.array(stats["teacher_prob"], pa.float32()),
        "margin": pa.array(stats["margin"], pa.float32()),
        "entropy": pa.array(stats["entropy"], pa.float32()),
        "correct": pa.array(pred == labels, pa.bool_()),
        "shard": pa.array(np.full(len(labels), job.shard), pa.int32()),
        **text,  # text caches: each row's token count, and whether truncation cut it
    })


def _token_index_part(job: ShardJob, dataset: Dataset, stats: dict[str, np.ndarray]) -> pa.Table:
    """A token cache's index part: per window its sample_id and row, a label of 0 (windows
    have none), and the teacher's statistics over the positions that have a target."""
    split = dataset.splits[job.split]
    n = job.stop - job.start
    columns = {
        "sample_id": pa.array(split.sample_ids[job.start:job.stop], pa.int64()),
        "row": pa.array(np.arange(job.start, job.stop), pa.int64()),
        "label": pa.array(np.zeros(n, np.int32), pa.int32()),
        "nll": pa.array(stats["nll"], pa.float32()),
        "entropy": pa.array(stats["entropy"], pa.float32()),
        "tokens": pa.array(stats["tokens"], pa.int32()),
        "top1": pa.array(stats["top1"], pa.int32()),
        "shard": pa.array(np.full(n, job.shard), pa.int32()),
    }
    if "topk_mass" in stats:
        columns["topk_mass"] = pa.array(stats["topk_mass"], pa.float32())
    return pa.table(columns)
