"""Fast whole-chunk reads of one cache array, straight from its Zarr v3 shard files.

Why not ``zarr_array[a:b]``: every zarr-python call pays 1-2 ms in its async machinery, whatever
its size, and a shuffled stream reads one chunk per call. Measured on 256-row chunks of logits +
128-d features: zarr-python 90-140k rows/s, tensorstore with 8 reads in flight 1.1-1.6M, a numpy
memmap of the same bytes 1.3-4M, this module within 2x of the memmap (docs/BENCHMARKS.md).

It reads exactly the layout kdcache writes (docs/CACHE_FORMAT.md): one ``sharding_indexed``
codec, shard index at the end protected by a CRC32C, inner codecs ``bytes`` (little endian),
optionally ``zstd``, then ``crc32c``; the default chunk key encoding; one shard across every
non-row axis. :func:`chunk_reader` returns None for anything else and callers fall back to
zarr-python. Every chunk's CRC32C is checked, as zarr does. tests/test_chunks.py compares
every read with zarr-python's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import format as fmt
from pipeline.errors import KdError

EMPTY = 2**64 - 1  # offset and length of an inner chunk that was never written


def to_float32(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` (``dst`` float32, C-contiguous). NumPy casts float16 to float32 one
    value at a time, ~10x slower than torch's vectorised cast (17 ms vs 1.7 ms for 10M values
    here), and stage two converts every cached float16 value it reads."""
    if src.dtype == np.float16:
        if not src.flags.writeable:  # a chunk's read-only bytes, which torch refuses to wrap
            src = src.copy()
        torch.from_numpy(dst).copy_(torch.from_numpy(src))
    else:
        np.copyto(dst, src, casting="unsafe")


def _crc32c(data: bytes) -> int:
    import google_crc32c

    return google_crc32c.value(data)


