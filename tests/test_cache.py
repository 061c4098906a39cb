"""The teacher cache: what the writer stores equals the teacher's outputs, row by row and id by
id; the reader softens, streams and joins correctly; builds resume, refuse and detect damage."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SMALL_CLASSES, SMALL_DATASET, SMALL_SHAPE, FailOnCall
from pipeline.cache import format as fmt
from pipeline.cache import execute, open_cache, plan, shard
from pipeline.cache.lock import CacheLock
from pipeline.lookahead import ordered
from pipeline.config import DataConfig
from pipeline.data import SPLITS, open_dataset
from pipeline.errors import KdError
from pipeline.teachers import Tapped, TeacherSpec, build_teacher, default_layers


def direct_outputs(dataset_spec: str, arch: str, shape, classes: int, seed: int = 0, ckpt: str = "random"):
    """The teacher run by hand over every split: {split: (logits, {layer: features})}."""
    dataset = open_dataset(DataConfig(dataset=dataset_spec, seed=seed))
    model = build_teacher(TeacherSpec(arch, tuple(shape), classes, ckpt, seed))
    tapped = Tapped(model, default_layers(model), True, arch)
    out = {}
    with torch.inference_mode():
        for split in SPLITS:
            x = torch.from_numpy(dataset.inputs(split, 0, len(dataset.splits[split])))
            logits, feats = tapped(x)
            out[split] = (logits.numpy(), {k: v.numpy() for k, v in feats.items()})
    return dataset, out


@pytest.fixture(scope="module")
def expected():
    return direct_outputs(SMALL_DATASET, "cnn_small", SMALL_SHAPE, SMALL_CLASSES)


def tree_bytes(root: Path, *subdirs: str) -> dict[str, bytes]:
    """Every file under the given subdirectories of a cache, by relative path."""
    out = {}
    for sub in subdirs:
        for p in sorted((root / sub).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def done_shards(root: Path) -> set[tuple[str, int]]:
    return {(p.parent.name, int(p.stem)) for p in (root / fmt.PARTS).glob("*/*.json")}


# --------------------------------------------------------------------------- contents

def test_float32_cache_equals_forward_pass(small_cache, expected):
    dataset, out = expected
    cache = open_cache(small_cache)
    assert cache.layers == ["embed"]
    for split in SPLITS:
        logits, feats = out[split]
        assert cache.num_rows(split) == len(dataset.splits[split])
        np.testing.assert_allclose(cache.raw_logits(split), logits, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(cache.features(split, "embed"), feats["embed"], rtol=1e-6, atol=1e-7)
        assert cache.raw_logits(split).dtype == np.float32


def test_float16_cache_equals_forward_pass(small_cache_f16, expected):
    _, out = expected
    cache = open_cache(small_cache_f16)
    assert cache.manifest["dtype"] == "float16"
    for split in SPLITS:
        logits, feats = out[split]
        np.testing.assert_allclose(cache.raw_logits(split), logits, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(cache.features(split, "embed"), feats["embed"], rtol=1e-3, atol=1e-4)


def test_float16_is_the_float32_values_rounded(small_cache, small_cache_f16):
    c32, c16 = open_cache(small_cache), open_cache(small_cache_f16)
    for split in SPLITS:
        np.testing.assert_array_equal(c16.raw_logits(split),
                                      c32.raw_logits(split).astype(np.float16).astype(np.float32))
    assert c16.manifest["bytes"] < c32.manifest["bytes"]


def test_index_matches_dataset(small_cache, expected):
    dataset, out = expected
    cache = open_cache(small_cache)
    for split in SPLITS:
        table = cache.index(split)
        assert tuple(table.column_names) == fmt.INDEX_COLUMNS
        s = dataset.splits[split]
        np.testing.assert_array_equal(table.column("sample_id").to_numpy(), s.sample_ids)
        np.testing.assert_array_equal(cache.sample_ids(split), s.sample_ids)
        np.testing.assert_array_equal(table.column("row").to_numpy(), np.arange(len(s)))
        np.testing.assert_array_equal(table.column("label").to_numpy(), s.labels)
        np.testing.assert_array_equal(cache.labels(split), s.labels)
        np.testing.assert_array_equal(table.column("shard").to_numpy(), np.arange(len(s)) // 64)
        logits = out[split][0]
        pred = table.column("teacher_pred").to_numpy()
        np.testing.assert_array_equal(pred, logits.argmax(1))
        np.testing.assert_array_equal(table.column("correct").to_numpy(), pred == s.labels)
        probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
        np.testing.assert_allclose(table.column("teacher_prob").to_numpy(), probs.max(1), rtol=1e-5)
        assert cache.teacher_accuracy(split) == pytest.approx((pred == s.labels).mean(), abs=1e-6)


def test_manifest_describes_the_build(small_cache, expected):
    dataset, _ = expected
    cache = open_cache(small_cache)
    m = cache.manifest
    assert m["status"] == "complete" and m["format"] == fmt.FORMAT
    assert m["num_classes"] == SMALL_CLASSES and cache.temperature == 4.0
    assert cache.dataset_fingerprint == dataset.fingerprint
    assert m["splits"]["train"]["shards"] == 4 and m["splits"]["val"]["shards"] == 1
    assert not (small_cache / fmt.PARTS).exists()  # building leftovers are gone
    config = json.loads((small_cache / fmt.CONFIG).read_text())
    assert config["kind"] == "CacheConfig" and config["config"]["shard_size"] == 64


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 0.5])
def test_temperature_is_applied_at_read_time(small_cache, T):
    cache = open_cache(small_cache)
    for split in SPLITS:
        raw = cache.raw_logits(split)
        np.testing.assert_array_equal(cache.logits(split, T), raw / np.float32(T))
        expected = torch.softmax(torch.from_numpy(raw) / T, dim=1).numpy()
        probs = cache.probs(split, T)
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("T", [0.0, -1.0])
def test_temperature_must_be_positive(small_cache, T):
    cache = open_cache(small_cache)
    with pytest.raises(KdError, match="must be > 0"):
        cache.logits("train", T)
    with pytest.raises(KdError, match="must be > 0"):
        next(cache.stream("train", temperature=T))


def test_reader_names_missing_split_and_layer(small_cache):
    cache = open_cache(small_cache)
    with pytest.raises(KdError, match="has no split 'holdout'; it has (train|val|test), (train|val|test)"):
        cache.raw_logits("holdout")
    with pytest.raises(KdError, match="holdout"):
        cache.index("holdout")
    with pytest.raises(KdError, match="holds no layer 'block1'; it holds embed"):
        cache.features("train", "block1")


# --------------------------------------------------------------------------- round trip

@settings(max_examples=8)
@given(
    n=st.integers(30, 160),
    chunk=st.sampled_from([4, 8, 16]),
    multiple=st.integers(1, 3),
    dtype=st.sampled_from(["float16", "float32"]),
    classes=st.integers(2, 5),
    compression=st.sampled_from(["none", "zstd"]),
)
def test_round_trip(builder, n, chunk, multiple, dtype, classes, compression):
    shard = chunk * multiple
    spec = f"synthetic:{n}:6:{classes}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "c"
        builder(root, dataset=spec, teacher="mlp", shard_size=shard, chunk_size=chunk, dtype=dtype,
                compression=compression, infer_batch_size=max(1, shard // 2 + 1))
        cache = open_cache(root)
        dataset, out = direct_outputs(spec, "mlp", (6,), classes)
        tol = dict(rtol=1e-3, atol=1e-3) if dtype == "float16" else dict(rtol=1e-6, atol=1e-7)
        for split in SPLITS:
            rows = len(dataset.splits[split])
            info = cache.manifest["splits"][split]
            assert info["rows"] == rows and info["shards"] == -(-rows // shard)
            z = cache.raw_logits(split)
            assert z.shape == (rows, classes)
            # the fast chunk reader and zarr-python agree on every value
            np.testing.assert_array_equal(z, np.asarray(
                zarr.open_array(root / fmt.ARRAYS / fmt.logits_key(split), mode="r")[:, 0], np.float32))
            np.testing.assert_allclose(z, out[split][0], **tol)
            np.testing.assert_array_equal(cache.sample_ids(split), dataset.splits[split].sample_ids)
            # the bytes read back are the bytes each shard task hashed when it wrote them
            stored = zarr.open_array(root / fmt.ARRAYS / fmt.logits_key(split), mode="r")
            assert stored.dtype == np.dtype(dtype)
            for record in cache.manifest["shards"][split]:
                block = np.ascontiguousarray(stored[record["start"]:record["stop"]])
                assert hashlib.sha256(block.tobytes()).hexdigest() == record["sha256"][fmt.logits_key(split)]


# --------------------------------------------------------------------------- streaming

def collect(cache, split, **kw):
    batches = list(cache.stream(split, **kw))
    ids = np.concatenate([b.sample_id for b in batches])
    return batches, ids


@pytest.mark.parametrize("shuffle", [True, False])
def test_stream_yields_every_row_once_and_joins_by_id(small_cache, shuffle):
    cache = open_cache(small_cache)
    split = "train"
    T = 2.0
    reference = cache.logits(split, T)
    features = cache.features(split, "embed")
    ids, labels = cache.sample_ids(split), cache.labels(split)
    row_of = {int(i): r for r, i in enumerate(ids)}
    for epoch in range(2):
        batches, seen = collect(cache, split, batch_size=20, temperature=T, layers=("embed",), shuffle=shuffle,
                                seed=epoch, buffer_chunks=3)
        assert sorted(seen.tolist()) == sorted(ids.tolist())  # every row, exactly once
        if shuffle:
            assert not np.array_equal(seen, ids)
        else:
            np.testing.assert_array_equal(seen, ids)
        for b in batches:
            rows = np.array([row_of[int(i)] for i in b.sample_id])
            np.testing.assert_array_equal(b.logits, reference[rows])
            np.testing.assert_array_equal(b.label, labels[rows])
            np.testing.assert_array_equal(b.features["embed"], features[rows])


@settings(max_examples=15)
@given(batch_size=st.integers(1, 70), buffer_chunks=st.integers(1, 5), seed=st.integers(0, 2**16),
       split=st.sampled_from(SPLITS))
def test_stream_batches_are_bounded(small_cache, batch_size, buffer_chunks, seed, split):
    cache = open_cache(small_cache)
    batches, seen = collect(cache, split, batch_size=batch_size, buffer_chunks=buffer_chunks, seed=seed)
    n = cache.num_rows(split)
    assert len(seen) == n and len(set(seen.tolist())) == n
    assert all(len(b.sample_id) == batch_size for b in batches[:-1])
    assert 0 < len(batches[-1].sample_id) <= batch_size
    assert len(batches) == -(-n // batch_size)


def test_stream_is_block_shuffled_and_reproducible(small_cache):
    cache = open_cache(small_cache)
    chunk = cache.manifest["chunk_size"]
    _, a = collect(cache, "train", batch_size=16, seed=7, buffer_chunks=1)
    _, b = collect(cache, "train", batch_size=16, seed=7, buffer_chunks=1)
    _, c = collect(cache, "train", batch_size=16, seed=8, buffer_chunks=1)
    np.testing.assert_array_equal(a, b)  # same seed, same order
    assert not np.array_equal(a, c)
    # with a one-chunk buffer, each run of `chunk` rows is a permutation of one stored chunk
    ids = cache.sample_ids("train")
    for start in range(0, len(a), chunk):
        piece = a[start:start + chunk]
        rows = np.searchsorted(ids, piece)
        assert len(set((rows // chunk).tolist())) == 1


def test_stream_without_logits(small_cache):
    cache = open_cache(small_cache)
    batches, seen = collect(cache, "val", batch_size=8, logits=False, layers=("embed",))
    assert all(b.logits is None for b in batches)
    assert len(seen) == cache.num_rows("val")


# --------------------------------------------------------------------------- resume

def test_interrupted_build_resumes_byte_identical(tmp_path, builder, monkeypatch):
    real = shard.compute_shard
    crash = FailOnCall(real, fail_on=3)
    monkeypatch.setattr(shard, "compute_shard", crash)
    root = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        builder(root, tmp_path)
    finished = done_shards(root)
    assert len(finished) == 2
    created = json.loads((root / fmt.MANIFEST).read_text())["created"]

    # an interrupted cache is never read as if it were whole
    with pytest.raises(KdError, match=r"incomplete \(2/6 shards"):
        open_cache(root)
    from stages import info

    assert info.main([f"cache={root}"])["shards_done"] == "2/6"

    spy = FailOnCall(real)
    monkeypatch.setattr(shard, "compute_shard", spy)
    summary = builder(root, tmp_path)
    all_shards = {("train", k) for k in range(4)} | {("val", 0), ("test", 0)}
    assert len(spy.calls) == 4 and set(spy.calls) == all_shards - finished  # only the missing ones
    assert summary["computed_rows"] == 300 - 2 * 64 and not summary["skipped"]

    monkeypatch.setattr(shard, "compute_shard", real)
    fresh = tmp_path / "fresh"
    builder(fresh, tmp_path)
    assert tree_bytes(root, fmt.ARRAYS, fmt.INDEX) == tree_bytes(fresh, fmt.ARRAYS, fmt.INDEX)
    a, b = open_cache(root), open_cache(fresh)
    assert a.manifest["key"] == b.manifest["key"]
    assert [r["sha256"] for r in a.manifest["shards"]["train"]] == \
        [r["sha256"] for r in b.manifest["shards"]["train"]]
    assert a.manifest["created"] == created  # the resumed cache keeps its creation record


def test_complete_cache_is_not_recomputed(make_cache, builder, monkeypatch):
    root = make_cache()
    before = tree_bytes(root, fmt.ARRAYS, fmt.INDEX)
    spy = FailOnCall(shard.compute_shard)
    monkeypatch.setattr(shard, "compute_shard", spy)
    summary = builder(root)
    assert spy.calls == []
    assert summary["skipped"] is True and summary["computed_rows"] == 0
    assert tree_bytes(root, fmt.ARRAYS, fmt.INDEX) == before


def test_shard_without_index_part_is_recomputed(tmp_path, builder, monkeypatch):
    real = shard.compute_shard
    monkeypatch.setattr(shard, "compute_shard", FailOnCall(real, fail_on=4))
    root = tmp_path / "c"
    with pytest.raises(RuntimeError):
        builder(root, tmp_path)
    # a record whose index part is gone does not count as done
    part, _ = fmt.part_paths(root, "train", 1)
    part.unlink()
    spy = FailOnCall(real)
    monkeypatch.setattr(shard, "compute_shard", spy)
    builder(root, tmp_path)
    assert ("train", 1) in spy.calls and ("train", 0) not in spy.calls
    assert open_cache(root).num_rows("train") == 240


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 1}, "another teacher"),
        ({"dataset": "synthetic:320:1x8x8:3"}, "other data or splits"),
        ({"dtype": "float32"}, r"other cache settings \(layers, pool, dtype, compression or shard layout\)"),
    ],
)
def test_cache_of_other_inputs_is_refused_then_overwritten(make_cache, builder, change, message):
    root = make_cache()
    old = open_cache(root)
    old_logits = old.raw_logits("test")
    before = tree_bytes(root, fmt.ARRAYS, fmt.INDEX) | {"m": (root / fmt.MANIFEST).read_bytes()}
    with pytest.raises(KdError, match=f"was built from {message}.*overwrite=true"):
        builder(root, **change)
    assert tree_bytes(root, fmt.ARRAYS, fmt.INDEX) | {"m": (root / fmt.MANIFEST).read_bytes()} == before
    assert open_cache(root).manifest["key"] == old.manifest["key"]

    builder(root, overwrite="true", **change)
    new = open_cache(root)
    assert new.manifest["key"] != old.manifest["key"]
    assert new.manifest["status"] == "complete"
    if "seed" in change:
        assert new.teacher_fingerprint != old.teacher_fingerprint
        assert not np.array_equal(new.raw_logits("test"), old_logits)


def test_second_build_while_locked_is_refused(tmp_path, builder):
    root = tmp_path / "c"
    with CacheLock(root):
        with pytest.raises(KdError, match="is being built by pid"):
            builder(root, tmp_path)
        assert not root.exists()
    # the lock is released with its holder; a lock file left by a killed run does not block
    (tmp_path / ".c.lock").write_text("pid 999999 on elsewhere")
    builder(root, tmp_path)
    assert open_cache(root).manifest["status"] == "complete"


def test_flipped_byte_is_detected(make_cache):
    root = make_cache(dtype="float32")
    shard_file = root / fmt.ARRAYS / "train" / "logits" / "c" / "1" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[20] ^= 0x01
    shard_file.write_bytes(bytes(data))
    cache = open_cache(root)
    with pytest.raises(KdError, match="train/logits cannot be read.*damaged"):
        cache.raw_logits("train")
    with pytest.raises(KdError, match="damaged"):
        list(cache.stream("train", shuffle=False))
    cache.raw_logits("val")  # other arrays are unaffected


def test_damaged_manifest_and_index(make_cache):
    root = make_cache()
    (root / fmt.INDEX / "val.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(KdError, match="val.parquet does not match its checksum"):
        open_cache(root).index("val")
    (root / fmt.MANIFEST).write_text("{not json")
    with pytest.raises(KdError, match="not valid JSON"):
        open_cache(root)


def test_open_cache_refuses_foreign_directories(tmp_path):
    with pytest.raises(KdError, match="no kdcache cache at"):
        open_cache(tmp_path)
    (tmp_path / fmt.MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(KdError, match="is not a kdcache manifest"):
        open_cache(tmp_path)
    (tmp_path / fmt.MANIFEST).write_text(json.dumps({"format": fmt.FORMAT, "format_version": 99}))
    with pytest.raises(KdError, match="format version 99"):
        open_cache(tmp_path)


def test_replaced_checkpoint_at_same_path_is_not_served_stale(tmp_path, builder):
    """Worker processes keep teachers loaded between builds; a checkpoint replaced at the same
    path (a retrained teacher) must be reloaded, not served from that memory."""
    ckpt = tmp_path / "teacher.pt"
    caches = {}
    for seed in (0, 1):
        model = build_teacher(TeacherSpec("cnn_small", SMALL_SHAPE, SMALL_CLASSES, "random", seed))
        torch.save(model.state_dict(), ckpt)
        root = tmp_path / f"c{seed}"
        builder(root, tmp_path, teacher_ckpt=ckpt, dtype="float32")
        caches[seed] = (open_cache(root), model)
    dataset = open_dataset(DataConfig(dataset=SMALL_DATASET))
    x = torch.from_numpy(dataset.inputs("test", 0, len(dataset.splits["test"])))
    for cache, model in caches.values():
        with torch.inference_mode():
            np.testing.assert_allclose(cache.raw_logits("test"), model(x).numpy(), rtol=1e-6, atol=1e-7)
    assert caches[0][0].teacher_fingerprint != caches[1][0].teacher_fingerprint


def test_local_dask_scheduler_matches_synchronous(make_cache):
    sync = open_cache(make_cache("sync", dtype="float32"))
    local = open_cache(make_cache("local", dtype="float32", scheduler="local", workers=2, threads=1))
    for split in SPLITS:
        np.testing.assert_array_equal(local.raw_logits(split), sync.raw_logits(split))
        np.testing.assert_array_equal(local.features(split, "embed"), sync.features(split, "embed"))
        assert local.index(split).equals(sync.index(split))
    assert local.manifest["key"] == sync.manifest["key"]


def test_concurrent_forwards_write_the_same_cache(make_cache):
    """Batches of one shard finish out of order on several threads: each must still land in
    its own rows (and 8-row batches make every shard many batches)."""
    one = make_cache("one", streams=1, threads=1, infer_batch_size=8)
    many = make_cache("many", streams=3, threads=1, infer_batch_size=8)
    assert tree_bytes(many, fmt.ARRAYS, fmt.INDEX) == tree_bytes(one, fmt.ARRAYS, fmt.INDEX)

    def records(root: Path) -> list[dict]:  # checksums of arrays, inputs and index; no timings
        shards = open_cache(root).manifest["shards"]
        return [{k: v for k, v in r.items() if k != "seconds"} for s in SPLITS for r in shards[s]]
    assert records(many) == records(one)


@pytest.mark.parametrize("scheduler", ["synchronous", "local"])
def test_a_build_leaves_torch_threads_as_it_found_them(make_cache, scheduler):
    """A build runs its forwards on 1 thread each here; torch's setting is process-wide, and a
    user's training after a build in the same process must keep its threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        make_cache(scheduler=scheduler, workers=2 if scheduler == "local" else 1, threads=1)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("overrides, expected", [
    (dict(), min(4, execute.runtime.cores())),  # auto on CPU: one forward per core, at most 4
    (dict(streams=3), 3),
    (dict(compile=True), 1),  # compiled graphs run on one thread
    (dict(scheduler="local", workers=2), 1),  # a dask worker runs one forward
])
def test_forward_streams(overrides, expected):
    from pipeline.config import CacheConfig

    cfg = CacheConfig(**overrides)
    spec = TeacherSpec("cnn_small", SMALL_SHAPE, SMALL_CLASSES, "random", compile=cfg.compile)
    assert execute.forward_streams(cfg, spec) == expected


