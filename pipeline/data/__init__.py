"""Datasets: every source becomes ``(sample_id, x, y)`` rows in train / val / test splits.

One module per source (digits, npz, vision, imagefolder, synthetic, text, tokens), each registering itself in
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
from pipeline.data.text import TextDataset
from pipeline.data.tokens import TokenDataset
from pipeline.data import digits, digits3, imagefolder, npz, synthetic, text, tokens, vision  # noqa: F401  (registration)
from pipeline import plugins
from pipeline.errors import KdError

MAX_SEED = 2**32 - 1  # the seed reaches scikit-learn's splitter, which takes 32-bit seeds

__all__ = ["BLOCK", "DATASETS", "SPLITS", "ArraySource", "Dataset", "DatasetNeeds", "RowSource",
           "Split", "TextDataset", "TokenDataset", "absolute_spec", "split_spec", "carve", "dataset_slug", "missing_path", "open_dataset",
           "positions_of"]


def open_dataset(cfg: DataConfig) -> Dataset:
    """Open ``cfg.dataset`` (``NAME`` or ``NAME:ARG``) through the dataset registry."""
    kind, arg = split_spec(cfg.dataset)
    source = DATASETS.get(kind)
    if not 0 <= cfg.seed <= MAX_SEED:
        raise KdError(f"seed={cfg.seed} must be in 0..{MAX_SEED}")
    return source(arg, cfg)


def split_spec(spec: str) -> tuple[str, str]:
    """``NAME[:ARG]`` → (NAME, ARG); a plugin's NAME is an import path, ``pkg.module:fn[:ARG]``."""
    kind, sep, rest = spec.partition(":")
    if sep and kind not in DATASETS and kind not in plugins.entry_points("dataset"):
        head, _, arg = rest.partition(":")
        if plugins.is_import_path(f"{kind}:{head}"):
            return f"{kind}:{head}", arg
    return kind, rest


def absolute_spec(spec: str) -> str:
    """``spec`` with the path of a path-taking source made absolute (``npz:d.npz`` →
    ``npz:/cwd/d.npz``); any other spec unchanged. Unknown names are left for
    :func:`open_dataset` to refuse."""
    kind, arg = split_spec(spec)
    if plugins.is_import_path(kind) or kind in plugins.entry_points("dataset"):
        DATASETS.get(kind)  # a plugin declares whether its argument is a path (so it must import)
    if not arg or kind not in DATASETS or not DATASETS.declared(kind).path:
        return spec
    return f"{kind}:{os.path.abspath(os.path.expanduser(arg))}"


def missing_path(spec: str) -> Path | None:
    """The file or folder a path-taking source's spec names, when nothing is there (None when
    something is, or the source takes no path). ``imagefolder:PATH:SIZE`` names PATH."""
    kind, arg = split_spec(spec)
    if not arg or kind not in DATASETS or not DATASETS.declared(kind).path:
        return None
    path = Path(arg)
    if not path.exists() and ":" in path.name:  # a :SIZE-like suffix after the path
        path = Path(arg.rpartition(":")[0])
    return None if path.exists() else path


def dataset_slug(spec: str) -> str:
    """A short, filesystem-safe name for a dataset spec (used in default paths)."""
    kind, arg = split_spec(spec)
    if kind in DATASETS and DATASETS.declared(kind).path:
        arg = Path(arg).stem or Path(arg).name
    text = f"{kind}-{arg}" if arg else kind
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-").lower()
