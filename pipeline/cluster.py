"""Talking to Dask: the client of ``scheduler=`` (an address, or ``local`` with ``workers=N``),
the settings each worker decides for itself, and the results of tasks as they finish.

Importing this module imports distributed (~0.4 s): callers import it only when a scheduler
is in use.

Why settings are decided on the worker: a worker's cores, its threads and its neighbours on
the same host are known there, not on the client. Deciding torch threads on the client from the
client's cores oversubscribed a 2-core host running 2 one-thread workers 4 threads deep
(measured: 0.18x the in-process build). :class:`WorkerSettings` is a ``WorkerPlugin`` that each
worker runs when it is registered, and again when a worker joins (a nanny restarting a killed
one included), so every worker process is set up before its first task.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import socket
from concurrent.futures import CancelledError
from typing import Any, Callable, Iterable, Iterator

from distributed import Client, LocalCluster, WorkerPlugin, as_completed
from distributed.comm.addressing import get_address_host, parse_address, parse_host_port
from distributed.scheduler import KilledWorker

from pipeline import runtime
from pipeline.errors import Interrupted, KdError, first_line

# What WorkerSettings decided in this (worker) process: tasks read it (see use_threads).
_DECIDED: dict[str, int] = {}
PLUGIN = "kdcache"  # the name WorkerSettings are registered under

# glibc's mallopt parameters, and the values set on workers (see _undo_nanny_malloc)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold on 64-bit
_TRIM_THRESHOLD = 64 << 20


def check_reachable(scheduler: str) -> None:
    """Fail fast, in one line, when nothing listens at a scheduler's TCP address: before any
    work is done or anything is written (``Client`` alone retries for its whole timeout)."""
    if scheduler in ("local", "synchronous"):
        return
    protocol, location = parse_address(scheduler)
    if protocol not in ("tcp", "tls"):
        return  # e.g. inproc://: nothing to probe from outside
    host, port = parse_host_port(location)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise KdError(f"cannot reach the dask scheduler at {scheduler} ({exc.strerror or exc}); "
                      "start one (`dask scheduler`, then `dask worker ADDRESS`) or use "
                      "scheduler=local") from None


@contextlib.contextmanager
def connect(scheduler: str, workers: int = 1, *, processes: bool,
            settings: WorkerSettings | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler=``: ``local`` starts a LocalCluster of
    ``workers`` workers of one thread each (threads of this process, or with ``processes``
    one process each), closed on exit; an address connects to that scheduler. ``settings``
    are registered on the workers for the duration of the block (so workers that join while
    it runs get them too), and every worker has run them before the block starts. They are
    registered under one name: a later build's replace an interrupted one's, never pile up."""
    cluster = None
    if scheduler == "local":
        # ":0" = a free port: None still binds 8787 and warns when another cluster has it
        # (distributed #8136), e.g. two builds of different caches at once.
        # Worker processes log a failed task ("Compute Failed", a traceback) on our stderr,
        # before its error reaches this client as the one line the user is owed: keep quiet.
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes,
                               dashboard_address=":0",
                               silence_logs=logging.CRITICAL if processes else logging.ERROR)
        client = Client(cluster)
    else:
        check_reachable(scheduler)
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a malformed address
            raise KdError(f"cannot reach the dask scheduler at {scheduler} ({first_line(exc)}); "
                          "start one or use scheduler=local") from None
    try:
        if settings is not None:
            client.register_plugin(settings, name=PLUGIN)
        yield client
        if settings is not None:  # not on the way out of an error: the scheduler may be gone
            client.unregister_worker_plugin(PLUGIN)
    except BaseException:
        quiet()
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def finished(futures: list, what: Callable[[int], str]) -> Iterator[tuple[int, Any]]:
    """``(position, result)`` of each future as it finishes. A task's own KdError comes back
    as it was raised; a task that killed every worker it ran on, or a scheduler that went
    away, becomes one :class:`Interrupted` line (``what(i)`` names the task): the work done
    so far stays."""
    position = {f.key: i for i, f in enumerate(futures)}
    for future in as_completed(futures):
        i = position[future.key]
        try:
            yield i, future.result()
        except KilledWorker:
            raise Interrupted(f"{what(i)} killed every dask worker that ran it (out of memory? "
                              "see the workers' logs); re-run the same command to resume") from None
        except CancelledError:
            raise Interrupted(f"lost the dask scheduler while {what(i)} ran; restart the cluster "
                              "and re-run the same command to resume") from None


def quiet() -> None:
    """Silence dask.distributed for the rest of the process. After Ctrl-C or a failed task the
    cluster's comms are torn down mid-flight, and distributed logs each closed comm with a
    traceback, some of them after ``cluster.close()`` has restored its log levels. The user is
    owed one line saying what happened, not that noise; real errors still raise."""
    for name in ["distributed", *logging.root.manager.loggerDict]:
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def use_threads(explicit: int = 0) -> None:
    """In a task: run torch on ``explicit`` threads if given, else on what this worker's
    :class:`WorkerSettings` decided; where none ran (this process, whose threads its caller
    set), leave torch as it is. Applied here, on the task's own thread, because torch's
    thread count is per OS thread once that thread has run torch (OpenMP): setting it in the
    plugin's ``setup`` would not reach a warm worker's executor thread."""
    threads = explicit or _DECIDED.get("threads", 0)
    if threads:
        runtime.set_threads(threads)


class WorkerSettings(WorkerPlugin):
    """What a worker sets up for kdcache's tasks, decided on the worker (a dask WorkerPlugin).

    - torch threads: ``threads`` if the user gave them, else the worker's cores shared
      among the threads of every worker on its host (the scheduler knows them all), so that
      ``dask worker --nworkers 2 --nthreads 1`` on 2 cores runs 1 thread per worker;
    - glibc's malloc thresholds (see :func:`_undo_nanny_malloc`);
    - ``warm()``, e.g. loading the teacher and the dataset into the worker's process state
      (once per process) before its first task, off the worker's event loop.
    """

    def __init__(self, threads: int = 0, warm: Callable[[], object] | None = None):
        self.threads, self.warm = threads, warm

    async def setup(self, worker) -> None:
        _DECIDED["threads"] = self.threads or await _threads_for(worker)
        _undo_nanny_malloc()
        if self.warm is not None:
            try:
                await asyncio.to_thread(self.warm)
            except KdError as exc:  # e.g. a checkpoint the client sees and this worker does not
                raise KdError(f"on dask worker {worker.address} ({socket.gethostname()}): {exc}") from None


async def _threads_for(worker) -> int:
    """This worker's share of its host's cores: cores // threads of all workers on the host
    (this one's own, if the scheduler cannot say)."""
    host = get_address_host(worker.address)
    try:
        workers: Iterable[dict] = (await worker.scheduler.identity())["workers"].values()
        on_host = sum(w["nthreads"] for w in workers if w.get("host") == host)
    except (OSError, KeyError, TypeError):
        on_host = 0
    return max(1, runtime.cores() // max(on_host, worker.state.nthreads))


def _undo_nanny_malloc() -> None:
    """dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also freezes
    glibc's mmap threshold at 128 KiB: every larger tensor (a batch's activations) is then
    mmapped, page-faulted in and unmapped at each use. A one-thread resnet_small forward at
    batch 256 ran at ~2,000 rows/s so, against ~4,200 with glibc's defaults and ~6,500 with
    the thresholds set here, which keep freed memory for reuse (up to 64 MiB per worker)."""
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return  # glibc's dynamic thresholds are in force: leave them
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc, musl; not macOS
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
