"""scikit-learn's 8x8 digits: the built-in dataset that works offline."""

from __future__ import annotations

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.dataset import ArraySource, Dataset, carve
from pipeline.data.registry import DATASETS
from pipeline.errors import KdError


@DATASETS.register("digits")
def digits(arg: str, cfg: DataConfig) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes); ships offline.

    sample_id is the row in ``load_digits()``. The test split (20%) is fixed by seed 0, so every
    run and every seed is scored on the same test images; ``seed`` moves only the val split.
    """
    if arg:
        raise KdError(f"dataset digits takes no argument (got digits:{arg})")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None]  # (N, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    ids = np.arange(len(y), dtype=np.int64)
    keep, test = carve(y, 0.2, seed=0)
    pools = {"train": ArraySource(x[keep], y[keep], ids[keep]),
             "test": ArraySource(x[test], y[test], ids[test])}
    return Dataset("digits", pools, x.shape[1:], 10, cfg)


