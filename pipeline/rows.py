"""Array-like views of rows that are read on demand, so evaluating a split (val every epoch,
test once) holds one block of rows at a time rather than the whole split."""

from __future__ import annotations

from typing import Callable

import numpy as np

BLOCK_ROWS = 4096


class LazyRows:
    """Rows ``0..n-1`` of shape ``row_shape``, fetched by ``fetch(start, stop)`` when sliced.

    Supports ``len``, ``shape``, ``dtype`` and contiguous slicing ``X[a:b]``: enough for
    :func:`map_blocks` and for batched prediction loops, which never need all rows at once.
    """

    def __init__(self, n: int, row_shape: tuple[int, ...], fetch: Callable[[int, int], np.ndarray],
                 dtype=np.float32):
        self.n, self.row_shape, self.fetch, self.dtype = n, tuple(row_shape), fetch, np.dtype(dtype)

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n,) + self.row_shape

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("LazyRows supports contiguous slices only")
        start, stop, _ = key.indices(self.n)
        return self.fetch(start, max(start, stop))


def map_blocks(fn: Callable[[np.ndarray], np.ndarray], X, rows: int = BLOCK_ROWS) -> np.ndarray:
    """``fn(X)`` for a row-wise ``fn``, computed block by block when ``X`` is lazy."""
    if isinstance(X, np.ndarray):
        return fn(X)
    return np.concatenate([fn(X[a:a + rows]) for a in range(0, len(X), rows)])
