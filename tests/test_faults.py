"""Faults: processes killed at random moments, disks that fail, files damaged after the fact,
and several processes at once. Each test asserts what a user relies on afterwards: nothing
recorded as done is missing or partial, a re-run finishes the job byte-identically, and damage
is reported (naming the file) instead of being served.

The kill-trial harness runs ``KDCACHE_KILL_TRIALS`` seeded trials (one in ``make test``, 20 in
``make soak``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cache_args
from pipeline.cache import format as fmt
from pipeline.cache import open_cache
from pipeline.errors import KdError
from pipeline.results import read_results, results_dir
from stages.cli import main

KDCACHE = str(Path(sys.executable).parent / "kdcache")
# One trial in make test: each trial is several subprocess builds of the harness (tens of
# seconds on two cores), and further trials only draw other kill moments: those are soak work.
KILL_TRIALS = int(os.environ.get("KDCACHE_KILL_TRIALS", "1"))
SOAK = KILL_TRIALS > 2  # make soak (KDCACHE_KILL_TRIALS=20)
# The multi-view and student kills repeat the harness above on other data: the rest in make soak
# (a multi-view trial costs several builds of four views).
VIEW_KILL_TRIALS = max(1, KILL_TRIALS - 2)
STUDENT_KILL_TRIALS = max(1, KILL_TRIALS // 4)

# Big enough that a build spans many shards and takes a while after the imports, small enough
# that one uninterrupted run takes a few seconds: 2,400 rows = 38 shards of 64 rows.
HARNESS_DATASET = "synthetic:2400:3x16x16:4"


def harness_args(root: Path, work: Path, **views) -> list[str]:
    return cache_args(root, work, dataset=HARNESS_DATASET, teacher="resnet_small",
                      scheduler="local", workers=2, threads=1, **views)  # dask, two shards at once


# A multi-view build of the same rows: 4 views per train row, 64-row shards as above.
VIEWS = {"views": 4, "augment": "crop:2+flip"}


def _default_sigint() -> None:
    # A shell's background job (`make soak &`, nohup) starts with SIGINT ignored, and children
    # inherit that: Python then never raises KeyboardInterrupt, and the SIGINT tests would
    # test nothing. Ctrl-C reaches kdcache with the default disposition, so give it that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([KDCACHE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint, **kw)


def array_files(root: Path) -> dict[str, bytes]:
    base = root / fmt.ARRAYS
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def stored(root: Path, key: str, start: int, stop: int) -> np.ndarray:
    import zarr

    return np.ascontiguousarray(zarr.open_group(root / fmt.ARRAYS, mode="r")[key][start:stop])


def recorded_shards(root: Path) -> list[dict]:
    """Every shard the cache counts as done: completion records while building, the manifest's
    shard list once complete."""
    if not (root / fmt.MANIFEST).is_file():
        return []
    manifest = fmt.read_manifest(root)
    if manifest["status"] == "complete":
        return [r for records in manifest["shards"].values() for r in records]
    return [json.loads(p.read_text()) for p in sorted((root / fmt.PARTS).glob("*/*.json"))]


def shard_file(root: Path, key: str, shard: int) -> Path:
    import zarr

    arr = zarr.open_group(root / fmt.ARRAYS, mode="r")[key]
    return root / fmt.ARRAYS / key / arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))


def assert_recorded_shards_are_whole(root: Path, reference: Path) -> list[dict]:
    records = recorded_shards(root)
    for rec in records:
        for key, digest in rec["sha256"].items():
            data = stored(root, key, rec["start"], rec["stop"])
            assert hashlib.sha256(data.tobytes()).hexdigest() == digest, (key, rec["shard"])
            assert np.array_equal(data, stored(reference, key, rec["start"], rec["stop"]))
    return records


def assert_no_stray_files(root: Path) -> None:
    allowed_top = {fmt.MANIFEST, fmt.CONFIG, fmt.ARRAYS, fmt.INDEX}
    assert {p.name for p in root.iterdir()} <= allowed_top
    for path in root.rglob("*"):
        assert not path.name.endswith((".tmp", ".partial")), path
    ours = {p.name for p in root.parent.iterdir() if p.name.startswith(f".{root.name}.")}
    assert ours <= {f".{root.name}.lock"}, ours


def uninterrupted(work: Path, **views) -> tuple[Path, float]:
    """An uninterrupted build by the harness command, and how long the whole process took."""
    root = work / "cache"
    t0 = time.perf_counter()
    proc = run_cli(["cache", *harness_args(root, work, **views)], cwd=work)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return root, time.perf_counter() - t0


@pytest.fixture(scope="module")
def reference(harness_reference) -> tuple[Path, float]:
    return harness_reference  # built once per session (conftest.py), shared with object storage


@pytest.fixture(scope="module")
def reference_views(tmp_path_factory) -> tuple[Path, float]:
    return uninterrupted(tmp_path_factory.mktemp("reference_views"), **VIEWS)


# =========================================================================== kill during caching

@pytest.mark.slow
@pytest.mark.parametrize("trial", range(KILL_TRIALS))
def test_sigkill_during_caching_then_resume(tmp_path, reference, trial):
    kill_and_resume(tmp_path, reference, trial)


@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="make soak; make test kills a 4-view build with its augmentation "
                                     "arrays in test_sigkill_during_sparse_caching_then_resume")
@pytest.mark.parametrize("trial", range(VIEW_KILL_TRIALS))
def test_sigkill_during_multiview_caching_then_resume(tmp_path, reference_views, trial):
    """The same with views: every recorded shard holds all its views and their parameters, and
    the resumed cache is byte-identical to the uninterrupted one, augmentation arrays included."""
    kill_and_resume(tmp_path, reference_views, 2000 + trial, **VIEWS)
    assert (tmp_path / "cache" / fmt.ARRAYS / "train" / "augment").is_dir()


# Sparse logits (4 classes): top-2 of every view, and 3 classes drawn per view
SPARSE = {"topk": {"logits": "topk:2", **VIEWS}, "sample": {"logits": "sample:3", **VIEWS}}


# make test kills a sample:K build of 4 views (sparse arrays, keyed draws and augmentation
# arrays: all a multi-view build writes but dense logits, which the plain trial covers); make
# soak both modes, and the dense multi-view trials above
@pytest.fixture(scope="module", params=sorted(SPARSE) if SOAK else ["sample"])
def reference_sparse(request, tmp_path_factory) -> tuple[Path, float, str]:
    root, seconds = uninterrupted(tmp_path_factory.mktemp(f"reference_{request.param}"),
                                  **SPARSE[request.param])
    return root, seconds, request.param


@pytest.mark.slow
def test_sigkill_during_sparse_caching_then_resume(tmp_path, reference_sparse):
    """The same with sparse logits and views: the sparse arrays and augmentation parameters of
    every recorded shard are whole, and the resumed cache is byte-identical (the draws are
    keyed, not sequential)."""
    root, seconds, kind = reference_sparse
    kill_and_resume(tmp_path, (root, seconds), 3000, **SPARSE[kind])
    assert (tmp_path / "cache" / fmt.ARRAYS / "train" / kind / "classes").is_dir()
    assert (tmp_path / "cache" / fmt.ARRAYS / "train" / "augment").is_dir()
    assert not (tmp_path / "cache" / fmt.ARRAYS / "train" / "logits").exists()


def kill_and_resume(tmp_path: Path, reference: tuple[Path, float], trial: int, **views) -> None:
    """SIGKILL a build at seeded random moments until it finishes; check what each kill left."""
    ref_root, full_seconds = reference
    rng = np.random.default_rng(1000 + trial)
    root = tmp_path / "cache"
    args = ["cache", *harness_args(root, tmp_path, **views)]
    kills = 0
    last_records: list[dict] = []
    mtimes: dict[tuple, int] = {}
    while True:
        proc = run_cli(args, cwd=tmp_path)
        try:
            _, err = proc.communicate(timeout=rng.uniform(0.3, 1.1) * full_seconds if kills < 3 else 600)
            assert proc.returncode == 0, err
            break
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            kills += 1
        # What a killed run leaves recorded as done is whole and correct.
        last_records = assert_recorded_shards_are_whole(root, ref_root)
        mtimes = {(r["split"], r["shard"], key): shard_file(root, key, r["shard"]).stat().st_mtime_ns
                  for r in last_records for key in r["sha256"]}

    assert array_files(root) == array_files(ref_root)  # byte-identical to the uninterrupted run
    manifest = open_cache(root).manifest
    final = {(r["split"], r["shard"]): r for records in manifest["shards"].values() for r in records}
    for rec in last_records:  # finished shards were not recomputed
        kept = {k: v for k, v in rec.items() if k not in ("host", "key")}
        assert final[(rec["split"], rec["shard"])] == kept
        for key in rec["sha256"]:
            assert shard_file(root, key, rec["shard"]).stat().st_mtime_ns == \
                mtimes[(rec["split"], rec["shard"], key)]
    assert_no_stray_files(root)
    for split in ("train", "val", "test"):
        assert open_cache(root).index(split).equals(open_cache(ref_root).index(split))


@pytest.mark.slow
def test_sigint_during_caching_exits_130_and_resumes(tmp_path, reference):
    ref_root, full_seconds = reference
    root = tmp_path / "cache"
    args = ["cache", *harness_args(root, tmp_path)]
    proc = run_cli(args, cwd=tmp_path)
    deadline = time.monotonic() + 600
    while not (root / fmt.PARTS).is_dir() and time.monotonic() < deadline:  # wait for shard work
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the build finished before SIGINT arrived")
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip() and "caching" not in line]  # no bar
    assert lines == ["kdcache cache: interrupted; nothing finished was lost — re-run the same "
                     "command to resume"], err
    assert "Traceback" not in err
    assert_recorded_shards_are_whole(root, ref_root)
    proc = run_cli(args, cwd=tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert array_files(root) == array_files(ref_root)
    assert_no_stray_files(root)


def test_stale_temporaries_of_a_killed_run_are_removed(make_cache, tmp_path, builder):
    root = make_cache()
    # what SIGKILL can leave: our temp files, Zarr's partial writes, an init dir, parts/
    (root / fmt.INDEX / ".val.parquet.abc123.tmp").write_bytes(b"half")
    (root / fmt.ARRAYS / "train" / "logits" / "c" / "0" / "0" / "0.deadbeef.partial").write_bytes(b"x")
    (tmp_path / f".{root.name}.init-1234abcd" / "arrays.zarr").mkdir(parents=True)
    (root / fmt.PARTS / "train").mkdir(parents=True)
    builder(root)
    assert_no_stray_files(root)


# =========================================================================== disk errors

class FailingWrites:
    """Patch target: let ``ok`` calls through, then raise OSError(code) like a full disk."""

    def __init__(self, real, ok: int, code: int = errno.ENOSPC):
        self.real, self.ok, self.code, self.calls = real, ok, code, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.ok:
            raise OSError(self.code, os.strerror(self.code))
        return self.real(*args, **kwargs)


def one_error_line(capsys, verb: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("caching")]
    assert len(lines) == 1 and lines[0].startswith(f"kdcache {verb}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _patch_zarr_store(monkeypatch, ok: int):
    from zarr.storage import LocalStore

    async def failing_set(self, key, value, _real=LocalStore.set, _state={"n": 0}):
        _state["n"] += 1
        if _state["n"] > ok and "/c/" in key:  # chunk data, not metadata
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await _real(self, key, value)

    monkeypatch.setattr(LocalStore, "set", failing_set)


def _patch_parquet(monkeypatch, ok: int):
    """The shards' index parts (Parquet files under parts/) fail to write after ``ok``."""
    from pipeline import storage

    failing = FailingWrites(storage.write_bytes, ok, errno.EIO)
    real = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda loc, data: (
        failing(loc, data) if str(loc).endswith(".parquet") and f"/{fmt.PARTS}/" in str(loc) else real(loc, data)))