class ChunkReader:
    """Rows of one sharded array, decoded chunk by chunk with one ``pread`` per chunk."""

    def __init__(self, directory: Path, shape: tuple[int, ...], dtype: np.dtype, shard_rows: int,
                 chunk_rows: int, zstd: bool, fill_value: float):
        self.directory = Path(directory)
        self.shape = shape
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_rows, self.chunk_rows = shard_rows, chunk_rows
        self.per_shard = shard_rows // chunk_rows
        self.chunk_shape = (chunk_rows,) + shape[1:]
        self.fill_value = fill_value
        self._chunk_bytes = int(np.prod(self.chunk_shape)) * self.dtype.itemsize
        self._paths: dict[int, str] = {}
        self._zstd = None
        if zstd:
            from numcodecs import Zstd

            self._zstd = Zstd()
        self._indexes: dict[int, np.ndarray] = {}

    def shard_path(self, shard: int) -> Path:
        return self.directory.joinpath("c", str(shard), *["0"] * (len(self.shape) - 1))

    def read(self, start: int, stop: int, view: int | np.ndarray, out: np.ndarray | None = None,
             index: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` at ``view`` (one view, or one per row) as float32 (integer
        arrays: as stored) ``[stop - start, ...]``, or written into ``out`` (row ``start + i``
        to ``out[i]``, or to ``out[index[i]]`` when ``index`` is given: a scatter, which lets a
        shuffling reader place rows as it decodes them; the stream scatters into a buffer of
        the stored dtype and casts the whole buffer once)."""
        if out is None:
            out = np.empty((stop - start,) + self.shape[2:],
                           np.float32 if self.dtype.kind == "f" else self.dtype.newbyteorder("="))
        per_row = np.ndim(view) > 0
        row = start
        while row < stop:
            chunk = row // self.chunk_rows
            first = chunk * self.chunk_rows
            last = min(stop, first + self.chunk_rows)
            rows = self._chunk(chunk)[row - first:last - first]
            data = (rows[np.arange(last - row), view[row - start:last - start]] if per_row
                    else rows[:, view])
            if index is None:
                to_float32(out[row - start:last - start], data)
            else:
                out[index[row - start:last - start]] = data
            row = last
        return out

    def _chunk(self, chunk: int) -> np.ndarray:
        shard, inner = divmod(chunk, self.per_shard)
        path = self._paths.get(shard)
        if path is None:
            path = self._paths[shard] = str(self.shard_path(shard))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise self._damaged(path, "the shard file is missing") from None
        try:
            index = self._indexes.get(shard)
            if index is None:
                index = self._indexes[shard] = self._read_index(fd, path)
            offset, nbytes = int(index[inner, 0]), int(index[inner, 1])
            if offset == EMPTY:
                return np.full(self.chunk_shape, self.fill_value, self.dtype)
            # payload and its CRC in two reads: no copy to split them
            payload = os.pread(fd, nbytes - 4, offset) if nbytes >= 4 else b""
            crc = os.pread(fd, 4, offset + nbytes - 4) if nbytes >= 4 else b""
        finally:
            os.close(fd)
        if len(payload) + len(crc) != nbytes or nbytes < 4:
            raise self._damaged(path, f"inner chunk {inner} is truncated")
        if _crc32c(payload) != int.from_bytes(crc, "little"):
            raise self._damaged(path, f"inner chunk {inner} fails its CRC32C check")
        raw = self._zstd.decode(payload) if self._zstd is not None else payload
        if len(raw) != self._chunk_bytes:
            raise self._damaged(path, f"inner chunk {inner} decodes to {len(raw)} bytes, "
                                      f"not {self._chunk_bytes}")
        return np.frombuffer(raw, self.dtype).reshape(self.chunk_shape)

    def _read_index(self, fd: int, path: str) -> np.ndarray:
        size = self.per_shard * 16 + 4
        total = os.fstat(fd).st_size
        if total < size:
            raise self._damaged(path, "the shard file is truncated")
        tail = os.pread(fd, size, total - size)
        if _crc32c(tail[:-4]) != int.from_bytes(tail[-4:], "little"):
            raise self._damaged(path, "its shard index fails its CRC32C check")
        return np.frombuffer(tail[:-4], "<u8").reshape(self.per_shard, 2)

    def _damaged(self, path: str, what: str) -> KdError:
        root = next((p.parent for p in self.directory.parents if p.name == fmt.ARRAYS), None)
        hint = fmt.repair_hint(root) if root is not None else "the array is damaged"  # (not in a cache)
        return KdError(f"cache array {self.directory} cannot be read "
                       f"({Path(path).relative_to(self.directory)}: {what}); {hint}")


def chunk_reader(arr, directory: Path) -> ChunkReader | None:
    """A :class:`ChunkReader` for the zarr array ``arr`` stored at ``directory``, or None when its
    layout is not the one kdcache writes."""
    spec = arr.metadata.to_dict()
    codecs = spec.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    conf = codecs[0]["configuration"]
    inner = [c["name"] for c in conf["codecs"]]
    little = all(c.get("configuration", {}).get("endian", "little") == "little"
                 for c in conf["codecs"] + conf["index_codecs"] if c["name"] == "bytes")
    shard_shape = tuple(spec["chunk_grid"]["configuration"]["chunk_shape"])
    chunk_shape = tuple(conf["chunk_shape"])
    if (inner not in (["bytes", "crc32c"], ["bytes", "zstd", "crc32c"]) or not little
            or [c["name"] for c in conf["index_codecs"]] != ["bytes", "crc32c"]
            or conf.get("index_location", "end") != "end"
            or spec.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}
            or shard_shape[1:] != tuple(arr.shape[1:]) or chunk_shape[1:] != tuple(arr.shape[1:])
            or shard_shape[0] % chunk_shape[0] or np.dtype(arr.dtype).kind not in "fiu"):
        return None
    return ChunkReader(directory, tuple(arr.shape), np.dtype(arr.dtype), shard_shape[0],
                       chunk_shape[0], "zstd" in inner, float(spec.get("fill_value") or 0))
