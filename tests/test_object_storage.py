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
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cache_args, run_cli
from pipeline import storage
from pipeline.cache import format as fmt
from pipeline.cache import open_cache
from pipeline.cache.lock import CacheLease
from pipeline.errors import KdError
from pipeline.results import read_results, results_dir
from test_faults import HARNESS_DATASET, KDCACHE, array_files, uninterrupted


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
    volatile = ("created", "completed", "last_run", "checksum", "teacher", "shards", "bytes")
    a, b = json.loads(got[fmt.MANIFEST]), json.loads(want[fmt.MANIFEST])
    assert {k: v for k, v in a.items() if k not in volatile} == {k: v for k, v in b.items() if k not in volatile}
    assert [[{k: v for k, v in r.items() if k != "seconds"} for r in s] for s in a["shards"].values()] == \
        [[{k: v for k, v in r.items() if k != "seconds"} for r in s] for s in b["shards"].values()]


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
