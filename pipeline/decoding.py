"""Decoding image files into fixed-size float32 RGB inputs, on ``decoders`` worker processes.

One thread decodes a few hundred photos per second (a 500×375 JPEG resized to 224² takes
~3 ms), which starves a GPU teacher that runs thousands. :func:`decode` spreads a read over a
pool of processes, made once per process on first use and reused by every later read (shut
down at exit). A cache build reads its inputs on a prefetch thread, so the pool's work
overlaps the teacher's forwards.

The pool's processes start by "forkserver", never by fork: a fork of a parent that has
initialised CUDA (or holds OpenMP or other threads) inherits state it cannot use. Each worker
imports this module only, which must stay light (numpy and PIL, no torch), so a pool starts in
a fraction of a second; like any multiprocessing worker, it also imports the parent's
``__main__`` module first (a script's top-level code needs an ``if __name__ == "__main__"``
guard). A daemonic process (a dask worker's) may not have child processes, so there the pool
is one of threads instead: Pillow releases the GIL while it decodes and resizes, so threads
decode in parallel too (bench/decoding.py measures both).

Workers write uint8 pixels into shared memory (a quarter of the float32 bytes, and no pickling
through a pipe); the reading thread converts each task's pixels to float32 as it arrives, while
the workers decode the next ones, with the same code (:func:`to_unit_float`) whatever the
number of decoders, so the values are bit-identical for any number of them.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import threading
from collections import deque
from concurrent import futures
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import shared_memory

import numpy as np

TASKS_PER_WORKER = 4  # a read is cut into at least this many tasks per worker: none waits long
# the shared memory one read writes, over its 2 x decoders blocks (at least one image each):
# half of Docker's default /dev/shm (64 MiB), where a write beyond it kills the worker (SIGBUS)
SHARED_BYTES = 32 << 20


class Unreadable(Exception):
    """A file that could not be decoded: its path and the type name of the error."""

    def __init__(self, path: str, kind: str):
        super().__init__(path, kind)
        self.path, self.kind = path, kind


def decode_files(paths: list[str], size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Each file as RGB resized to ``size``² (bilinear): uint8 [len(paths), 3, size, size]
    (channels first, so the float conversion is one contiguous pass), in order, into ``out``
    if given. Raises :class:`Unreadable` for the first file that fails."""
    from PIL import Image

    out = np.empty((len(paths), 3, size, size), np.uint8) if out is None else out
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB").resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(rgb).transpose(2, 0, 1)
        except Exception as exc:  # PIL raises assorted errors on a damaged or foreign file
            raise Unreadable(str(path), type(exc).__name__) from None
    return out


_MAPPED: dict[str, shared_memory.SharedMemory] = {}  # the blocks this worker has mapped, by name


def decode_into(block: str, paths: list[str], size: int) -> None:
    """:func:`decode_files` into the shared memory block named ``block`` (a worker's task).

    Pixels written there cost nothing to pass back (returned, they were pickled through a pipe
    for 0.15-0.25 ms more CPU per 224² image, 6-8% of decoding it). A pool's blocks live as
    long as the pool and each worker maps each block once: writing into fresh shared memory
    pages (no huge pages) cost another 0.1-0.4 ms per image."""
    if block not in _MAPPED:
        _MAPPED[block] = shared_memory.SharedMemory(block)
    decode_files(paths, size, np.ndarray((len(paths), 3, size, size), np.uint8,
                                         buffer=_MAPPED[block].buf))


def to_unit_float(pixels: np.ndarray, out: np.ndarray) -> None:
    """uint8 ``pixels`` as float32 in [0, 1], into ``out``: converted to float32, then divided
    by 255, exactly the values of converting each image on its own (as before decoders)."""
    out[...] = pixels
    out /= 255.0