def test_ordered_keeps_order_and_bounds_the_look_ahead():
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    started, consumed, lock = [], [], threading.Lock()

    def call(i: int) -> int:
        with lock:
            started.append(i)
            assert i - len(consumed) <= 3  # ahead=2: at most 3 calls beyond what was consumed
        time.sleep(0.002 * (i % 3 == 0))  # some calls finish after later ones
        return i

    with ThreadPoolExecutor(3) as pool:
        for result in ordered((lambda i=i: call(i) for i in range(30)), pool, ahead=2):
            consumed.append(result)
    assert consumed == list(range(30)) and sorted(started) == consumed


def test_ordered_raises_a_call_error_and_cancels_the_rest():
    from concurrent.futures import ThreadPoolExecutor

    ran = []

    def call(i: int) -> int:
        ran.append(i)
        if i == 2:
            raise RuntimeError("batch 2 failed")
        return i

    with ThreadPoolExecutor(1) as pool:
        results = ordered((lambda i=i: call(i) for i in range(100)), pool, ahead=4)
        with pytest.raises(RuntimeError, match="batch 2 failed"):
            list(results)
    assert len(ran) <= 2 + 4 + 1  # nothing past the look-ahead ran


def test_extra_layers_and_unpooled_maps(make_cache):
    root = make_cache(layers="block2.2,embed", pool="false", dtype="float32")
    cache = open_cache(root)
    assert cache.manifest["layers"] == {"block2.2": [64, 8, 8], "embed": [128]}
    maps = cache.features("val", "block2.2")
    assert maps.shape == (cache.num_rows("val"), 64, 8, 8)
    batches = list(cache.stream("val", batch_size=7, layers=("block2.2",), shuffle=False))
    np.testing.assert_array_equal(np.concatenate([b.features["block2.2"] for b in batches]), maps)


