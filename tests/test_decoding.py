"""Parallel decoding of imagefolder datasets (``decoders=N``, pipeline/decoding.py): the same
bytes in the same order as one thread, the same one-line error for a damaged file, no change
to any fingerprint or cache key, and threads in place of processes inside a daemonic process."""

from __future__ import annotations

import multiprocessing
import os
import re
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from conftest import FailOnCall, build
from pipeline import decoding
from pipeline.cache import format as fmt
from pipeline.cache import shard
from pipeline.config import DataConfig
from pipeline.data import open_dataset
from pipeline.errors import KdError
from pipeline.settings import resolve

SIZE = 12  # pixels per side after resizing


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Photo-like pixels (smooth shapes, texture and noise), so JPEG does real work."""
    yy, xx = np.mgrid[0:height, 0:width]
    wave = np.sin(xx / rng.uniform(2, 6) + yy / rng.uniform(3, 9))
    base = rng.uniform(0, 255, 3) * (0.5 + 0.5 * wave)[..., None]
    return np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def write_photos(root: Path, per_split=(("train", 7), ("val", 2), ("test", 3))) -> Path:
    """``root/{train,val,test}/{cat,dog}/``: JPEGs and PNGs of several sizes, some grey."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_split:
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                image = Image.fromarray(photo(rng, 20 + 3 * i, 30 - 2 * i))
                if i % 3 == 2:
                    image.convert("L").save(root / split / cls / f"{i}.png")
                else:
                    image.save(root / split / cls / f"{i}.jpg", quality=85)
    return root


def reference(paths: list[Path], size: int) -> np.ndarray:
    """The single-threaded read as it was before decoders existed, verbatim."""
    from PIL import Image

    out = np.empty((len(paths), 3, size, size), np.float32)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            out[i] = np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0
    return out


def folder(root: Path, decoders: int) -> DataConfig:
    return DataConfig(dataset=f"imagefolder:{root}:{SIZE}", decoders=decoders)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("decoding") / "photos")


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("decoders", [1, 2, 0])  # 0 = auto
def test_every_number_of_decoders_reads_the_same_bytes(photos, decoders):
    dataset = open_dataset(folder(photos, decoders))
    for name, split in dataset.splits.items():
        files = dataset.pools[split.pool].paths
        raw = dataset.raw(name, 0, len(split))
        assert raw.flags.c_contiguous
        assert same_bytes(raw, reference([files[p] for p in split.positions], SIZE))


@pytest.mark.parametrize("shared_bytes", [decoding.SHARED_BYTES, 1])  # 1: one image per task
def test_rows_keep_their_order_through_the_pool(photos, monkeypatch, shared_bytes):
    """More tasks than shared memory blocks, a short last task, rows in any order."""
    monkeypatch.setattr(decoding, "SHARED_BYTES", shared_bytes)
    one, two = open_dataset(folder(photos, 1)), open_dataset(folder(photos, 2))
    rows = np.array([5, 0, 13, 13, 2, 9, 1, 11, 3])  # shuffled, with a repeat
    assert same_bytes(two.inputs_at("train", rows), one.inputs_at("train", rows))
    pool = two.pools["train"]
    positions = two.splits["train"].positions[rows]
    assert same_bytes(pool.read(positions), reference([pool.paths[p] for p in positions], SIZE))


def test_decoders_change_no_fingerprint(photos):
    one, two = open_dataset(folder(photos, 1)), open_dataset(folder(photos, 2))
    assert one.fingerprint == two.fingerprint
    assert one.preprocessing == two.preprocessing


def shared_blocks() -> set[str]:
    """The shared memory blocks of this machine that Python's SharedMemory names."""
    return {name for name in os.listdir("/dev/shm") if name.startswith("psm_")}