def decode(paths: list[str], size: int, decoders: int) -> np.ndarray:
    """The files at ``paths`` as float32 [len(paths), 3, size, size] in [0, 1], in order, decoded
    on ``decoders`` workers (1: on this thread); a damaged file raises :class:`Unreadable` for
    the first one in ``paths``, as on one thread.

    The read is cut into tasks, each decoded into one of ``2 x decoders`` shared memory blocks
    and converted out in order as it finishes (while the workers decode the next ones), its
    block then given to the next task: memory stays bounded whatever the read's size, and every
    worker has a task queued."""
    out = np.empty((len(paths), 3, size, size), np.float32)
    if decoders == 1 or len(paths) <= 1:
        to_unit_float(decode_files(paths, size), out)
        return out
    image = 3 * size * size
    per_task = max(1, min(SHARED_BYTES // (2 * decoders * image),
                          -(-len(paths) // (TASKS_PER_WORKER * decoders))))
    starts = range(0, len(paths), per_task)
    workers = pool(decoders)
    blocks: list[shared_memory.SharedMemory] = []
    free, pending = [], deque()

    def collect() -> None:  # the oldest task: wait for it, convert its pixels, free its block
        start, block, future = pending.popleft()
        future.result()
        n = min(per_task, len(paths) - start)
        to_unit_float(np.ndarray((n, 3, size, size), np.uint8, buffer=block.buf), out[start:start + n])
        free.append(block)

    try:
        blocks.extend(workers.take() for _ in range(min(2 * decoders, len(starts))))
        free.extend(blocks)
        for start in starts:
            if not free:
                collect()
            block = free.pop()
            task = paths[start:start + per_task]
            pending.append((start, block, workers.executor.submit(decode_into, block.name, task, size)))
        while pending:
            collect()
    except BrokenProcessPool as exc:
        _forget(decoders)  # the next read starts a new pool
        exc.add_note("a decoding process died: it was killed (e.g. out of memory or /dev/shm "
                     "full), or it re-ran a main script that lacks an `if __name__ == "
                     "\"__main__\":` guard; decoders=1 decodes on the loading thread")
        raise
    finally:
        # after an error, a block goes back only once no task writes into it any more
        futures.wait([future for _, _, future in pending if not future.cancel()])
        workers.give(blocks)
    return out


@dataclass
class Pool:
    """A pool of decoders: the workers, and the shared memory blocks they decode into, made as
    reads need them and reused by every later read (each sized for any task: untouched pages
    of a block take no memory)."""

    executor: Executor
    free: list[shared_memory.SharedMemory] = field(default_factory=list)
    blocks: list[shared_memory.SharedMemory] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> shared_memory.SharedMemory:
        with self.lock:
            if not self.free:
                self.blocks.append(shared_memory.SharedMemory(create=True, size=SHARED_BYTES))
                self.free.append(self.blocks[-1])
            return self.free.pop()

    def give(self, blocks: list[shared_memory.SharedMemory]) -> None:
        with self.lock:
            self.free.extend(blocks)

    def close(self, join: bool = True) -> None:
        self.executor.shutdown(wait=join, cancel_futures=True)
        for block in self.blocks:
            mapped = _MAPPED.pop(block.name, None)  # a thread pool's workers map it in this process
            if mapped is not None:
                mapped.close()
            block.close()
            block.unlink()


_POOLS: dict[int, Pool] = {}
_LOCK = threading.Lock()


def pool(decoders: int) -> Pool:
    """This process's pool of ``decoders`` workers, made on first use: processes, or threads in
    a daemonic process (which may not have children)."""
    with _LOCK:
        if decoders not in _POOLS:
            if multiprocessing.current_process().daemon:
                executor = ThreadPoolExecutor(decoders, thread_name_prefix="kdcache-decode")
            else:
                executor = ProcessPoolExecutor(decoders, mp_context=multiprocessing.get_context("forkserver"))
            _POOLS[decoders] = Pool(executor)
        return _POOLS[decoders]


def _forget(decoders: int) -> None:
    with _LOCK:
        broken = _POOLS.pop(decoders, None)
    if broken is not None:
        broken.close(join=False)


def shutdown() -> None:
    """Stop every pool of this process and free its shared memory (registered at exit; a later
    read makes a new pool)."""
    with _LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for each in pools:
        each.close()


def _after_fork_in_child() -> None:
    # A forked child (e.g. a user's fork-started DataLoader) inherits the pools' bookkeeping but
    # not their workers, and must not unlink the parent's blocks: it starts with no pool, and a
    # fresh lock (one held at the fork would never be released).
    global _LOCK
    _POOLS.clear()
    _LOCK = threading.Lock()


atexit.register(shutdown)
os.register_at_fork(after_in_child=_after_fork_in_child)


def auto_decoders(device: str = "auto") -> int:
    """``decoders=0``: the cores the teacher leaves free. On a GPU (``device`` cuda, or auto with
    one visible) the teacher's forwards need about one core to feed it, so cores − 1. On the
    CPU, 1: the forwards already run on every core (``streams`` × ``threads``) and decoding on
    the loading thread overlaps them; decoder processes only take cores from the forwards'
    threads (a resnet18 build at 224² on 2 cores ran 1.2-1.3x slower with 2). A small teacher
    on large photos decodes more than it computes: pass decoders=N there."""
    from pipeline import runtime  # imports torch: the parent's decision, never a worker's

    gpu = device != "cpu" and runtime.pick_device("auto").type == "cuda"
    return max(1, runtime.cores() - 1) if gpu else 1
