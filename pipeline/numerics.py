"""Pure NumPy helpers shared by both stages (the cache reader, the students, the metrics and the
CPU loss kernels): at the bottom of the library, importing nothing of it."""

from __future__ import annotations

import numpy as np


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def logsumexp(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """log Σ exp(z) along ``axis`` (removed); rows of −inf give −inf, not nan."""
    m = z.max(axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(z - m).sum(axis=axis, keepdims=True)) + m).squeeze(axis)