def test_all_zero_outputs_are_stored_and_read_back(tmp_path, builder):
    """A shard of all-zero outputs must still have its shard file (or it could not be told from a
    deleted one), while empty padding chunks past the end of a split are not stored."""
    import torch

    from pipeline.teachers import TeacherSpec, build_teacher

    state = build_teacher(TeacherSpec("cnn_small", SMALL_SHAPE, SMALL_CLASSES, "random", 0)).state_dict()
    zeroed = {k: (torch.zeros_like(v) if k.endswith(("weight", "bias")) else v) for k, v in state.items()}
    torch.save(zeroed, tmp_path / "zero.pt")
    root = tmp_path / "zero"
    builder(root, tmp_path, teacher_ckpt=tmp_path / "zero.pt")
    cache = open_cache(root)
    for split in SPLITS:
        assert not cache.raw_logits(split).any() and not cache.features(split, "embed").any()
        assert not np.signbit(cache.raw_logits(split)).any()  # +0.0, as an empty chunk reads



def test_padding_chunks_past_the_end_of_a_split_are_not_stored(small_cache_f16):
    from pipeline.cache.chunks import EMPTY, chunk_reader

    # val: 30 rows in one 64-row shard of 16-row chunks: chunks 0-1 hold rows, 2-3 are padding
    where = small_cache_f16 / fmt.ARRAYS / "val" / "logits"
    reader = chunk_reader(zarr.open_array(where, mode="r"), where)
    reader.read(0, 30, 0)
    offsets = reader._indexes[0][:, 0]
    assert (offsets != EMPTY).tolist() == [True, True, False, False]


