"""The dataset registry, and what a dataset source declares when it registers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline import plugins
from pipeline.config import DataConfig
from pipeline.data.dataset import Dataset
from pipeline.errors import KdError
from pipeline.registry import Registry


@dataclass(frozen=True)
class DatasetNeeds:
    """What a source declares at registration.

    ``path``: the ARG of ``NAME:ARG`` is a filesystem path (with ``:OPTIONS`` after it). Configs
    store it absolute, so a cache built from ``npz:rel.npz`` reopens from any directory, and its
    file name (stem) names default caches.
    """

    path: bool = False


Source = Callable[[str, DataConfig], Dataset]


def _plugin_source(name: str, source: Source) -> Source:
    """A plugin's source, checked: it must return a :class:`Dataset`, which then carries the
    plugin's identity (into its fingerprint)."""
    def open_source(arg: str, cfg: DataConfig) -> Dataset:
        dataset = plugins.call(f"dataset {name}: source({arg!r}, cfg)", source, arg, cfg)
        if not isinstance(dataset, Dataset):
            raise KdError(f"dataset {name} returned a {type(dataset).__name__}, not a "
                          "pipeline.data.Dataset; a dataset plugin is source(arg, cfg) -> Dataset")
        dataset.plugin = plugins.identity("dataset", name)
        return dataset
    return open_source


# A source is ``source(arg, cfg) -> Dataset`` for ``dataset=NAME:ARG``.
DATASETS: Registry[Source] = Registry("dataset", DatasetNeeds, adapt=_plugin_source,
                                       plugins=plugins.Plugins("dataset"))
