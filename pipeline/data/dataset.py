"""The dataset type every source produces: ``(sample_id, x, y)`` rows in train / val / test splits.

A source provides raw rows in *pools* (the splits the data ships with). :class:`Dataset` turns
pools into the three cached splits (carving a stratified, seeded validation split from train
when the data has none), computes normalisation statistics on train only, and fingerprints the
inputs exactly as the teacher will see them.

``sample_id`` is an int64 that names a sample for good: the same file and spec always give the
same ids, independent of split carving or batch order. Students join cached teacher outputs to
inputs by it (:func:`positions_of`), never by position.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np

from pipeline.config import DataConfig
from pipeline.errors import KdError

SPLITS = ("train", "val", "test")
BLOCK = 4096  # rows per read when streaming over a whole split (stats, fingerprints)



class RowSource(Protocol):
    """Raw rows of one pool: ids, labels, and inputs read by position."""

    ids: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n]

    def read(self, positions: np.ndarray) -> np.ndarray:
        """Raw inputs (float32, shape [len(positions), *sample_shape]) at these positions."""


@dataclass
class ArraySource:
    """A pool held in memory as a numpy array (digits, npz, torchvision tensors)."""

    x: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def read(self, positions: np.ndarray) -> np.ndarray:
        return np.asarray(self.x[positions], dtype=np.float32)


@dataclass
class Split:
    """One cached split: which pool rows it takes, in cache row order."""

    name: str
    pool: str
    positions: np.ndarray  # int64 positions into the pool, sorted
    sample_ids: np.ndarray  # int64
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.positions)


class Dataset:
    """A dataset ready for the teacher: three splits of normalised float32 inputs (of
    documents, ``str``, for :class:`pipeline.data.text.TextDataset`)."""

    modality = "array"  # "text": inputs are documents (str), read by a tokenizer or vectoriser

    def __init__(self, spec: str, pools: dict[str, RowSource], sample_shape: tuple[int, ...],
                 num_classes: int, cfg: DataConfig, *, normalise: bool = True,
                 fixed_fingerprint: str | None = None, notes: dict | None = None):
        self.spec = spec
        self.cfg = cfg
        self.pools = pools
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.num_classes = int(num_classes)
        self.notes = notes or {}
        self.plugin: dict | None = None  # a plugin source's identity (set by the registry's adapter)
        self._fixed_fingerprint = fixed_fingerprint
        self.splits = self._make_splits()
        self.mean, self.std = self._train_stats() if normalise else (
            np.zeros(self._stat_shape(), np.float32), np.ones(self._stat_shape(), np.float32))

    # ------------------------------------------------------------------ splits
    def _make_splits(self) -> dict[str, Split]:
        if "test" not in self.pools or "train" not in self.pools:
            raise ValueError("a source must provide train and test pools")
        train = self.pools["train"]
        out = {"test": _whole("test", self.pools["test"])}
        if "val" in self.pools:
            out["train"] = _whole("train", train)
            out["val"] = _whole("val", self.pools["val"])
        else:
            tr_pos, val_pos = carve(train.labels, self.cfg.val_fraction, self.cfg.seed)
            out["train"] = _subset("train", "train", train, tr_pos)
            out["val"] = _subset("val", "train", train, val_pos)
        for split in out.values():
            if len(split) == 0:
                raise KdError(f"dataset {self.spec}: split {split.name} is empty; give it more rows")
        ids = np.concatenate([s.sample_ids for s in out.values()])
        if len(np.unique(ids)) != len(ids):
            raise KdError(f"dataset {self.spec}: sample ids are not unique across splits")
        return {name: out[name] for name in SPLITS}

    # ------------------------------------------------------------------ reading
    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.sample_shape

    def raw(self, split: str, start: int, stop: int) -> np.ndarray:
        s = self.splits[split]
        return self.pools[s.pool].read(s.positions[start:stop])

    def inputs(self, split: str, start: int, stop: int) -> np.ndarray:
        """Normalised float32 inputs of cache rows ``[start, stop)`` of ``split``."""
        x = self.raw(split, start, stop)
        return self.normalise(x)

    def inputs_at(self, split: str, rows: np.ndarray) -> np.ndarray:
        """Normalised float32 inputs of arbitrary split rows (any order)."""
        s = self.splits[split]
        return self.normalise(self.pools[s.pool].read(s.positions[np.asarray(rows, np.int64)]))

    def normalise(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32, copy=False)

    def blocks(self, split: str, block: int = BLOCK):
        n = len(self.splits[split])
        for start in range(0, n, block):
            yield start, min(n, start + block)

    # ------------------------------------------------------------------ statistics
    def _stat_shape(self) -> tuple[int, ...]:
        # Per channel for images and multichannel signals, one scalar for flat rows.
        if len(self.sample_shape) >= 2:
            return (self.sample_shape[0],) + (1,) * (len(self.sample_shape) - 1)
        return (1,)

    def _train_stats(self) -> tuple[np.ndarray, np.ndarray]:
        axes = tuple(i for i in range(len(self.sample_shape) + 1) if i != 1) \
            if len(self.sample_shape) >= 2 else None
        total, total_sq, count = 0.0, 0.0, 0
        for start, stop in self.blocks("train"):
            x = self.raw("train", start, stop).astype(np.float64)
            total = total + x.sum(axis=axes)
            total_sq = total_sq + (x * x).sum(axis=axes)
            count += x.size // (self.sample_shape[0] if axes is not None else 1)
        mean = np.atleast_1d(total / count)
        var = np.maximum(np.atleast_1d(total_sq / count) - mean ** 2, 0.0)
        std = np.sqrt(var)
        std[std < 1e-6] = 1.0  # constant channels stay as they are instead of dividing by 0
        shape = self._stat_shape()
        return mean.reshape(shape).astype(np.float32), std.reshape(shape).astype(np.float32)

    @property
    def preprocessing(self) -> dict:
        return {"normalise": "per-channel" if len(self.sample_shape) >= 2 else "scalar",
                "stats_from": "train",
                "mean": [round(float(v), 8) for v in self.mean.ravel()],
                "std": [round(float(v), 8) for v in self.std.ravel()],
                "dtype": "float32"}

    # ------------------------------------------------------------------ identity
    def describe(self) -> dict:
        return {"spec": self.spec, "input_shape": list(self.sample_shape),
                "num_classes": self.num_classes,
                "rows": {name: len(s) for name, s in self.splits.items()},
                "val_fraction": self.cfg.val_fraction, "seed": self.cfg.seed,
                "val_from": self.splits["val"].pool, **self.notes,
                **({"plugin": self.plugin} if self.plugin else {})}

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the split definition, the labels, the preprocessing and every raw input
        byte in cache order (or, for generated data, the generator's spec and version)."""
        h = hashlib.sha256()
        h.update(repr((self.spec, self.sample_shape, self.num_classes)).encode())
        h.update(repr(sorted(self.preprocessing.items())).encode())
        if self.plugin:  # the code that made the rows: its import path, package and version
            h.update(repr(sorted(self.plugin.items())).encode())
        for name, split in self.splits.items():
            h.update(name.encode())
            h.update(np.ascontiguousarray(split.sample_ids, np.int64).tobytes())
            h.update(np.ascontiguousarray(split.labels, np.int64).tobytes())
            if self._fixed_fingerprint is None:
                self._hash_inputs(h, name)
        if self._fixed_fingerprint is not None:
            h.update(self._fixed_fingerprint.encode())
        return h.hexdigest()


    def _hash_inputs(self, h, name: str) -> None:
        """Feed every raw input byte of split ``name``, in cache order, to ``h``."""
        for start, stop in self.blocks(name):
            h.update(np.ascontiguousarray(self.raw(name, start, stop)).tobytes())