@pytest.mark.parametrize(("rows", "shard", "chunk", "shard_out"), [
    ((1221, 216, 360), 4096, 72, 1224),             # digits: 3 rows of padding, not 251
    ((80_000, 10_000, 10_000), 4096, 256, 4096),    # large splits: 256 pads under 1%
    ((300, 30, 30), 64, None, None),                # small shards bound the chunk
    ((37, 5, 5), 4096, None, None),                 # splits smaller than any chunk
])
def test_auto_chunk_size_pads_the_splits_little(rows, shard, chunk, shard_out):
    from types import SimpleNamespace

    from pipeline.config import CacheConfig

    from pipeline.settings import resolve

    dataset = SimpleNamespace(splits={name: range(n) for name, n in zip(("train", "val", "test"), rows)})
    cfg = plan.resolve_layout(resolve(CacheConfig, [f"shard_size={shard}"]), dataset, {})
    if chunk is not None:
        assert (cfg.chunk_size, cfg.shard_size) == (chunk, shard_out)
    assert cfg.shard_size % cfg.chunk_size == 0 and cfg.chunk_size <= min(256, shard)
    assert cfg.shard_size <= max(shard, cfg.chunk_size) and cfg.shard_size < max(rows) + cfg.chunk_size
    pad = sum(-n % cfg.chunk_size for n in rows)
    largest = min(256, shard)
    others = [sum(-n % c for n in rows) for c in range(min(32, largest), largest + 1)]
    assert pad <= 0.01 * sum(rows) or pad == min(others)
    explicit = resolve(CacheConfig, ["chunk_size=16", "shard_size=64"])
    assert plan.resolve_layout(explicit, dataset, {}) is explicit  # an explicit chunk is kept