def _workers(scheduler: str) -> int:
    return 2 if scheduler == "local" else 1


@pytest.fixture(scope="module")
def uninterrupted_small(tmp_path_factory, builder):
    """``get(scheduler)``: the small cache built without faults on that scheduler, once per
    module (both patches of a scheduler compare against it). Read-only."""
    built: dict[str, Path] = {}

    def get(scheduler: str) -> Path:
        if scheduler not in built:
            work = tmp_path_factory.mktemp(f"uninterrupted_{scheduler}")
            builder(work / "cache", work, scheduler=scheduler, workers=_workers(scheduler))
            built[scheduler] = work / "cache"
        return built[scheduler]

    return get


@pytest.mark.parametrize("scheduler", ["synchronous", "local"])
@pytest.mark.parametrize("patch, message", [
    (_patch_zarr_store, "No space left on device"),
    (_patch_parquet, "Input/output error"),
])
def test_failing_writes_leave_the_cache_resumable(tmp_path, capsys, monkeypatch, scheduler, patch,
                                                   message, uninterrupted_small):
    root = tmp_path / "cache"
    args = ["cache", *cache_args(root, tmp_path, scheduler=scheduler, workers=_workers(scheduler))]
    with monkeypatch.context() as m:
        patch(m, ok=8 if patch is _patch_zarr_store else 2)
        assert main(args) == 2
    line = one_error_line(capsys, "cache")
    assert message in line and "re-run the same command to resume" in line
    assert fmt.read_manifest(root)["status"] == "building"  # kept, not rolled back
    with pytest.raises(KdError, match="incomplete"):
        open_cache(root)

    assert main(args) == 0  # the disk is fine again: resume finishes the job
    assert array_files(root) == array_files(uninterrupted_small(scheduler))
    assert_no_stray_files(root)


