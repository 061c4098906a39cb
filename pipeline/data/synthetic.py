"""Generated data of any size and shape, for tests and benchmarks."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.dataset import Dataset
from pipeline.data.registry import DATASETS
from pipeline.errors import KdError

SYNTHETIC_VERSION = 1
SYNTHETIC_BLOCK = 1024
SYNTHETIC_CACHE_BYTES = 64 << 20  # generated blocks kept per pool (at least one)


@dataclass
class SyntheticPool:
    """Rows generated on demand from (seed, block): never holds N inputs in memory."""

    start: int
    stop: int
    shape: tuple[int, ...]
    classes: int
    seed: int
    # Readers ask for batches smaller than a block (e.g. 256 of 1024 rows, in order): without
    # this, every batch would regenerate its whole block. A few recent blocks, bounded in bytes.
    _blocks: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @cached_property
    def ids(self) -> np.ndarray:
        return np.arange(self.start, self.stop, dtype=np.int64)

    @cached_property
    def labels(self) -> np.ndarray:
        first, last = self.start // SYNTHETIC_BLOCK, (self.stop - 1) // SYNTHETIC_BLOCK
        y = np.concatenate([self._block_labels(b) for b in range(first, last + 1)])
        return y[self.start - first * SYNTHETIC_BLOCK: self.stop - first * SYNTHETIC_BLOCK]

    def _block_labels(self, b: int) -> np.ndarray:
        return np.random.default_rng([self.seed, b, 1]).integers(0, self.classes, SYNTHETIC_BLOCK)

    @cached_property
    def _prototypes(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 2**31])
        return (0.35 * rng.standard_normal((self.classes,) + self.shape)).astype(np.float32)

    def _block(self, b: int) -> np.ndarray:
        """All rows of block ``b``: noise from its own seed plus its rows' class prototypes."""
        with self._lock:
            if b in self._blocks:
                self._blocks.move_to_end(b)
                return self._blocks[b]
        x = np.random.default_rng([self.seed, b, 0]).standard_normal(
            (SYNTHETIC_BLOCK,) + self.shape, dtype=np.float32)
        x += self._prototypes[self._block_labels(b)]
        with self._lock:
            self._blocks[b] = x
            while len(self._blocks) > max(1, SYNTHETIC_CACHE_BYTES // x.nbytes):
                self._blocks.popitem(last=False)
        return x

    def read(self, positions: np.ndarray) -> np.ndarray:
        ids = self.start + np.asarray(positions, np.int64)
        out = np.empty((len(ids),) + self.shape, np.float32)
        blocks = ids // SYNTHETIC_BLOCK
        for b in np.unique(blocks):
            mask = blocks == b
            out[mask] = self._block(int(b))[ids[mask] - b * SYNTHETIC_BLOCK]
        return out


@DATASETS.register("synthetic")
def synthetic(arg: str, cfg: DataConfig) -> Dataset:
    """``synthetic:N:SHAPE[:CLASSES]``, e.g. ``synthetic:100000:3x32x32:10``: class prototypes
    plus Gaussian noise, generated block by block from ``seed``. Rows 0-80% are train, 80-90%
    val, 90-100% test; sample_id = row. For tests and benchmarks."""
    parts = arg.split(":")
    try:
        n = int(parts[0])
        shape = tuple(int(s) for s in parts[1].lower().split("x"))
        classes = int(parts[2]) if len(parts) > 2 else 10
        if len(parts) > 3 or n < 30 or classes < 2 or min(shape) < 1 or len(shape) > 3:
            raise ValueError
    except (ValueError, IndexError):
        raise KdError(f"dataset synthetic:{arg} is malformed; write synthetic:N:SHAPE[:CLASSES] "
                      "with N >= 30, e.g. synthetic:10000:3x32x32:10") from None
    cut1, cut2 = int(n * 0.8), int(n * 0.9)
    pools = {name: SyntheticPool(a, b, shape, classes, cfg.seed)
             for name, (a, b) in {"train": (0, cut1), "val": (cut1, cut2), "test": (cut2, n)}.items()}
    spec = f"synthetic:{n}:{'x'.join(map(str, shape))}:{classes}"
    fixed = f"synthetic-v{SYNTHETIC_VERSION}-seed{cfg.seed}"
    return Dataset(spec, pools, shape, classes, cfg, normalise=False, fixed_fingerprint=fixed,
                   notes={"generator_version": SYNTHETIC_VERSION})


