"""Caches on object storage, against a real S3-compatible server on the loopback (moto's,
started by the ``s3_server`` fixture) and fsspec's in-memory filesystem.

What a user relies on: a cache built on S3 holds exactly the bytes a local build holds; a build
killed mid-way resumes byte-identically; a second concurrent builder is refused (a lease made
of conditional writes, not a flock); students, ``info``, ``verify`` and ``report`` read it and
write their results rows there; damage to one object is detected; and bad locations get one
line, exit 2, and leave nothing behind — no local folder named after a URL.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cache_args, declared, run_cli
from pipeline import storage
from pipeline.cache import format as fmt
from pipeline.cache import open_cache
from pipeline.cache.lock import CacheLease
from pipeline.errors import KdError
from pipeline.results import read_results, results_dir
from test_faults import HARNESS_DATASET, KDCACHE, array_files


def objects(loc) -> dict[str, bytes]:
    """Every object under ``loc`` with its bytes, by key relative to it."""
    loc = storage.location(loc)
    return {name: (loc / name).read_bytes() for name in sorted(storage.files(loc))}


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def same_cache(remote, local: Path) -> None:
    """Byte for byte the same arrays and index; the same manifest but for build times."""
    got, want = objects(remote), local_files(local)
    assert sorted(got) == sorted(want)
    for name in want:
        if name not in (fmt.MANIFEST, fmt.CONFIG):
            assert got[name] == want[name], name
    # bytes: config.json and the manifest hold the cache's own location, longer as a URL
    # dataset: its config records the working directory's data_root
    volatile = ("created", "completed", "last_run", "checksum", "teacher", "shards", "bytes", "dataset")
    a, b = json.loads(got[fmt.MANIFEST]), json.loads(want[fmt.MANIFEST])
    assert a["dataset"]["fingerprint"] == b["dataset"]["fingerprint"]
    assert {k: v for k, v in a.items() if k not in volatile} == {k: v for k, v in b.items() if k not in volatile}
    def records(manifest):
        return {split: [{k: v for k, v in r.items() if k != "seconds"} for r in shards]
                for split, shards in manifest["shards"].items()}
    assert records(a) == records(b)


def test_a_cache_on_s3_holds_the_bytes_of_a_local_build(s3, tmp_path, capsys):
    local = tmp_path / "local"
    run_cli(capsys, "cache", *cache_args(local, tmp_path))
    summary = run_cli(capsys, "cache", *cache_args(f"{s3}/caches/small", tmp_path))
    assert summary["cache"] == f"{s3}/caches/small" and summary["status"] == "complete"
    same_cache(f"{s3}/caches/small", local)
    assert not any(p.name.startswith("s3") for p in tmp_path.rglob("*")), "a local folder named after the URL"
    # a second run finds it complete and recomputes nothing
    again = run_cli(capsys, "cache", *cache_args(f"{s3}/caches/small", tmp_path))
    assert again["computed_rows"] == 0
    # the lease is gone after the build
    assert storage.files(storage.location(f"{s3}/caches/.small.lease")) == {}


def test_a_memory_url_and_a_file_url_work_like_paths(tmp_path, capsys):
    local = tmp_path / "local"
    run_cli(capsys, "cache", *cache_args(local, tmp_path))
    run_cli(capsys, "cache", *cache_args("memory://kdcache-test/small", tmp_path))
    same_cache("memory://kdcache-test/small", local)
    cache = open_cache("memory://kdcache-test/small")
    assert np.array_equal(cache.raw_logits("train"), open_cache(local).raw_logits("train"))
    summary = run_cli(capsys, "info", f"cache=file://{local}")
    assert summary["cache"] == str(local)
    storage.remove_tree(storage.location("memory://kdcache-test"))


# =========================================================================== stage two on S3

def test_students_info_verify_and_report_read_and_write_on_s3(s3, tmp_path, capsys):
    url = f"{s3}/caches/small"
    run_cli(capsys, "cache", *cache_args(url, tmp_path))
    info = run_cli(capsys, "info", f"cache={url}")
    assert info["status"] == "complete" and info["rows"] == {"train": 240, "val": 30, "test": 30}

    for model in ("logreg", "mlp"):
        row = run_cli(capsys, "student", f"cache={url}", f"model={model}", f"runs_dir={tmp_path / 'runs'}",
                      *declared(model, epochs=2))
        assert row["results"].startswith(f"{url}.results/") and row["cache"] == url
    table = read_results(results_dir(url))
    assert sorted(table.column("model").to_pylist()) == ["logreg", "mlp"]
    assert sorted(storage.files(storage.location(f"{url}.results"))) == sorted(
        f"{r}.parquet" for r in table.column("run_id").to_pylist())  # one object per run

    report = run_cli(capsys, "report", f"cache={url}")
    assert report["report"] == f"{url}.results/report/leaderboard.md"
    assert (storage.location(report["report"])).read_text().startswith("#")
    assert len(report["plots"]) >= 2 and all((storage.location(p)).read_bytes()[:4] == b"\x89PNG"
                                            for p in report["plots"])

    verdict = run_cli(capsys, "verify", f"cache={url}", "rows=8")
    assert verdict["ok"] is True
    logreg = next(r for r in table.to_pylist() if r["model"] == "logreg")
    exported = run_cli(capsys, "export", f"run={logreg['run_dir']}", "format=skops")
    assert exported["check"]["test_accuracy"] == logreg["test_accuracy"]  # checked on the S3 cache's test split

    # one flipped byte in one shard object is detected, by verify and by a student
    undamaged = objects(url)
    shard = storage.location(url) / fmt.ARRAYS / "train" / "features" / "embed" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    storage.write_bytes(shard, bytes(data))
    from stages.cli import main

    capsys.readouterr()
    assert main(["verify", f"cache={url}", "rows=8"]) == 1
    assert re.search(r"shard checksums +FAILED: train/features/embed shard 1", capsys.readouterr().out)
    assert main(["student", f"cache={url}", "model=logreg_soft", f"runs_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train/features/embed" in err and "damaged" in err, err
    assert f"kdcache cache cache={url} repair=true" in err
    assert len(read_results(results_dir(url))) == 2  # the refused run added no row
    # and the repair that both name recomputes the shard: every object as it was
    repaired = run_cli(capsys, "cache", f"cache={url}", "repair=true")
    assert repaired["repaired"] == ["train shard 1"]
    assert objects(url) == undamaged


# =========================================================================== kills and a second builder

@pytest.fixture(scope="module")
def reference(harness_reference) -> tuple[Path, float]:
    """The kill harness's uninterrupted local build (tests/test_faults.py; one per session)."""
    return harness_reference