def test_unwritable_cache_location_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a directory")
    root = tmp_path / "afile" / "cache"
    assert main(["cache", *cache_args(root, tmp_path)]) == 2
    line = one_error_line(capsys, "cache")
    assert "cannot create cache" in line and "choose a writable cache=PATH" in line
    assert (tmp_path / "afile").read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_one_line(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert main(["cache", *cache_args(parent / "cache", tmp_path)]) == 2
        assert "Permission denied" in one_error_line(capsys, "cache")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


# =========================================================================== corruption

def _flip_byte(root: Path) -> tuple[Path, str]:
    path = shard_file(root, "train/features/embed", 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    return root / fmt.ARRAYS / "train" / "features" / "embed", "train/features/embed cannot be read"


def _delete_shard(root: Path) -> tuple[Path, str]:
    path = shard_file(root, "train/logits", 2)
    path.unlink()  # Zarr alone would read the missing shard back as zeros
    return root / fmt.ARRAYS / "train" / "logits", r"train/logits has 3 of its 4 shard files"


def _truncate_index(root: Path) -> tuple[Path, str]:
    path = fmt.index_path(root, "train")
    path.write_bytes(path.read_bytes()[:-100])
    return path, r"train.parquet does not match its checksum"


def _edit_manifest(root: Path) -> tuple[Path, str]:
    path = root / fmt.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["temperature"] = 1.0  # plausible, and wrong
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return path, r"manifest.json was modified after kdcache wrote it"


def _edit_array_metadata(root: Path) -> tuple[Path, str]:
    path = root / fmt.ARRAYS / "train" / "logits" / "zarr.json"
    meta = json.loads(path.read_text())
    meta["shape"][0] -= 1
    path.write_text(json.dumps(meta))
    return path.parent, r"train/logits has 239 rows of float16, the manifest says 240"


@pytest.mark.parametrize("damage", [_flip_byte, _delete_shard, _truncate_index, _edit_manifest,
                                    _edit_array_metadata])
def test_damage_is_detected_and_named_never_used(make_cache, capsys, damage):
    root = make_cache()
    path, pattern = damage(root)
    # a student reading the cache refuses it, naming the damaged file
    assert main(["student", f"cache={root}", "model=logreg_soft", "C=1"]) == 2
    line = one_error_line(capsys, "student")
    assert __import__("re").search(pattern, line), line
    assert str(path) in line
    assert not results_dir(root).exists()
    # and verify says FAIL (or refuses to open it at all)
    code = main(["verify", f"cache={root}", "rows=8"])
    out = capsys.readouterr()
    assert code in (1, 2) and ("verdict: FAIL" in out.out or "error:" in out.err)
    if damage in REPAIRABLE:  # a failed checksum: a failed check, and the way out named
        assert code == 1 and f"kdcache cache cache={root} repair=true" in line + out.out
        assert main(["cache", f"cache={root}", "repair=true"]) == 0
        capsys.readouterr()
        assert main(["verify", f"cache={root}", "rows=8"]) == 0, capsys.readouterr().out


REPAIRABLE = (_flip_byte, _delete_shard, _truncate_index)


# =========================================================================== students

def _student_args(root: Path, tmp: Path, **overrides) -> list[str]:
    from pipeline.students import student_params

    model = overrides.get("model", "mlp")
    slow = {k: v for k, v in {"epochs": 400, "batch_size": 16}.items() if k in student_params(model)}
    values = {"cache": root, "runs_dir": tmp / "runs", "model": "mlp", **slow}
    values.update(overrides)
    return [f"{k}={v}" for k, v in values.items()]


def _finished_runs(runs: Path) -> list[Path]:
    return [p for p in runs.rglob("*") if p.is_dir() and (p / "metrics.json").is_file()]


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(STUDENT_KILL_TRIALS))
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_student_run_leaves_no_row(make_cache, tmp_path, trial, sig):
    root = make_cache()
    rng = np.random.default_rng(trial)
    proc = run_cli(["student", *_student_args(root, tmp_path)], cwd=tmp_path)
    time.sleep(rng.uniform(1.0, 6.0))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in ((-signal.SIGKILL,) if sig == signal.SIGKILL else (130,)), err
    assert read_results(results_dir(root)).num_rows == 0
    runs = tmp_path / "runs"
    visible = [p for p in runs.rglob("*") if p.is_dir() and not p.name.startswith(".")] if runs.exists() else []
    assert all(p.name == root.name for p in visible)  # only the per-cache folder, no run without metrics
    # the next run is unaffected
    assert main(["student", *_student_args(root, tmp_path, epochs=2)]) == 0
    assert read_results(results_dir(root)).num_rows == 1
    assert len(_finished_runs(runs)) == 1


@pytest.mark.slow
def test_four_concurrent_students_all_land_their_rows(make_cache, tmp_path):
    root = make_cache()
    models = [("logreg", {"C": 1}), ("linear_svc", {"C": 1}), ("mlp", {"epochs": 3}),
              ("mlp", {"epochs": 3, "loss": "ce"})]
    procs = [run_cli(["student", *_student_args(root, tmp_path, model=m, **kw)], cwd=tmp_path)
             for m, kw in models]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    table = read_results(results_dir(root))
    assert table.num_rows == 4
    assert len(set(table.column("run_id").to_pylist())) == 4
    assert sorted(table.column("model").to_pylist()) == sorted(m for m, _ in models)
    assert len(_finished_runs(tmp_path / "runs")) == 4


@pytest.mark.slow
def test_second_build_is_refused_and_a_killed_builders_lock_is_recovered(tmp_path):
    root = tmp_path / "cache"
    # far more rows than can finish while the second process starts and is refused
    args = ["cache", *cache_args(root, tmp_path, dataset="synthetic:100000:3x16x16:4",
                                 teacher="resnet_small", shard_size=1024, chunk_size=256)]
    first = run_cli(args, cwd=tmp_path)
    deadline = time.monotonic() + 600
    while not (root / fmt.PARTS).is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = run_cli(args, cwd=tmp_path)
    _, err = second.communicate(timeout=600)
    assert first.poll() is None, "the first build finished too early for this test"
    assert second.returncode == 2, err
    assert f"is being built by pid {first.pid}" in err and "Traceback" not in err
    assert err.strip().endswith("wait for it to finish (a second build would race it)"), err

    first.send_signal(signal.SIGKILL)  # the holder dies without releasing anything
    first.communicate()
    assert (tmp_path / ".cache.lock").is_file()
    from pipeline.cache.lock import CacheLock

    with CacheLock(root):  # the kernel released the dead holder's flock: not a stale lock
        pass
