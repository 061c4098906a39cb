"""The dataset registry, and what a dataset source declares when it registers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline.config import DataConfig
from pipeline.data.dataset import Dataset
from pipeline.registry import Registry


@dataclass(frozen=True)
class DatasetNeeds:
    """What a source declares at registration.

    ``path``: the ARG of ``NAME:ARG`` is a filesystem path (with ``:OPTIONS`` after it). Configs
    store it absolute, so a cache built from ``npz:rel.npz`` reopens from any directory, and its
    file name (stem) names default caches.
    """

    path: bool = False


# A source is ``source(arg, cfg) -> Dataset`` for ``dataset=NAME:ARG``.
DATASETS: Registry[Callable[[str, DataConfig], Dataset]] = Registry("dataset", DatasetNeeds)