def test_a_damaged_file_is_one_line_naming_the_first_one(tmp_path):
    root = write_photos(tmp_path / "photos")
    (root / "train" / "cat" / "3.jpg").write_bytes(b"not a jpeg")  # the first, in row order
    (root / "train" / "dog" / "1.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(KdError) as caught:
        open_dataset(folder(root, 2))
    assert str(caught.value) == (f"{root}/train/cat/3.jpg is not a readable image "
                                 "(UnidentifiedImageError); remove it or replace it with a valid "
                                 "image file")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    workers = decoding.pool(2)
    assert len(workers.free) == len(workers.blocks)  # the failed read gave its blocks back


def test_shared_memory_is_reused_then_freed(photos):
    """Reads reuse the pool's shared memory blocks; shutdown unlinks them."""
    dataset = open_dataset(folder(photos, 2))
    workers = decoding.pool(2)
    names = {block.name for block in workers.blocks}
    assert names and names <= shared_blocks()
    dataset.raw("train", 0, len(dataset.splits["train"]))
    assert {block.name for block in workers.blocks} == names
    decoding.shutdown()
    assert not names & shared_blocks()
    assert decoding.pool(2) is not workers


def test_a_damaged_file_through_the_cli_is_one_line(tmp_path, capsys):
    from stages.cli import main

    root = write_photos(tmp_path / "photos")
    (root / "test" / "dog" / "0.jpg").write_bytes(b"not a jpeg")
    capsys.readouterr()
    code = main(["cache", f"dataset=imagefolder:{root}:{SIZE}", "decoders=2", "teacher=mlp",
                 "teacher_ckpt=random", f"cache={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert re.fullmatch(rf"kdcache cache: error: {re.escape(str(root))}/test/dog/0.jpg is not a "
                        r"readable image \(UnidentifiedImageError\); .*\n", err)


def image_cache(photos: Path, decoders: int) -> dict:
    """Overrides of conftest's tiny build: the photos, 8-row shards, ``decoders``."""
    return {"dataset": f"imagefolder:{photos}:{SIZE}", "decoders": decoders, "shard_size": 8,
            "chunk_size": 8, "infer_batch_size": 4}


def tree(root: Path) -> dict[str, bytes]:
    """Every file of a cache's arrays and index, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for sub in (fmt.ARRAYS, fmt.INDEX)
            for p in sorted((root / sub).rglob("*")) if p.is_file()}


def test_a_decoders_1_cache_is_resumed_and_skipped_with_decoders_2(tmp_path, photos, monkeypatch):
    """Interrupted with one decoder, finished with two (through the pool), then skipped: one
    key throughout, the same bytes as a build with two decoders from the start, and a
    manifest that does not record decoders (whoever reopens the data picks its own)."""
    real = shard.compute_shard
    monkeypatch.setattr(shard, "compute_shard", FailOnCall(real, fail_on=2))
    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(resumed, tmp_path, **image_cache(photos, 1))
    key = fmt.read_manifest(resumed)["key"]

    monkeypatch.setattr(shard, "compute_shard", real)
    used = []
    monkeypatch.setattr(decoding, "decode", lambda paths, size, n, real=decoding.decode:
                        used.append(n) or real(paths, size, n))
    summary = build(resumed, tmp_path, **image_cache(photos, 2))
    assert not summary["skipped"] and 0 < summary["computed_rows"] < 24 and set(used) == {2}
    assert build(resumed, tmp_path, **image_cache(photos, 2))["skipped"]

    fresh = tmp_path / "fresh"
    build(fresh, tmp_path, **image_cache(photos, 2))
    a, b = fmt.read_manifest(resumed), fmt.read_manifest(fresh)
    assert a["key"] == b["key"] == key and a["dataset"] == b["dataset"]
    assert "decoders" not in a["dataset"]["config"]
    assert tree(resumed) == tree(fresh)


def _read_in_a_daemon(root: str, results) -> None:
    dataset = open_dataset(folder(Path(root), 2))
    results.put((dataset.raw("test", 0, len(dataset.splits["test"])),
                 isinstance(decoding.pool(2).executor, ThreadPoolExecutor)))


def test_a_daemonic_process_decodes_on_threads(photos):
    """A daemonic process (a dask worker's) may not have children: its pool is of threads."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_read_in_a_daemon, args=(str(photos), results), daemon=True)
    child.start()
    raw, threads = results.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0 and threads
    assert same_bytes(raw, open_dataset(folder(photos, 1)).raw("test", 0, len(raw)))


def test_the_pool_is_made_once_and_its_workers_start_light(photos):
    """Reused across reads; workers made by the forkserver (never forked from this process,
    which may hold CUDA), with no torch imported."""
    workers = decoding.pool(2)
    open_dataset(folder(photos, 2))
    assert decoding.pool(2) is workers
    executor = workers.executor
    assert executor.submit(os.getppid).result() != os.getpid()
    assert not executor.submit(eval, "'torch' in __import__('sys').modules").result()


def test_a_broken_pool_is_replaced(photos):
    files = sorted(str(p) for p in photos.rglob("*.jpg"))[:4]
    with pytest.raises(BrokenProcessPool):
        decoding.pool(2).executor.submit(os._exit, 1).result()  # a worker dies (as when OOM-killed)
    with pytest.raises(BrokenProcessPool) as caught:
        decoding.decode(files, SIZE, 2)
    assert "decoders=1" in "".join(caught.value.__notes__)
    assert decoding.decode(files, SIZE, 2).tobytes() == decoding.decode(files, SIZE, 1).tobytes()


def test_auto_decoders():
    from pipeline import runtime

    with mock.patch.object(runtime, "cores", return_value=16), \
            mock.patch("torch.cuda.is_available", return_value=True):
        assert decoding.auto_decoders("auto") == decoding.auto_decoders("cuda:0") == 15
        assert decoding.auto_decoders("cpu") == 1
    with mock.patch("torch.cuda.is_available", return_value=False):
        assert decoding.auto_decoders("auto") == 1
    assert resolve(DataConfig, ["decoders=3"]).decoders == 3
