"""What every student is trained from: :class:`StudentData`, the one argument of the student
contract (``student.fit_cache(data)``).

It wraps an opened cache and serves its rows the way students read them: cached features (in
memory, or streamed chunk by chunk), cached logits, and the dataset's inputs joined to the
cached rows **by sample_id** (never by position). The train split is streamed in bounded
memory: whole cache chunks, block-shuffled, each chunk's inputs read from the dataset along
with it. Val and test are read block by block on demand (:class:`pipeline.rows.LazyRows`).
The teacher is never loaded.
"""

from __future__ import annotations

from functools import cached_property
from typing import Iterator

import numpy as np
import torch

from pipeline.augment import parse
from pipeline.cache import TeacherCache
from pipeline.cache import format as fmt
from pipeline.cache.chunks import to_float32
from pipeline.data import Dataset, positions_of
from pipeline.errors import KdError
from pipeline.keyed_random import KeyedRandom, key
from pipeline.losses import soft_targets
from pipeline.rows import LazyRows
from pipeline.sparse import check_temperature
from pipeline.training import Batches

FEATURE_BATCH = 1024  # rows per partial_fit call of streamed feature students


def stream_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of epoch ``epoch`` (>= -1) of a run seeded ``seed``."""
    return seed * 100_003 + epoch + 1


class StudentData:
    """An opened cache as a student reads it. ``layer`` is the cached feature the run reads
    (None: the cache's first layer); ``views`` how many of the train split's cached views it
    draws from (views 0..views-1; None: all); ``progress`` shows training progress bars.

    With several views, every epoch each train row uses one view drawn from (seed, epoch,
    sample_id): its cached targets, and its input rebuilt by replaying that view's stored
    augmentation parameters on the original input (:meth:`input_batches`; streamed features,
    :meth:`feature_batches`, the same way). In-memory feature students instead see every
    view's features as rows of their own (:meth:`features`): memory N · views rows.
    """

    def __init__(self, cache: TeacherCache, layer: str | None = None, progress: bool = False,
                 views: int | None = None):
        self.cache = cache
        self.progress = progress
        self.layer = layer or (cache.layers[0] if cache.layers else None)  # None: layers=none
        if self.layer is not None and self.layer not in cache.layers:
            raise KdError(f"cache {cache.root} holds no layer {self.layer!r}; it holds "
                          f"{', '.join(cache.layers)}")
        self.views = cache.views("train") if views is None else int(views)
        if not 1 <= self.views <= cache.views("train"):
            raise KdError(f"views={self.views} is more than cache {cache.root} holds "
                          f"({cache.views('train')}); pass views=all or views=N with N <= "
                          f"{cache.views('train')}")
        self.policy = None
        if self.views > 1:
            self.policy = parse(cache.augment["policy"], tuple(cache.manifest["teacher"]["input_shape"]))

    # ------------------------------------------------------------------ description
    @property
    def num_classes(self) -> int:
        return self.cache.num_classes

    @property
    def modality(self) -> str:
        """What the cache's dataset inputs are: ``array`` (images, signals) or ``text``
        (documents, served as numpy object arrays of ``str``)."""
        return cache_modality(self.cache)

    @property
    def temperature(self) -> float:
        """The cache's default distillation temperature."""
        return self.cache.temperature

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one row's cached feature ``layer`` ((D,) pooled, (C, H, W) a map)."""
        return tuple(self.cache.manifest["layers"][self.layer])

    @property
    def feature_dim(self) -> int:
        """Width of the flattened cached feature ``layer``."""
        return int(np.prod(self.feature_shape))

    def num_rows(self, split: str) -> int:
        return self.cache.num_rows(split)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self.num_rows("train") // batch_size)

    @cached_property
    def dataset(self) -> Dataset:
        """The dataset the cache was built from, reopened and checked against its fingerprint
        (only input students need it)."""
        return self.cache.open_dataset()

    # ------------------------------------------------------------------ whole splits
    def _every_view(self, split: str) -> bool:
        return split == "train" and self.views > 1

    def labels(self, split: str) -> np.ndarray:
        """Labels of ``split``'s rows (train with several views: of every (row, view) row)."""
        labels = self.cache.labels(split)
        return np.repeat(labels, self.views) if self._every_view(split) else labels

    @property
    def sparse(self) -> bool:
        """Whether the cache keeps sparse logits (``logits=topk:K`` / ``sample:K``)."""
        return self.cache.logits_mode.sparse

    def check_targets(self, temperature: float | None, standardize: bool = False) -> None:
        """Refuse, before training, what a sparse cache cannot serve: another temperature than
        its draws' (sample:K), and logit standardisation (it needs every logit)."""
        if not self.sparse:
            return
        mode = self.cache.logits_mode
        if standardize:
            raise KdError(f"standardize_logits=true needs every logit, and cache {self.cache.root} "
                          f"keeps logits={mode.spec}; use a dense cache or standardize_logits=false")
        if temperature is not None:
            check_temperature(mode.kind, float(self.cache.manifest["logits"]["temperature"]), temperature)

    def teacher_logits(self, split: str) -> np.ndarray:
        """Raw cached logits z, float32 [N, C] (train with several views: [N · views, C], row
        r's view v at r · views + v); of a sparse cache, the dense stand-in
        (:meth:`pipeline.sparse.SparseLogits.dense`)."""
        if not self._every_view(split):
            return self.cache.raw_logits(split)
        if self.sparse:
            return self.cache.sparse_logits_every_view(split, self.views).dense()
        return self._every_view_rows(fmt.logits_key(split))

    def sparse_targets(self, split: str, temperature: float) -> dict[str, np.ndarray]:
        """A sparse cache's targets at ``temperature`` (:meth:`SparseLogits.targets`: ``t_ids``,
        ``t_w``, ``t_tail``), rows as :meth:`teacher_logits` orders them."""
        sparse = (self.cache.sparse_logits_every_view(split, self.views) if self._every_view(split)
                  else self.cache.sparse_logits(split))
        return sparse.targets(temperature)

    def features(self, split: str) -> np.ndarray:
        """Flattened cached features of ``layer``, float32 [N, D], in memory (train with several
        views: every view's features as rows, [N · views, D], row r's view v at r · views + v)."""
        if not self._every_view(split):
            return self.cache.features(split, self.layer).reshape(self.num_rows(split), -1)
        return self._every_view_rows(fmt.feature_key(split, self.layer))

    def _every_view_rows(self, key: str) -> np.ndarray:
        """Views 0..views-1 of every row of array ``key`` as float32 rows [N · views, D]."""
        stored = self.cache.stored(key, 0, self.num_rows("train"), views=self.views)
        out = np.empty(stored.shape, np.float32)
        to_float32(out, stored)
        return out.reshape(len(out) * self.views, -1)

    def view_of(self, seed: int, epoch: int):
        """``views(start, stop)``: the view each train row of ``[start, stop)`` uses in this
        epoch, drawn from (seed, epoch, sample_id), or None with one view."""
        if self.views == 1:
            return None
        ids = self.cache.sample_ids("train")
        return lambda a, b: KeyedRandom(key(seed, epoch, ids[a:b])).integers(0, self.views)

    def rows(self, split: str, kind: str) -> LazyRows:
        """What a student of ``kind`` scores on, in cache row order, read block by block:
        flattened cached features, or the inputs joined by sample_id."""
        if kind == "features":
            dim, layer = self.feature_dim, self.layer
            return LazyRows(self.num_rows(split), (dim,), lambda a, b: self.cache.features(
                split, layer, rows=slice(a, b)).reshape(b - a, dim))
        return lazy_inputs(self.dataset, self.cache, split)

    # ------------------------------------------------------------------ streamed train split
    def feature_batches(self, epoch: int, seed: int, logits: bool = False,
                        batch_size: int = FEATURE_BATCH) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """``(features, labels, raw logits or None)`` batches of the train split, block-shuffled
        with a seed per epoch; epoch -1 is one pass in row order (e.g. to fit a scaler)."""
        for b in self.cache.stream("train", batch_size=batch_size, layers=(self.layer,),
                                   logits=logits, shuffle=epoch >= 0, seed=stream_seed(seed, epoch),
                                   view_of=self.view_of(seed, epoch)):
            yield (b.features[self.layer].reshape(len(b.sample_id), -1), b.label,
                   b.sparse.dense() if b.sparse is not None else b.logits)

    def input_batches(self, batch_size: int, seed: int, *, logits: bool = True,
                      features: bool = False, temperature: float | None = None,
                      standardize_logits: bool = False, sparse: bool = False) -> Batches:
        """``batches(epoch)`` yielding ``(inputs, labels, targets)`` of the train split for
        :func:`pipeline.training.fit`: ``targets`` holds ``z_t`` (raw cached logits) when
        ``logits``, the teacher's soft targets ``log_p_t`` = log softmax(z_t / T) and ``p_t``
        at T = ``temperature`` when given (of the standardised logits with
        ``standardize_logits``: :func:`pipeline.losses.soft_targets`), and ``f_t`` (the cached
        feature, in its cached shape) when ``features``. From a sparse-logit cache, with
        ``sparse`` (the loss has a sparse form) and a temperature, ``t_ids``, ``t_w``,
        ``t_tail`` (:meth:`pipeline.sparse.SparseLogits.targets`) in place of ``z_t`` and the
        soft targets; otherwise ``z_t`` is the dense stand-in and the soft targets are of it.
        Cached targets arrive chunk by chunk, and each chunk's inputs are read
        from the dataset by sample_id and shuffled along with them. With several views, each
        row's input is its drawn view: the stored parameters replayed on the original input.
        Augmentation and soft targets are computed once per shuffle buffer, then cut into
        batches."""
        dataset = self.dataset
        positions = positions_of(dataset.splits["train"].sample_ids, self.cache.sample_ids("train"))
        layers = (self.layer,) if features else ()

        def batches(epoch: int):
            for b in self.cache.stream("train", batch_size=batch_size, layers=layers,
                                       logits=logits, seed=stream_seed(seed, epoch),
                                       view_of=self.view_of(seed, epoch), augment=self.views > 1,
                                       extra=lambda a, z: {"x": dataset.inputs_at("train", positions[a:z])},
                                       buffers=True):
                x = b.extra["x"]  # float32 arrays, or documents (str): the student converts them
                if self.policy is not None:
                    x = self.policy.apply(torch.from_numpy(x), torch.from_numpy(b.augment)).numpy()
                targets = {}
                if logits and b.sparse is not None and sparse and temperature is not None:
                    targets = b.sparse.targets(temperature)
                elif logits:
                    # the stand-in is made for the temperature it is softened at (1: raw use);
                    # z_t1, made for T = 1, for terms that read the teacher unsoftened (nkd)
                    z_t = b.sparse.dense(temperature or 1.0) if b.sparse is not None else b.logits
                    targets = {"z_t": z_t}
                    if b.sparse is not None and temperature is not None:
                        targets["z_t1"] = b.sparse.dense(1.0)
                    if temperature is not None:
                        targets.update(soft_targets(z_t, temperature, standardize_logits))
                if features:
                    targets["f_t"] = b.features[self.layer].reshape(len(b.label), *self.feature_shape)
                for a in range(0, len(x), batch_size):
                    yield x[a:a + batch_size], b.label[a:a + batch_size], {
                        k: v[a:a + batch_size] for k, v in targets.items()}

        return batches


def cache_modality(cache: TeacherCache) -> str:
    """The modality of the dataset ``cache`` was built from, as its manifest records it
    (caches of arrays, and those built before text, record none: ``array``)."""
    return cache.manifest["dataset"].get("modality", "array")


def joined_inputs(dataset: Dataset, cache: TeacherCache, split: str) -> np.ndarray:
    """Inputs in cache row order: row r is the sample named by the cache index's sample_id r."""
    positions = positions_of(dataset.splits[split].sample_ids, cache.sample_ids(split))
    return dataset.inputs(split, 0, len(dataset.splits[split]))[positions]


def lazy_inputs(dataset: Dataset, cache: TeacherCache, split: str) -> LazyRows:
    """:func:`joined_inputs`, read block by block on demand (evaluation never holds a split)."""
    positions = positions_of(dataset.splits[split].sample_ids, cache.sample_ids(split))
    # documents are str (numpy object arrays; input_shape ()), never converted to numbers here
    return LazyRows(len(positions), dataset.input_shape,
                    lambda a, b: dataset.inputs_at(split, positions[a:b]),
                    dtype=object if dataset.modality == "text" else np.float32)
