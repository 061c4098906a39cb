"""The fast chunk reader (pipeline/cache/chunks.py) must read exactly what zarr-python reads,
for every layout kdcache writes, and refuse damaged shards the way zarr's CRC check does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cache.chunks import chunk_reader
from pipeline.cache.plan import codecs
from pipeline.errors import KdError


def make_array(path: Path, n: int, rest: tuple[int, ...], chunk: int, per_shard: int, dtype: str,
               compression: str, seed: int = 0, write_empty=True):
    import zarr

    arr = zarr.create_array(path, shape=(n, 1) + rest, dtype=dtype, shards=(chunk * per_shard, 1) + rest,
                            chunks=(chunk, 1) + rest, compressors=codecs(compression), fill_value=0,
                            zarr_format=3)
    data = np.random.default_rng(seed).standard_normal((n, 1) + rest).astype(dtype)
    data[: min(n, chunk)] = 0  # an all-zero chunk must still read back as zeros
    arr = arr.with_config({"write_empty_chunks": write_empty})
    for a in range(0, n, chunk * per_shard):  # whole shards, as the writer does
        arr[a:a + chunk * per_shard] = data[a:a + chunk * per_shard]
    return zarr.open_array(path, mode="r"), data


@given(n=st.integers(1, 300), chunk=st.sampled_from([1, 4, 16, 33]), per_shard=st.integers(1, 4),
       rest=st.sampled_from([(3,), (1,), (2, 3, 2)]), dtype=st.sampled_from(["float16", "float32"]),
       compression=st.sampled_from(["none", "zstd"]), data=st.data())
def test_reads_equal_zarr(tmp_path_factory, n, chunk, per_shard, rest, dtype, compression, data):
    path = tmp_path_factory.mktemp("arr") / "a"
    arr, expected = make_array(path, n, rest, chunk, per_shard, dtype, compression)
    reader = chunk_reader(arr, path)
    assert reader is not None
    start = data.draw(st.integers(0, n - 1))
    stop = data.draw(st.integers(start + 1, n))
    got = reader.read(start, stop, 0)
    assert got.dtype == np.float32 and got.shape == (stop - start,) + rest
    np.testing.assert_array_equal(got, expected[start:stop, 0].astype(np.float32))
    np.testing.assert_array_equal(got, np.asarray(arr[start:stop, 0], np.float32))
    out = np.full((stop - start,) + rest, np.nan, np.float32)
    assert reader.read(start, stop, 0, out=out) is out
    np.testing.assert_array_equal(out, got)
    where = np.random.default_rng(n).permutation(stop - start)  # scatter: row i to out[where[i]]
    reader.read(start, stop, 0, out=out, index=where)
    np.testing.assert_array_equal(out[where], got)


def test_unwritten_chunks_read_as_fill_value(tmp_path):
    arr, _ = make_array(tmp_path / "a", 64, (3,), 8, 4, "float16", "none", write_empty=False)
    reader = chunk_reader(arr, tmp_path / "a")
    np.testing.assert_array_equal(reader.read(0, 8, 0), np.zeros((8, 3), np.float32))


@pytest.mark.parametrize("layout", ["unsharded", "big-endian", "gzip"])
def test_other_layouts_fall_back_to_zarr(tmp_path, layout):
    import zarr
    from zarr.codecs import BytesCodec, Crc32cCodec, GzipCodec

    kw = dict(shape=(32, 1, 3), dtype="float32", chunks=(8, 1, 3), fill_value=0)
    if layout != "unsharded":
        kw["shards"] = (16, 1, 3)
    if layout == "big-endian":
        kw["serializer"] = BytesCodec(endian="big")
    if layout == "gzip":
        kw["compressors"] = [GzipCodec(), Crc32cCodec()]
    arr = zarr.create_array(tmp_path / "a", **kw)
    assert chunk_reader(arr, tmp_path / "a") is None


def _shard(path: Path, k: int = 0) -> Path:
    return path / "c" / str(k) / "0" / "0"


@pytest.mark.parametrize("damage, message", [
    (lambda p: _flip(p, 5), "inner chunk 0 fails its CRC32C check"),
    (lambda p: _flip(p, -3), "shard index fails its CRC32C check"),
    (lambda p: p.write_bytes(p.read_bytes()[:10]), "truncated"),
    (lambda p: p.unlink(), "shard file is missing"),
])
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_damage_is_refused(tmp_path, damage, message, compression):
    arr, _ = make_array(tmp_path / "a", 64, (3,), 8, 4, "float16", compression, seed=1)
    reader = chunk_reader(arr, tmp_path / "a")
    damage(_shard(tmp_path / "a"))
    with pytest.raises(KdError, match=f"cannot be read .*{message}.*damaged"):
        reader.read(0, 64, 0)


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
