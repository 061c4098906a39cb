"""Stage one and sweeps on a real multi-process Dask cluster: ``dask scheduler`` and
``dask worker --nworkers 2 --nthreads 1`` processes on 127.0.0.1, started by a session fixture
(conftest.py dask_cluster) and stopped by process group at the end, even after a failure.

What a user relies on: a cluster build is byte-identical to an in-process one, also when a
worker is SIGKILLed mid-build (Dask reschedules its shard; shard writes are idempotent); each
worker runs torch on its own share of its host's cores; a sweep lands each run's row exactly
once, also when a run's task runs twice; a scheduler nobody listens at is one line, exit 2,
and nothing written.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.dask_processes import ProcessCluster
from conftest import cache_args
from pipeline import cluster, runtime
from pipeline.cache import format as fmt
from pipeline.cache import open_cache
from pipeline.results import read_results, results_dir
from stages.cli import main
from test_faults import array_files, assert_no_stray_files, one_error_line

# ~94 shards of 64 rows: a build of a few seconds on two one-thread workers, long enough to
# kill a worker in the middle of it
DATASET = "synthetic:6000:3x16x16:4"


def build_args(root: Path, work: Path, **overrides) -> list[str]:
    return cache_args(root, work, dataset=DATASET, teacher="resnet_small", threads=1, **overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same cache built in this process (the default pipeline, one torch thread per stream)."""
    work = tmp_path_factory.mktemp("reference")
    root = work / "cache"
    assert main(["cache", *build_args(root, work, scheduler="local")]) == 0
    return root


def assert_same_cache(root: Path, reference: Path) -> None:
    assert array_files(root) == array_files(reference)
    for split in ("train", "val", "test"):
        assert open_cache(root).index(split).equals(open_cache(reference).index(split))
    assert_no_stray_files(root)


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


class Background:
    """``kdcache ARGV`` (in this process) on a thread, so the test can act while it runs."""

    def __init__(self, *argv: str):
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, args=(argv,), daemon=True)
        self.thread.start()

    def _run(self, argv) -> None:
        self.rc = main(list(argv))

    def running(self) -> bool:
        return self.thread.is_alive()

    def wait(self, timeout: float = 300) -> int | None:
        self.thread.join(timeout)
        return self.rc


def kill_a_busy_worker(dask_cluster: ProcessCluster) -> int:
    """SIGKILL a worker process (not its nanny) that is running a task; returns its pid."""
    with dask_cluster.client() as client:
        wait_for(lambda: any(client.processing().values()), "a worker running a task")
        busy = next(w for w, keys in client.processing().items() if keys)
        pid = client.run(os.getpid, workers=[busy])[busy]
    os.kill(pid, signal.SIGKILL)
    return pid


def replaced(processes: ProcessCluster, pid: int, workers: int = 2) -> bool:
    """The nanny restarted the killed worker: all workers again, the dead one not among them."""
    processes.wait_for_workers(workers)
    return pid not in processes.worker_pids().values()


# =========================================================================== stage one