def recorded_are_whole(url: str, reference: Path) -> int:
    """Every shard a killed build recorded as done holds exactly the reference's values."""
    import zarr

    from test_faults import stored

    if not (storage.location(url) / fmt.MANIFEST).is_file():
        return 0  # killed before the cache was created
    group = zarr.open_group(storage.zarr_store(storage.location(url) / fmt.ARRAYS, read_only=True), mode="r")
    parts = storage.location(url) / fmt.PARTS
    names = [n for n in storage.files(parts) if n.endswith(".json")]
    for name in names:
        record = json.loads((parts / name).read_text())
        for key in record["sha256"]:
            got = np.asarray(group[key][record["start"]:record["stop"]])
            assert np.array_equal(got, stored(reference, key, record["start"], record["stop"])), (key, name)
    return len(names)


def records_landed(url: str) -> int:
    parts = storage.location(url) / fmt.PARTS
    return sum(1 for n in storage.files(parts) if n.endswith(".json"))


@pytest.mark.slow
def test_sigkill_mid_build_on_s3_then_resume_is_byte_identical(s3, tmp_path, reference):
    """SIGKILL while shards land on S3 (after a seeded random number of them), once in make
    test and twice in make soak (a resumed builder killed in turn), then let it finish: the
    recorded shards were whole at every kill and the result is the local build's bytes. The
    resumed run takes over the dead builder's lease at once (same host)."""
    from test_faults import SOAK, harness_args, run_cli as spawn

    ref_root, _ = reference
    url = f"{s3}/harness"
    args = ["cache", *harness_args(url, tmp_path)]
    rng = np.random.default_rng(13)
    for kill in range(2 if SOAK else 1):  # each kill is a subprocess build: tens of seconds
        proc = spawn(args, cwd=tmp_path)
        target = records_landed(url) + int(rng.integers(2, 12))  # of 38 shards
        deadline = time.monotonic() + 600
        while proc.poll() is None and records_landed(url) < target and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the build finished before kill {kill}: {proc.communicate()[1]}"
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert recorded_are_whole(url, ref_root) >= target
        assert (storage.location(url) / fmt.MANIFEST).is_file()
    proc = spawn(args, cwd=tmp_path)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    same_cache(url, ref_root)
    assert storage.files(storage.location(f"{s3}/.harness.lease")) == {}