def test_a_shard_record_of_another_cache_key_is_not_done(tmp_path, builder, monkeypatch):
    """A straggling writer of a cache since rebuilt at the same path (overwrite=true with other
    settings) may land a record there: it names its own cache key, so it is not counted done."""
    real = shard.compute_shard
    monkeypatch.setattr(shard, "compute_shard", FailOnCall(real, fail_on=3))
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated crash"):
        builder(root, tmp_path)
    finished = sorted(done_shards(root))
    record_path = fmt.part_paths(root, *finished[0])[1]
    record = json.loads(record_path.read_text())
    assert record["key"] == json.loads((root / fmt.MANIFEST).read_text())["key"]
    record_path.write_text(json.dumps({**record, "key": "another cache's key"}))

    spy = FailOnCall(real)
    monkeypatch.setattr(shard, "compute_shard", spy)
    builder(root, tmp_path)
    assert finished[0] in spy.calls and finished[1] not in spy.calls
    assert all("key" not in r for records in open_cache(root).manifest["shards"].values() for r in records)


def test_repair_recomputes_exactly_the_damaged_shards(make_cache, capsys, monkeypatch):
    """A flipped byte in one shard and a damaged index: `kdcache cache` alone stays the fast
    path (nothing re-read, and it names repair=true); `repair=true` with nothing but the cache's
    path recomputes that shard and every shard of the split whose index failed (its parts are
    gone), and the cache is byte-identical to the undamaged build, manifest included."""
    from conftest import cache_args, run_cli
    from test_faults import array_files, shard_file

    root = make_cache()
    undamaged = {**array_files(root), **{p.name: p.read_bytes() for p in (root / fmt.INDEX).iterdir()},
                 fmt.MANIFEST: (root / fmt.MANIFEST).read_bytes()}
    path = shard_file(root, "train/logits", 2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    (root / fmt.INDEX / "val.parquet").write_bytes(b"PAR1 damaged")

    spy = FailOnCall(shard.compute_shard)
    monkeypatch.setattr(shard, "compute_shard", spy)
    capsys.readouterr()
    again = run_cli(capsys, *["cache", *cache_args(root, root.parent)])  # the build's own command
    assert again["skipped"] and spy.calls == []
    repaired = run_cli(capsys, "cache", f"cache={root}", "repair=true")
    assert sorted(spy.calls) == [("train", 2), ("val", 0)]
    assert repaired["repaired"] == ["train shard 2", "val shard 0"] and repaired["computed_rows"] == 94
    after = {**array_files(root), **{p.name: p.read_bytes() for p in (root / fmt.INDEX).iterdir()},
             fmt.MANIFEST: (root / fmt.MANIFEST).read_bytes()}
    assert after == undamaged
    assert not (root / fmt.PARTS).exists()
    # a healthy cache: repair reads it all and recomputes nothing
    spy.calls.clear()
    assert run_cli(capsys, "cache", f"cache={root}", "repair=true")["repaired"] == [] and spy.calls == []


def test_repair_takes_only_how_it_runs_from_its_command_line(make_cache):
    from stages import cache as build_stage

    root = make_cache()
    with pytest.raises(KdError, match=r"dtype=float32 differs from the 'float16' cache .* drop the key"):
        build_stage.main([f"cache={root}", "repair=true", "dtype=float32"])
    with pytest.raises(KdError, match=r"repair=true needs cache=PATH"):
        build_stage.main(["repair=true"])
    assert build_stage.main([f"cache={root}", "repair=true", "threads=1", "workers=2"])["repaired"] == []
