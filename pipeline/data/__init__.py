"""Datasets: every source becomes ``(sample_id, x, y)`` rows in train / val / test splits.

One module per source (digits, npz, vision, imagefolder, synthetic), each registering itself in
:data:`DATASETS`; :mod:`pipeline.data.dataset` holds the :class:`Dataset` type they all return.
The sources are imported here, explicitly, so that ``DATASETS`` is complete once this package is.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.dataset import (BLOCK, SPLITS, ArraySource, Dataset, RowSource, Split, carve,
                                   positions_of)
from pipeline.data.registry import DATASETS, DatasetNeeds
from pipeline.data import digits, imagefolder, npz, synthetic, vision  # noqa: F401  (registration)
from pipeline.errors import KdError

MAX_SEED = 2**32 - 1  # the seed reaches scikit-learn's splitter, which takes 32-bit seeds

__all__ = ["BLOCK", "DATASETS", "SPLITS", "ArraySource", "Dataset", "DatasetNeeds", "RowSource",
           "Split", "absolute_spec", "carve", "dataset_slug", "open_dataset", "positions_of"]


def open_dataset(cfg: DataConfig) -> Dataset:
    """Open ``cfg.dataset`` (``NAME`` or ``NAME:ARG``) through the dataset registry."""
    kind, _, arg = cfg.dataset.partition(":")
    source = DATASETS.get(kind)
    if not 0 <= cfg.seed <= MAX_SEED:
        raise KdError(f"seed={cfg.seed} must be in 0..{MAX_SEED}")
    return source(arg, cfg)


def absolute_spec(spec: str) -> str:
    """``spec`` with the path of a path-taking source made absolute (``npz:d.npz`` →
    ``npz:/cwd/d.npz``); any other spec unchanged. Unknown names are left for
    :func:`open_dataset` to refuse."""
    kind, sep, arg = spec.partition(":")
    if not arg or kind not in DATASETS or not DATASETS.declared(kind).path:
        return spec
    return f"{kind}{sep}{os.path.abspath(os.path.expanduser(arg))}"


def dataset_slug(spec: str) -> str:
    """A short, filesystem-safe name for a dataset spec (used in default paths)."""
    kind, _, arg = spec.partition(":")
    if kind in DATASETS and DATASETS.declared(kind).path:
        arg = Path(arg).stem or Path(arg).name
    text = f"{kind}-{arg}" if arg else kind
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-").lower()