@pytest.mark.slow
def test_a_second_builder_on_s3_is_refused_and_a_killed_holder_is_taken_over(s3, tmp_path):
    from test_faults import run_cli as spawn

    url = f"{s3}/big"
    args = ["cache", *cache_args(url, tmp_path, dataset="synthetic:100000:3x16x16:4",
                                 teacher="resnet_small", shard_size=1024, chunk_size=256)]
    first = spawn(args, cwd=tmp_path)
    lease = storage.location(f"{s3}/.big.lease")
    deadline = time.monotonic() + 600
    while not storage.files(lease) and time.monotonic() < deadline:
        time.sleep(0.1)
    second = spawn(args, cwd=tmp_path)
    _, err = second.communicate(timeout=600)
    assert first.poll() is None, "the first build finished too early for this test"
    assert second.returncode == 2, err
    assert f"is being built by pid {first.pid}" in err and "Traceback" not in err and err.count("\n") == 1
    first.send_signal(signal.SIGKILL)  # it dies holding the lease: nothing releases it
    first.communicate()
    assert list(storage.files(lease)) == ["00000001.json"]
    with CacheLease(storage.location(url)) as taken:  # a dead process on this host: taken over
        assert taken.epoch == 2
    assert storage.files(lease) == {}


# =========================================================================== the lease itself

def _foreign_lease(lease_dir, epoch: int, expires_in: float) -> None:
    body = {"pid": 1, "host": "another-host", "renewed": time.time(), "expires": time.time() + expires_in}
    storage.write_text(lease_dir / f"{epoch:08d}.json", json.dumps(body))


def test_a_live_lease_of_another_host_refuses_and_an_expired_one_is_taken_over(s3):
    root = storage.location(f"{s3}/c")
    lease = CacheLease(root, ttl=30)
    _foreign_lease(lease.dir, 1, expires_in=30)
    with pytest.raises(KdError, match=r"is being built by pid 1 on another-host \(its lease expires in \d+s"):
        CacheLease(root).__enter__()
    _foreign_lease(lease.dir, 1, expires_in=-1)  # its holder stopped renewing it
    with CacheLease(root, ttl=30) as taken:
        assert taken.epoch == 2
    assert storage.files(lease.dir) == {}


def test_of_builders_racing_for_a_lease_exactly_one_wins(s3):
    root = storage.location(f"{s3}/race")
    _foreign_lease(CacheLease(root).dir, 1, expires_in=-1)
    results, start = [], threading.Barrier(4)

    def contend():
        lease = CacheLease(root, ttl=30)
        start.wait()
        try:
            lease.__enter__()
            results.append(lease)
        except KdError as exc:
            results.append(exc)

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, CacheLease)]
    assert len(winners) == 1 and winners[0].epoch == 2
    assert all("is being built by" in str(r) for r in results if isinstance(r, KdError))
    winners[0].__exit__(None, None, None)


def test_a_holder_renews_its_lease_and_notices_when_it_is_taken(s3):
    root = storage.location(f"{s3}/renew")
    with CacheLease(root, ttl=0.8) as lease:
        first = json.loads(lease._path(1).read_bytes())["expires"]
        time.sleep(0.5)
        assert json.loads(lease._path(1).read_bytes())["expires"] > first  # renewed
        lease.check()
        _foreign_lease(lease.dir, 2, expires_in=30)  # taken over while this one stalled
        time.sleep(0.5)
        with pytest.raises(KdError, match="lost the build lease"):
            lease.check()
    # the loser deletes nothing: the taker's lease stands (it removes older epochs on release)
    assert sorted(storage.files(lease.dir)) == ["00000001.json", "00000002.json"]


