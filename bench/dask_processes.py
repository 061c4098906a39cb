"""A real multi-process Dask cluster on this machine, started as users start one:
``dask scheduler`` and ``dask worker ADDRESS --nworkers N --nthreads T``, each a process of its
own (with nannies, which restart a killed worker). Used by bench/cluster.py and the cluster
tests; importing this module has no side effects.

Processes started by ``dask worker`` keep running until killed, so each command runs in a
session (process group) of its own, and :meth:`ProcessCluster.stop` ends every process of
both groups by their group ids: the commands, their nannies and workers, including workers a
nanny restarted after a kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DASK = str(Path(sys.executable).parent / "dask")


class ProcessCluster:
    """``with ProcessCluster(workdir, workers=2) as cluster:`` ... ``cluster.address``."""

    def __init__(self, workdir: Path, workers: int = 2, threads: int = 1, timeout: float = 120):
        self.workdir, self.workers, self.threads, self.timeout = Path(workdir), workers, threads, timeout
        self.procs: list[subprocess.Popen] = []
        self.address = ""

    def __enter__(self) -> ProcessCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        file = self.workdir / "scheduler.json"
        file.unlink(missing_ok=True)
        self._spawn("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                  "--no-dashboard", "--scheduler-file", str(file)])
        deadline = time.monotonic() + self.timeout
        while not file.is_file():
            self._check_alive(deadline)
            time.sleep(0.1)
        time.sleep(0.1)  # the scheduler writes the file in one go; be sure it is whole
        self.address = json.loads(file.read_text())["address"]
        self._spawn("workers", [DASK, "worker", self.address, "--host", "127.0.0.1",
                                "--nworkers", str(self.workers), "--nthreads", str(self.threads),
                                "--no-dashboard", "--local-directory", str(self.workdir / "scratch")])
        self.wait_for_workers(self.workers)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.workdir / f"{name}.log", "ab") as log:  # the child keeps its own copy
            # a session of its own: stop() ends the whole group, children included
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                               stdin=subprocess.DEVNULL, start_new_session=True))

    def _check_alive(self, deadline: float) -> None:
        dead = [p for p in self.procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"dask cluster did not start (see the logs in {self.workdir})")

    def client(self):
        from distributed import Client

        return Client(self.address, timeout="30s")

    def wait_for_workers(self, n: int) -> None:
        """Until ``n`` workers are registered and their nannies are done starting: a worker
        killed in the moment between the two takes its nanny down with it (nanny-start-failed)
        instead of being restarted."""
        def status(dask_worker) -> str:  # run in each nanny's process; a local function is
            return dask_worker.status.name  # pickled by value (bench is not importable there)

        deadline = time.monotonic() + self.timeout
        with self.client() as client:
            client.wait_for_workers(n, timeout=self.timeout)
            while set(client.run(status, nanny=True).values()) != {"running"}:
                self._check_alive(deadline)
                time.sleep(0.05)

    def worker_pids(self) -> dict[str, int]:
        """``{worker address: pid}`` of the workers (not their nannies)."""
        with self.client() as client:
            return client.run(os.getpid)

    def stop(self) -> None:
        """End every process this cluster started: SIGTERM to each group (nannies close their
        workers), then, after a few seconds, SIGKILL to whatever is left of it."""
        for proc in reversed(self.procs):  # workers first, then the scheduler
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            _signal_group(proc.pid, signal.SIGKILL)  # e.g. a worker whose nanny is gone
            proc.wait()
        self.procs = []


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the whole group has exited already
        pass