def _whole(name: str, pool: RowSource) -> Split:
    positions = np.arange(len(pool.ids), dtype=np.int64)
    return _subset(name, name, pool, positions)


def _subset(name: str, pool_name: str, pool: RowSource, positions: np.ndarray) -> Split:
    positions = np.sort(np.asarray(positions, dtype=np.int64))
    return Split(name, pool_name, positions, np.asarray(pool.ids[positions], np.int64),
                 np.asarray(pool.labels[positions], np.int64))


def carve(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of positions ``0..n-1`` into (keep, carved)."""
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(labels))
    try:
        keep, carved = train_test_split(positions, test_size=fraction, random_state=seed,
                                        stratify=labels)
    except ValueError:  # a class too small to stratify: fall back to a plain seeded split
        try:
            keep, carved = train_test_split(positions, test_size=fraction, random_state=seed)
        except ValueError:  # so few rows that one side would be empty
            raise KdError(f"{len(labels)} row(s) are too few to carve {fraction:g} of them off "
                          "as a split; give the dataset more rows, or lower val_fraction or "
                          "test_fraction") from None
    return np.sort(keep), np.sort(carved)



def positions_of(ids: np.ndarray, wanted: np.ndarray, what: str = "cache") -> np.ndarray:
    """Positions p with ``ids[p] == wanted``: the join of cached rows to dataset rows by
    sample_id. Raises if any wanted id is absent (the cache is not from this data)."""
    order = np.argsort(ids, kind="stable")
    found = np.searchsorted(ids, wanted, sorter=order)
    found = np.clip(found, 0, len(ids) - 1)
    positions = order[found]
    missing = ids[positions] != wanted
    if missing.any():
        raise KdError(f"{int(missing.sum())} {what} sample ids (e.g. {int(wanted[missing][0])}) are "
                      "not in the dataset; the cache was built from other data")
    return positions