@pytest.mark.slow
def test_each_worker_decides_its_torch_threads_from_its_own_host(dask_cluster):
    """Two one-thread workers share this host's cores (not the client's choice); an explicit
    threads=N wins; a task runs on what its worker decided."""
    def task_threads() -> int:
        cluster.use_threads()
        import torch

        return torch.get_num_threads()

    def threads_of_tasks(settings: cluster.WorkerSettings) -> set[int]:
        with cluster.connect(dask_cluster.address, processes=False, settings=settings) as client:
            return set(client.gather([client.submit(task_threads, pure=False) for _ in range(4)]))

    assert threads_of_tasks(cluster.WorkerSettings()) == {max(1, runtime.cores() // 2)}
    assert threads_of_tasks(cluster.WorkerSettings(threads=3)) == {3}


@pytest.mark.slow
def test_a_cluster_build_is_byte_identical_to_an_in_process_one(dask_cluster, reference, tmp_path):
    root = tmp_path / "cache"
    assert main(["cache", *build_args(root, tmp_path, scheduler=dask_cluster.address)]) == 0
    assert_same_cache(root, reference)


@pytest.mark.slow
def test_a_token_cache_built_on_the_cluster_is_byte_identical(dask_cluster, token_corpus, tiny_llama, tmp_path):
    """A causal-LM teacher over token windows: the workers reopen the token dataset (its
    tokenizer folder travels in the cache's config) and compute the same arrays and index as
    this process, under the same manifest key."""
    def token_cache(name: str, scheduler: str) -> Path:
        root = tmp_path / name
        assert main(["cache", f"dataset=tokens:{token_corpus}", f"teacher=hf:{tiny_llama}", "seq_len=128",
                     "logits=topk:4", "shard_size=32", "threads=1", "device=cpu",
                     f"scheduler={scheduler}", f"cache={root}"]) == 0
        return root

    here, there = token_cache("here", "synchronous"), token_cache("there", dask_cluster.address)
    assert fmt.read_manifest(there)["key"] == fmt.read_manifest(here)["key"]
    assert_same_cache(there, here)


@pytest.mark.slow
def test_a_worker_killed_mid_build_is_replaced_and_the_cache_is_byte_identical(dask_cluster, reference,
                                                                               tmp_path, capsys):
    root = tmp_path / "cache"
    build = Background("cache", *build_args(root, tmp_path, scheduler=dask_cluster.address))
    wait_for(lambda: len(list((root / fmt.PARTS).glob("*/*.json"))) >= 3 or not build.running(),
             "the build's first shards")
    assert build.running(), "the build finished before a worker could be killed"
    pid = kill_a_busy_worker(dask_cluster)
    assert build.wait() == 0, capsys.readouterr().err
    assert_same_cache(root, reference)
    assert replaced(dask_cluster, pid)


@pytest.mark.slow
def test_a_shard_that_kills_its_workers_is_one_line_and_the_build_resumes(tmp_path, capsys, monkeypatch,
                                                                          builder):
    """What Dask reports after a task took down every worker it ran on (KilledWorker): one
    line, and the shards done so far stay, as after any interruption (here on local workers:
    the third shard's task raises it)."""
    from distributed.scheduler import KilledWorker

    from pipeline.cache import shard

    real, calls = shard.build_shard, []

    def dies(job):
        calls.append(job.shard)
        if len(calls) == 3:
            raise KilledWorker(f"build_shard-{job.shard}", SimpleNamespace(address="tcp://lost:1"), 3)
        return real(job)

    root = tmp_path / "cache"
    args = cache_args(root, tmp_path, scheduler="local", workers=2, threads=1)
    with monkeypatch.context() as m:
        m.setattr(shard, "build_shard", dies)
        assert main(["cache", *args]) == 2
    line = one_error_line(capsys, "cache")
    assert "killed every dask worker that ran it" in line and "re-run the same command to resume" in line
    assert fmt.read_manifest(root)["status"] == "building"  # kept, not removed
    assert main(["cache", *args]) == 0
    builder(tmp_path / "fresh", tmp_path, scheduler="local", workers=2, threads=1)
    assert array_files(root) == array_files(tmp_path / "fresh")


@pytest.mark.parametrize("verb", ["cache", "sweep"])
def test_an_unreachable_scheduler_is_one_line_and_leaves_nothing(verb, make_cache, tmp_path, capsys):
    with socket.socket() as s:  # a port that nothing listens at
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    if verb == "cache":
        work = tmp_path / "work"
        args = cache_args(work / "cache", work, scheduler=address)
    else:
        cache = make_cache()
        work = tmp_path / "runs"
        args = [f"cache={cache}", f"runs_dir={work}", "grid.model=mlp", "grid.seed=0", f"scheduler={address}"]
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main([verb, *args]) == 2
    line = one_error_line(capsys, verb)
    assert f"cannot reach the dask scheduler at {address}" in line and "scheduler=local" in line
    assert time.perf_counter() - t0 < 10  # refused at once, not after a connection timeout
    assert not work.exists()
    if verb == "sweep":
        assert not results_dir(cache).exists()


# =========================================================================== sweeps

GRID = ["grid.model=mlp logreg", "grid.loss=kd ce", "grid.seed=0 1", "epochs=2", "threads=1"]  # 6 runs
COMPARED = ("test_accuracy", "val_accuracy", "teacher_agreement", "kl_teacher_student", "ece", "C")


def rows_by_run(cache: Path) -> dict[tuple, dict]:
    rows = read_results(results_dir(cache)).to_pylist()
    by_run = {(r["model"], r["loss"], r["seed"]): r for r in rows}
    assert len(by_run) == len(rows) == len({r["run_id"] for r in rows})  # each run once
    return by_run


def run_dirs(runs: Path) -> list[Path]:
    """Every directory under runs_dir's per-cache folder, hidden ones (attempts) included."""
    return sorted(p for folder in runs.iterdir() for p in folder.iterdir())


@pytest.mark.slow
def test_a_sweep_on_the_cluster_lands_each_row_once_as_in_process(dask_cluster, make_cache, tmp_path, capsys):
    here, there = make_cache("here"), make_cache("there")
    assert main(["sweep", f"cache={here}", f"runs_dir={tmp_path / 'runs-here'}", *GRID]) == 0
    capsys.readouterr()
    assert main(["sweep", f"cache={there}", f"runs_dir={tmp_path / 'runs-there'}", *GRID,
                 f"scheduler={dask_cluster.address}"]) == 0
    out = capsys.readouterr().out.splitlines()
    progress = [line.split()[0] for line in out[1:] if line.startswith("[")]
    assert progress == [f"[{i}/6]" for i in range(1, 7)]  # as they finish
    expected, got = rows_by_run(here), rows_by_run(there)
    assert len(got) == 6 and set(got) == set(expected)
    for run, row in got.items():  # the same numbers on the same torch threads
        assert {k: row[k] for k in COMPARED} == {k: expected[run][k] for k in COMPARED}, run
    dirs = run_dirs(tmp_path / "runs-there")
    assert [p.name for p in dirs] == sorted(r["run_id"] for r in got.values())


@pytest.mark.slow
def test_a_worker_killed_mid_sweep_still_lands_each_row_once(dask_cluster, make_cache, tmp_path, capsys):
    cache, runs = make_cache(), tmp_path / "runs"
    capsys.readouterr()
    sweep = Background("sweep", f"cache={cache}", f"runs_dir={runs}", "grid.model=mlp", "grid.loss=kd ce",
                       "grid.seed=0 1", "epochs=60", "batch_size=16", f"scheduler={dask_cluster.address}")
    pid = kill_a_busy_worker(dask_cluster)
    assert sweep.running(), "the sweep finished before a worker could be killed"
    rc = sweep.wait()
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(rows_by_run(cache)) == 4
    assert len([line for line in out.splitlines() if line.startswith("[")]) == 4
    assert [p.name for p in run_dirs(runs)] == sorted(r["run_id"] for r in rows_by_run(cache).values())
    assert replaced(dask_cluster, pid)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["cluster", "local"])
def test_an_error_in_a_run_on_a_worker_is_one_line(where, request, make_cache, tmp_path, capfd):
    """(capfd: local worker processes write to this process's stderr, and must not.)"""
    scheduler = (["scheduler=local", "workers=2"] if where == "local"
                 else [f"scheduler={request.getfixturevalue('dask_cluster').address}"])
    cache = make_cache()  # one view per row: views=3 is refused where the run reads the cache
    assert main(["sweep", f"cache={cache}", f"runs_dir={tmp_path / 'runs'}", "grid.model=mlp", "grid.loss=kd",
                 "grid.seed=0", "views=3", *scheduler]) == 2
    assert "views=3 is more than cache" in one_error_line(capfd, "sweep")
    assert not results_dir(cache).exists()


def test_a_second_attempt_at_a_run_replaces_the_first(make_cache, tmp_path):
    """What a retried sweep task does: the same run_id, so one row and one run directory,
    whatever the first attempt left (here: a whole run, and a killed attempt's private dir)."""
    from pipeline.config import StudentConfig
    from pipeline.sweep import student_task

    cache, runs = make_cache(), tmp_path / "runs"
    cfg = StudentConfig(cache=str(cache), runs_dir=str(runs), model="logreg")
    first = student_task(cfg, "20260101-000000-logreg-target-labels-s0-abcdef")
    killed = Path(first["run_dir"]).parent / f".{Path(first['run_dir']).name}.incomplete-dead00"
    killed.mkdir()
    (killed / "metrics.json").write_text("half")
    second = student_task(cfg, first["run_id"])
    assert second["run_dir"] == first["run_dir"] and second["results"] == first["results"]
    (row,) = read_results(results_dir(cache)).to_pylist()
    assert row["time"] == second["time"] != first["time"]
    assert run_dirs(runs) == [Path(first["run_dir"])]


@pytest.mark.slow
def test_a_sweep_on_local_worker_processes(make_cache, tmp_path, capsys):
    cache = make_cache()
    capsys.readouterr()
    assert main(["sweep", f"cache={cache}", f"runs_dir={tmp_path / 'runs'}", "grid.model=mlp logreg",
                 "grid.loss=kd", "grid.seed=0", "epochs=2", "scheduler=local", "workers=2"]) == 0
    assert {(m, s) for m, _, s in rows_by_run(cache)} == {("mlp", 0), ("logreg", 0)}
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:] if line.startswith("[")] == ["[1/2]", "[2/2]"]


@pytest.mark.slow
def test_stopping_the_cluster_ends_every_process_it_started(tmp_path):
    """What the fixture relies on: a nanny's restarted worker is stopped too."""
    with ProcessCluster(tmp_path / "dask", workers=1) as processes:
        groups = [p.pid for p in processes.procs]
        pid = next(iter(processes.worker_pids().values()))
        os.kill(pid, signal.SIGKILL)
        assert replaced(processes, pid, workers=1)
    # SIGKILLed members take a moment to die (seen under load: one still running right after)
    deadline = time.monotonic() + 10
    while live_members(groups) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_members(groups) == []


def live_members(groups: list[int]) -> list[int]:
    """Processes of these process groups still running (zombies are dead: an init that does
    not reap them, as in some containers, leaves them listed)."""
    import psutil

    def member(proc: psutil.Process) -> bool:
        try:
            return os.getpgid(proc.pid) in groups and proc.status() != psutil.STATUS_ZOMBIE
        except (ProcessLookupError, psutil.Error):
            return False
    return [proc.pid for proc in psutil.process_iter() if member(proc)]
