"""Keyed random numbers: draws that are a pure function of a key per row (splitmix64), so that
any worker can draw any row's numbers alone, in any order, and a rebuild draws the same ones.

Used by the augmentation policies (a view's parameters, keyed by (seed, split, sample_id,
view)), by sparse logits (``sample:K`` draws) and by the students' view draws. At the bottom
of the library: NumPy only.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele, Lea & Flood 2014), on uint64 arrays (wrapping)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58_476D_1CE4_E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D0_49BB_1331_11EB)
    return z ^ (z >> np.uint64(31))


def key(*parts: int | np.ndarray) -> np.ndarray:
    """A uint64 key per row from integer parts (scalars or int64 arrays, broadcast):
    h = 0; for each part p: h = mix(h + golden + (p as uint64))."""
    h = np.zeros((), np.uint64)
    with np.errstate(over="ignore"):
        for part in parts:
            h = _mix(h + _GOLDEN + np.asarray(part).astype(np.int64).astype(np.uint64))
    return np.atleast_1d(h)


class KeyedRandom:
    """Random numbers that depend only on a key per row and on the draw's index: draw d of
    row i is ``mix(key_i + (d + 1) * golden)``; ``random`` keeps its top 53 bits as a float in
    [0, 1), ``integers(low, high)`` is ``low + floor(random * (high - low))``. Any worker can
    draw any row's numbers alone, in any order, and a rebuild draws the same ones."""

    def __init__(self, keys: np.ndarray):
        self.keys = np.asarray(keys, np.uint64)
        self.draws = 0

    def random(self, size: int | None = None) -> np.ndarray:
        if size is not None and size != len(self.keys):
            raise ValueError(f"KeyedRandom has {len(self.keys)} keys, asked for {size} numbers")
        self.draws += 1
        with np.errstate(over="ignore"):
            bits = _mix(self.keys + np.uint64(self.draws) * _GOLDEN)
        return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53

    def integers(self, low: int, high: int, size: int | None = None) -> np.ndarray:
        """Integers in [low, high)."""
        u = self.random(size)
        return np.minimum(low + np.floor(u * (high - low)).astype(np.int64), high - 1)


SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
RNG = "splitmix64-v1"  # the name of this keyed generator, recorded in manifests


def view_random(seed: int, split: str, sample_ids: np.ndarray, view: int) -> KeyedRandom:
    """The random numbers of view ``view`` of these samples: keyed by (seed, split, sample_id,
    view), so a view's parameters never depend on batching, sharding or order."""
    return KeyedRandom(key(seed, SPLIT_IDS[split], np.asarray(sample_ids, np.int64), view))