def test_cache_root_on_object_storage_names_the_default_cache(tmp_path, capsys):
    args = [a for a in cache_args(tmp_path / "unused", tmp_path) if not a.startswith(("cache=", "cache_root="))]
    summary = run_cli(capsys, "cache", *args, "cache_root=memory://kdcache-root/caches/")
    assert summary["cache"] == "memory://kdcache-root/caches/synthetic-300-1x8x8-3-cnn_small-random0"
    info = run_cli(capsys, "info", f"cache={summary['cache']}")
    assert info["status"] == "complete"
    assert not (tmp_path / "memory:").exists()
    storage.remove_tree(storage.location("memory://kdcache-root"))


def test_a_stalled_holder_whose_epoch_number_was_reused_knows_it_lost(s3):
    """Epoch numbers come back after a release: X holds 1 and stalls; another builder takes
    over, finishes and releases; a third takes epoch 1 again. X goes by its token, not the
    number: it has lost, and it deletes nothing of the new holder's."""
    root = storage.location(f"{s3}/aba")
    stalled = CacheLease(root, ttl=300)
    stalled.__enter__()
    storage.remove_file(stalled._path(1))  # taken over and released by others meanwhile
    with CacheLease(root, ttl=300) as third:
        assert third.epoch == 1
        with pytest.raises(KdError, match="lost the build lease"):
            stalled.check()
        stalled.__exit__(None, None, None)
        assert json.loads(third._path(1).read_bytes())["token"] == third.token  # untouched
        third.check()


def test_a_prefix_of_other_files_is_refused_not_cleared(s3, tmp_path, capsys):
    """Only kdcache's own leftovers (a creation killed before its manifest) are cleared; a
    prefix holding someone's config.json and arrays.zarr is refused and kept."""
    from stages.cli import main

    other = storage.location(f"{s3}/theirs")
    storage.write_text(other / "config.json", '{"kind": "TheirConfig"}')
    storage.write_bytes(other / "arrays.zarr" / "zarr.json", b"{}")
    assert main(["cache", *cache_args(str(other), tmp_path)]) == 2
    assert "exists and is not a kdcache cache" in capsys.readouterr().err
    assert sorted(storage.files(other)) == ["arrays.zarr/zarr.json", "config.json"]


@pytest.mark.parametrize("text, expected", [
    ("data/caches/digits:v2", "data/caches/digits:v2"),  # a local name with a colon stays one
    ("runs:2024-06-01", "runs:2024-06-01"),
    ("file:///tmp/x", "/tmp/x"), ("file://localhost/tmp/x", "/tmp/x"),
])
def test_local_paths_and_file_urls(text, expected):
    assert storage.location(text) == Path(expected)


@pytest.mark.parametrize("text, message", [
    ("s3:/bucket/x", "is not a URL"), ("memory://", "names no place"), ("s3://", "names no place"),
    ("s3://bucket", "is a whole bucket"), ("foo://x/y", "unknown storage protocol"),
])
def test_malformed_locations_are_refused_before_anything_is_made(text, message, tmp_path):
    with pytest.raises(KdError, match=message):
        storage.location(text)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_dask_cluster_builds_a_cache_on_s3(s3, dask_cluster, tmp_path, capsys):
    """`dask scheduler` + two `dask worker` processes, started with the AWS environment a user
    gives them (conftest.py dask_cluster), write the shards to S3 themselves: the bytes of an
    in-process local build."""
    local = tmp_path / "local"
    run_cli(capsys, "cache", *cache_args(local, tmp_path, threads=1))
    url = f"{s3}/on-cluster"
    run_cli(capsys, "cache", *cache_args(url, tmp_path, threads=1, scheduler=dask_cluster.address))
    same_cache(url, local)
