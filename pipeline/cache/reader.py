"""Reading a finished cache: whole arrays, temperature-softened logits, and a streaming
iterator with block shuffling for training on caches larger than memory.

The cache stores **raw** logits z. Any temperature T is applied at read time:
``logits(split, temperature=T)`` returns z / T and ``probs(split, temperature=T)`` returns
softmax(z / T). A sparse-logit cache (``logits=topk:K`` / ``sample:K``) is read as
:class:`pipeline.sparse.SparseLogits` (``sparse_logits``, ``Batch.sparse``); its dense
readers return the stand-in :meth:`SparseLogits.dense` (fine for small C).

A token cache (a causal-LM teacher over windows of token ids, format 4) is read by
:meth:`TeacherCache.token_batches`: :class:`TokenBatch` es of whole windows, their ids, mask
and segments and the teacher's per-position targets ([B, T, K] arrays), where position j
holds the teacher's distribution of token j + 1.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.cache import format as fmt
from pipeline.cache.chunks import ChunkReader, chunk_reader, to_float32
from pipeline.config import DataConfig, from_record
from pipeline.data import Dataset, missing_path, open_dataset, split_spec
from pipeline.errors import KdError
from pipeline.numerics import softmax
from pipeline.sparse import LogitsMode, SparseLogits, mode_of


@dataclass
class Batch:
    """One streamed batch. Row i of every field describes the sample ``sample_id[i]``."""

    sample_id: np.ndarray  # int64 [B]
    label: np.ndarray  # int64 [B]
    logits: np.ndarray | None  # float32 [B, C], already divided by the temperature
    features: dict[str, np.ndarray]  # float32 [B, ...] per requested layer
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # from stream(extra=...)
    view: np.ndarray | None = None  # int64 [B]: the view each row's values are of (view_of=...)
    augment: np.ndarray | None = None  # int16 [B, P]: that view's augmentation parameters
    sparse: SparseLogits | None = None  # a sparse-logit cache's logits (raw: not softened)


IGNORE = -100  # TokenBatch.next_tokens at positions without a target (torch's ignore_index)


@dataclass
class TokenBatch:
    """Whole windows of a token cache. Row i of every field is window ``sample_id[i]``;
    position j of a window holds the teacher's distribution of token j + 1.

    ``ids`` int64 [B, T] the tokens; ``mask`` bool [B, T] whether position j has a target
    (j + 1 < T and token j + 1 is real); ``segments`` int32 [B, T] the document within the
    window (-1 on padding). The teacher's outputs at every position, raw (not softened):
    ``classes`` int64 [B, T, K] (topk: the K largest logits' ids, descending; sample: K ids
    drawn from softmax(z / T_c), sorted), ``values`` float32 [B, T, K] the top-K raw logits
    and ``tail`` float32 [B, T, 2] the rest's log partition function at T = 1 and T_c (topk
    and topk+sample), ``draws`` int64 [B, T, M] the M draws from the tail (topk+sample only),
    or ``logits`` float32 [B, T, C] (dense only). ``kind`` is the cache's mode,
    ``num_classes`` its vocabulary (``len(tokenizer)``) and ``temperature`` its T_c."""

    sample_id: np.ndarray
    ids: np.ndarray
    mask: np.ndarray
    segments: np.ndarray
    kind: str
    num_classes: int
    temperature: float
    classes: np.ndarray | None = None
    values: np.ndarray | None = None
    tail: np.ndarray | None = None
    logits: np.ndarray | None = None
    draws: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def next_tokens(self) -> np.ndarray:
        """The true next token at every position, int64 [B, T]: ``ids[:, j + 1]`` where
        ``mask`` is set, :data:`IGNORE` (-100) elsewhere."""
        out = np.full(self.ids.shape, IGNORE, np.int64)
        out[:, :-1] = self.ids[:, 1:]
        out[~self.mask] = IGNORE
        return out

    def sparse(self) -> SparseLogits:
        """The teacher's sparse logits of the positions that have a target, as rows of their
        own ([M, K], M = ``mask.sum()``, in row-major order of ``mask``): what
        :meth:`SparseLogits.targets` turns into a distribution over K ids and a tail."""
        return self.targets_at(self.mask)

    def targets_at(self, at: np.ndarray | slice = slice(None)) -> SparseLogits:
        """The teacher's sparse logits at ``at`` (a mask [B, T] gives rows [M, K]; the default,
        every position, keeps the [B, T, K] shape)."""
        if self.kind == "dense":
            raise KdError(f"this token cache holds {self.kind} logits; read TokenBatch.logits")

        def pick(a):
            return None if a is None else a[at]
        return SparseLogits(self.kind, self.classes[at], pick(self.values), pick(self.tail), self.num_classes,
                            self.temperature, pick(self.draws))


class TeacherCache:
    """An opened, complete teacher cache. Use :func:`open_cache` to get one."""

    def __init__(self, root: Path, manifest: dict):
        import zarr

        self.root = root
        self.manifest = manifest
        self._opened: dict[str, object] = {}  # key -> zarr array, checked once on first use
        self._readers: dict[str, ChunkReader | None] = {}
        try:
            self._group = zarr.open_group(storage.zarr_store(root / fmt.ARRAYS, read_only=True), mode="r")
        except Exception as exc:
            raise KdError(f"{root / fmt.ARRAYS} cannot be opened as a Zarr group ({type(exc).__name__}); "
                          "the cache is damaged, rebuild it") from None

    # ------------------------------------------------------------------ description
    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def layers(self) -> list[str]:
        return list(self.manifest["layers"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def logits_mode(self) -> LogitsMode:
        """How the cache keeps its logits: dense, or topk / sample with k classes per row."""
        return mode_of(self.manifest)

    @property
    def temperature(self) -> float:
        """The default distillation temperature recorded when the cache was built."""
        return float(self.manifest["temperature"])

    @property
    def teacher_fingerprint(self) -> str:
        return self.manifest["teacher"]["fingerprint"]

    @property
    def dataset_fingerprint(self) -> str:
        return self.manifest["dataset"]["fingerprint"]

    def open_dataset(self) -> Dataset:
        """The dataset this cache was built from, checked against the cache's fingerprint."""
        config = from_record(DataConfig, self.manifest["dataset"]["config"])
        # The data is read where it was when the cache was built (no dataset= a later verb is
        # given changes that): a source's own "pass dataset=..." advice would not help here.
        missing = missing_path(config.dataset)
        if missing is not None:
            raise KdError(f"cache {self.root} reads its inputs from {config.dataset}, as recorded when "
                          f"it was built, and {missing} is not there any more; move the data back "
                          f"to {missing}, or build a new cache from where it is now (kdcache cache "
                          f"dataset={split_spec(config.dataset)[0]}:NEW_PATH)")
        dataset = open_dataset(config)
        if dataset.fingerprint != self.dataset_fingerprint:
            raise KdError(f"dataset {dataset.spec} on disk differs from the one cache {self.root} was "
                          f"built from (fingerprint {dataset.fingerprint[:12]} != "
                          f"{self.dataset_fingerprint[:12]}); restore the data or rebuild the cache")
        return dataset

    def num_rows(self, split: str) -> int:
        return int(self._split(split)["rows"])

    def views(self, split: str = "train") -> int:
        """Views cached per row of ``split``: view 0 is the input itself; only train has more."""
        self._split(split)
        return fmt.split_views(self.manifest, split)

    @property
    def augment(self) -> dict | None:
        """The views' policy (``policy``, parameter names ``params``, ``seed``, ``rng``), or None
        for a single-view cache."""
        return self.manifest.get("augment")

    def augment_params(self, split: str, rows: slice | None = None) -> np.ndarray:
        """Every view's augmentation parameters, int16 [N, V, P] (a multi-view split only)."""
        if self.views(split) == 1:
            raise KdError(f"cache {self.root} holds one view of {split}; it has no augmentation parameters")
        return self.stored(fmt.augment_key(split), *(
            (rows.start, rows.stop) if rows is not None else (0, self.num_rows(split))))

    def teacher_accuracy(self, split: str) -> float:
        return float(self._split(split)["accuracy"])

    def _split(self, split: str) -> dict:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            raise KdError(f"cache {self.root} has no split {split!r}; it has {', '.join(self.splits)}") from None

    def _array(self, key: str):
        split, _, rest = key.partition("/")
        self._split(split)
        if rest.startswith("features/") and rest[len("features/"):] not in self.manifest["layers"]:
            raise KdError(f"cache {self.root} holds no layer {rest[len('features/'):]!r}; it holds "
                          f"{', '.join(self.layers)}; rebuild the cache with layers=... to add one")
        if key in self._opened:
            return self._opened[key]
        try:
            arr = self._group[key]
        except Exception as exc:  # KeyError, or zarr's errors on damaged metadata
            raise KdError(f"cache array {self.root / fmt.ARRAYS / key} is missing or unreadable "
                          f"({type(exc).__name__}); the cache is damaged, rebuild it") from None
        self._check_array(key, arr)
        self._opened[key] = arr
        return arr

    def _rows(self, key: str, rows: slice | None, view: int | np.ndarray, out: np.ndarray | None = None,
              index: np.ndarray | None = None) -> np.ndarray:
        """Rows of array ``key`` at ``view`` as float32, through the fast chunk reader when the
        array has kdcache's own layout (see chunks.py), else through zarr-python. With ``out``
        they are written there (row i to ``out[index[i]]`` when ``index`` is given)."""
        arr = self._array(key)
        if key not in self._readers:
            # the fast reader reads local shard files itself; an object store goes through zarr
            self._readers[key] = None if storage.is_remote(self.root) else \
                chunk_reader(arr, self.root / fmt.ARRAYS / key)
        reader = self._readers[key]
        rows = rows if rows is not None else slice(0, arr.shape[0])
        if reader is not None:
            return reader.read(rows.start, rows.stop, view, out, index)
        data = _read(arr, rows, view, self.root)
        if out is None:
            return data
        out[index if index is not None else slice(None)] = data
        return out

    def _check_array(self, key: str, arr) -> None:
        """The array's metadata must agree with the manifest, and every shard file must exist:
        Zarr reads a missing shard back as fill values, which would pass for teacher outputs."""
        split = key.partition("/")[0]
        where = self.root / fmt.ARRAYS / key
        dtype = fmt.array_dtype(key, self.manifest)
        if arr.shape[0] != self.num_rows(split) or str(arr.dtype) != dtype:
            raise KdError(f"cache array {where} has {arr.shape[0]} rows of {arr.dtype}, the manifest "
                          f"says {self.num_rows(split)} of {dtype}; the cache is damaged, rebuild it")
        if fmt.is_token_cache(self.manifest):
            seq_len = int(self.manifest["lm"]["seq_len"])
            if arr.ndim < 2 or arr.shape[1] != seq_len:
                raise KdError(f"cache array {where} has windows of {arr.shape[1] if arr.ndim > 1 else 0} "
                              f"positions, the manifest says {seq_len}; the cache is damaged, rebuild it")
        elif arr.ndim < 2 or arr.shape[1] != self.views(split):
            raise KdError(f"cache array {where} has {arr.shape[1] if arr.ndim > 1 else 0} views, the "
                          f"manifest says {self.views(split)}; the cache is damaged, rebuild it")
        expected = -(-self.num_rows(split) // int(self.manifest["shard_size"]))
        found = len(storage.files(where / "c"))
        if found != expected:
            raise KdError(f"cache array {where} has {found} of its {expected} shard files; "
                          f"{fmt.repair_hint(self.root)}")

    # ------------------------------------------------------------------ whole arrays
    def stored(self, key: str, start: int, stop: int, views: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of array ``key`` (e.g. ``train/logits``) exactly as stored,
        in the cache dtype: the bytes the manifest's shard checksums are computed over (with
        ``views``, only views ``0..views-1``)."""
        arr = self._array(key)
        try:
            return np.ascontiguousarray(arr[start:stop, :views])
        except Exception as exc:  # a damaged chunk (CRC mismatch, a truncated shard file, …)
            raise _unreadable(arr, exc, self.root) from None

    def raw_logits(self, split: str, view: int | np.ndarray = 0, rows: slice | None = None) -> np.ndarray:
        """Stored logits z as float32 [N, C], of view ``view`` (or of one view per row); of a
        sparse cache, the dense stand-in :meth:`SparseLogits.dense`."""
        if self.logits_mode.sparse:
            return self.sparse_logits(split, view, rows).dense()
        return self._rows(fmt.logits_key(split), rows, view)

    def sparse_logits(self, split: str, view: int | np.ndarray = 0,
                      rows: slice | None = None) -> SparseLogits:
        """A sparse-logit cache's logits of view ``view`` (or one view per row), as stored."""
        parts = {fmt.sparse_part(key, self.manifest): self._rows(key, rows, view)
                 for key in self._logits_keys(split)}
        return self._sparse(parts)

    def sparse_logits_every_view(self, split: str, views: int) -> SparseLogits:
        """Views 0..views-1 of every row of a sparse cache's ``split`` as rows of their own,
        [N · views, ...] with row r's view v at r · views + v, read in one pass (a chunk holds
        every view of its rows)."""
        n = self.num_rows(split)
        parts = {}
        for key in self._logits_keys(split):
            stored = self.stored(key, 0, n, views=views)
            parts[fmt.sparse_part(key, self.manifest)] = stored.reshape(n * views, *stored.shape[2:]).astype(
                np.float32 if stored.dtype.kind == "f" else stored.dtype)
        return self._sparse(parts)

    def _logits_keys(self, split: str) -> list[str]:
        if not self.logits_mode.sparse:
            raise KdError(f"cache {self.root} holds dense logits; read them with raw_logits")
        return fmt.logits_keys(split, self.manifest)

    def _sparse(self, parts: dict[str, np.ndarray]) -> SparseLogits:
        mode = self.logits_mode
        draws = parts.get("draws")
        return SparseLogits(mode.kind, parts["classes"].astype(np.int64), parts.get("logits"),
                            parts.get("tail"), self.num_classes, float(self.manifest["logits"]["temperature"]),
                            None if draws is None else draws.astype(np.int64))

    def logits(self, split: str, temperature: float = 1.0, view: int = 0) -> np.ndarray:
        """Softened logits z / T at T = ``temperature``, float32 [N, C] (of a sparse cache: of
        the stand-in made for that T, :meth:`SparseLogits.dense`)."""
        _check_temperature(temperature)
        if self.logits_mode.sparse:
            sparse = self.sparse_logits(split, view)
            sparse.check_temperature(temperature)
            return sparse.dense(temperature) / np.float32(temperature)
        return self.raw_logits(split, view) / np.float32(temperature)

    def probs(self, split: str, temperature: float = 1.0, view: int = 0) -> np.ndarray:
        """softmax(z / T) at T = ``temperature``, float32 [N, C]."""
        return softmax(self.logits(split, temperature, view))

    def features(self, split: str, layer: str, view: int | np.ndarray = 0,
                 rows: slice | None = None) -> np.ndarray:
        """Tapped activations of ``layer``, float32 [N, ...] (or just ``rows``), of view ``view``
        (or of one view per row)."""
        return self._rows(fmt.feature_key(split, layer), rows, view)

    def index(self, split: str) -> pa.Table:
        """The per-sample index (sample_id, row, label, teacher_pred, …) in cache row order."""
        expected = self._split(split).get("index_sha256")
        path = fmt.index_path(self.root, split)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KdError(f"index {path} cannot be read ({exc.strerror or type(exc).__name__}); "
                          f"{fmt.repair_hint(self.root)}") from None
        # The index maps rows to sample_ids: a truncated or edited one must never be used.
        if hashlib.sha256(data).hexdigest() != expected:
            raise KdError(f"index {path} does not match its checksum in {fmt.MANIFEST} (truncated or "
                          f"edited); {fmt.repair_hint(self.root)}")
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (OSError, pa.ArrowInvalid) as exc:
            raise KdError(f"index {path} cannot be read ({str(exc).splitlines()[0][:100]}); the cache "
                          "is damaged, rebuild it") from None
        if table.num_rows != self.num_rows(split):
            raise KdError(f"index {path} has {table.num_rows} rows, the manifest says "
                          f"{self.num_rows(split)}; the cache is damaged, rebuild it")
        return table

    @cached_property
    def _ids_labels(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for split in self.splits:
            t = self.index(split).select(["sample_id", "label"])
            out[split] = (t.column("sample_id").to_numpy(), t.column("label").to_numpy().astype(np.int64))
        return out

    def sample_ids(self, split: str) -> np.ndarray:
        return self._ids_labels[split][0]

    def labels(self, split: str) -> np.ndarray:
        return self._ids_labels[split][1]

    # ------------------------------------------------------------------ token caches
    @property
    def lm(self) -> dict:
        """A token cache's ``lm`` entry: ``tokenizer`` (its record), ``vocab_size``
        (``len(tokenizer)``), ``outputs`` (the teacher's output layer, padded vocabularies
        included), ``seq_len`` and ``pack``."""
        if not fmt.is_token_cache(self.manifest):
            raise KdError(f"cache {self.root} holds one output per sample, not per token; a "
                          "language-model student needs a token cache (a causal-LM teacher=hf:DIR "
                          "on dataset=tokens:PATH)")
        return self.manifest["lm"]

    def token_batches(self, split: str, batch_size: int = 16, *, shuffle: bool = True, seed: int = 0,
                      buffer_chunks: int = 4, rows: slice | None = None) -> Iterator[TokenBatch]:
        """Whole windows of a token cache's ``split`` in batches (:class:`TokenBatch`), in
        bounded memory: whole chunks are read, and with ``shuffle`` the chunk order is permuted
        and windows are shuffled within a buffer of ``buffer_chunks`` chunks (at least one
        batch). ``rows`` restricts the read to those cache rows, in order."""
        lm = self.lm
        n = self.num_rows(split)
        start, stop = (0, n) if rows is None else (rows.start or 0, n if rows.stop is None else rows.stop)
        chunk = int(self.manifest["chunk_size"])
        mode = self.logits_mode
        keys = {part: fmt.tokens_key(split, part) for part in fmt.TOKEN_PARTS}
        if mode.sparse:  # classes, values (the top-K logits), tail, draws (topk+sample's tail draws)
            keys.update({fmt.sparse_part(key, self.manifest).replace("logits", "values"): key
                         for key in fmt.logits_keys(split, self.manifest)})
        else:
            keys["logits"] = fmt.logits_key(split)
        ids = self.sample_ids(split)
        rng = np.random.default_rng(seed)
        starts = np.arange(start - start % chunk, stop, chunk)
        if shuffle:
            rng.shuffle(starts)
        group = max(1, buffer_chunks, -(-batch_size // chunk))
        carry: dict[str, np.ndarray] = {}
        temperature = float(self.manifest["logits"].get("temperature", self.temperature))

        def make(buf: dict[str, np.ndarray]) -> TokenBatch:
            def f32(name):
                return buf[name].astype(np.float32) if name in buf else None
            return TokenBatch(buf["sample_id"], buf["ids"].astype(np.int64), buf["mask"].astype(bool),
                              buf["segments"], mode.kind, self.num_classes, temperature,
                              buf["classes"].astype(np.int64) if "classes" in buf else None,
                              f32("values"), f32("tail"), f32("logits"),
                              buf["draws"].astype(np.int64) if "draws" in buf else None)

        for g in range(0, len(starts), group):
            spans = [(int(max(a, start)), int(min(stop, a + chunk))) for a in starts[g:g + group]]
            parts = {name: [self.stored(key, a, b) for a, b in spans] for name, key in keys.items()}
            buf = {name: np.concatenate(([carry[name]] if carry else []) + values)
                   for name, values in parts.items()}
            buf["sample_id"] = np.concatenate(([carry["sample_id"]] if carry else []) +
                                              [ids[a:b] for a, b in spans])
            if shuffle:
                order = rng.permutation(len(buf["sample_id"]))
                buf = {k: v[order] for k, v in buf.items()}
            size = len(buf["sample_id"])
            full = size - size % batch_size
            for a in range(0, full, batch_size):
                yield make({k: v[a:a + batch_size] for k, v in buf.items()})
            carry = {k: v[full:] for k, v in buf.items()} if full < size else {}
        if carry:
            yield make(carry)

    # ------------------------------------------------------------------ streaming
    def stream(self, split: str, batch_size: int = 256, *, temperature: float = 1.0,
               layers: tuple[str, ...] = (), shuffle: bool = True, seed: int = 0,
               buffer_chunks: int = 8, logits: bool = True, view: int = 0,
               view_of: Callable[[int, int], np.ndarray] | None = None, augment: bool = False,
               extra: Callable[[int, int], dict[str, np.ndarray]] | None = None,
               buffers: bool = False) -> Iterator[Batch]:
        """Yield batches in bounded memory, reading whole chunks only.

        With ``shuffle``, chunk order is permuted and rows are shuffled inside a buffer of
        ``buffer_chunks`` chunks, or enough chunks for one batch if that is more (the block
        shuffling of webdataset / mosaicml-streaming):
        random single-row reads would be ~100x slower.

        ``extra(start, stop)``, if given, returns more arrays for cache rows ``[start, stop)``
        (e.g. the inputs of those samples); they are shuffled along and arrive in
        ``Batch.extra``, so whatever is attached stays joined to its sample_id.

        ``view_of(start, stop)``, if given, names the view of each of the cache rows
        ``[start, stop)`` to read (instead of ``view`` for all): the batch's logits, features
        and, with ``augment``, the view's augmentation parameters (``Batch.augment``) are those
        of that view, and ``Batch.view`` says which, so a row's values are always of one
        (sample_id, view) pair.

        With ``buffers``, each filled buffer comes as one Batch of a whole number of
        ``batch_size`` rows (the last one: the rest), already shuffled, for callers that
        transform many rows at once before cutting them into batches (per-op costs paid once
        per buffer, not once per batch).
        """
        _check_temperature(temperature)
        n = self.num_rows(split)
        chunk = int(self.manifest["chunk_size"])
        keys = {}
        if logits and self.logits_mode.sparse:
            keys = {f"__sparse_{fmt.sparse_part(key, self.manifest)}__": key for key in self._logits_keys(split)}
        elif logits:
            keys = {"__logits__": fmt.logits_key(split)}
        keys.update({name: fmt.feature_key(split, name) for name in layers})
        if augment:
            keys["__augment__"] = fmt.augment_key(split)
        shapes = {name: tuple(self._array(key).shape[2:]) for name, key in keys.items()}
        dtypes = {name: self._array(key).dtype for name, key in keys.items()}
        ids, labels = self.sample_ids(split), self.labels(split)
        rng = np.random.default_rng(seed)
        starts = np.arange(0, n, chunk)
        if shuffle:
            rng.shuffle(starts)
        group = max(1, buffer_chunks, -(-batch_size // chunk))  # a buffer holds at least one batch
        carry: dict[str, np.ndarray] = {}
        for g in range(0, len(starts), group):
            spans = [(int(a), int(min(n, a + chunk))) for a in starts[g:g + group]]
            held = len(next(iter(carry.values()))) if carry else 0
            size = held + sum(b - a for a, b in spans)
            # Every row of the buffer gets a random destination: decoding a chunk scatters its
            # rows there in the stored dtype, the filled buffer is cast to float32 in one pass,
            # and each batch is then a contiguous slice of it, not another copy.
            dest = rng.permutation(size) if shuffle else np.arange(size)
            stored = {name: np.empty((size,) + shapes[name], dtypes[name]) for name in keys}
            buf = {}

            def put(name: str, where: np.ndarray, values: np.ndarray) -> None:
                if name not in buf:
                    buf[name] = np.empty((size,) + values.shape[1:], values.dtype)
                buf[name][where] = values

            for name, values in carry.items():
                if name in stored:  # float32 back to the stored dtype: exact, they came from it
                    stored[name][dest[:held]] = values
                else:
                    put(name, dest[:held], values)
            at = held
            for a, b in spans:
                where = dest[at:at + b - a]
                views = view
                if view_of is not None:
                    views = np.asarray(view_of(a, b), np.int64)
                    put("__view__", where, views)
                for name, key in keys.items():
                    self._rows(key, slice(a, b), views, out=stored[name], index=where)
                put("sample_id", where, ids[a:b])
                put("label", where, labels[a:b])
                if extra is not None:
                    for k, v in extra(a, b).items():
                        put(f"extra:{k}", where, v)
                at += b - a
            for name, values in stored.items():
                if values.dtype == np.float32 or values.dtype.kind != "f":  # integers stay as stored
                    buf[name] = values
                else:
                    buf[name] = np.empty(values.shape, np.float32)
                    to_float32(buf[name], values)
            full = size - size % batch_size
            step = full if buffers else batch_size
            for a in range(0, full, max(1, step)):
                yield self._batch({k: v[a:a + step] for k, v in buf.items()}, temperature, layers)
            carry = {k: v[full:] for k, v in buf.items()} if full < size else {}
        if carry:
            yield self._batch(carry, temperature, layers)

    def _batch(self, buf: dict, temperature: float, layers) -> Batch:
        """A Batch from freshly gathered (owned) arrays; dense logits are softened in place,
        sparse ones come raw (their temperature is applied by SparseLogits.targets)."""
        logits = buf.get("__logits__")
        if logits is not None and temperature != 1.0:
            logits /= np.float32(temperature)
        parts = {k[len("__sparse_"):-2]: v for k, v in buf.items() if k.startswith("__sparse_")}
        return Batch(buf["sample_id"], buf["label"], logits,
                     {name: buf[name] for name in layers},
                     {k[len("extra:"):]: v for k, v in buf.items() if k.startswith("extra:")},
                     buf.get("__view__"), buf.get("__augment__"), self._sparse(parts) if parts else None)


def _read(arr, rows: slice | None, view: int | np.ndarray, root) -> np.ndarray:
    dtype = np.float32 if np.dtype(arr.dtype).kind == "f" else arr.dtype
    try:
        if np.ndim(view) > 0:  # one view per row
            block = np.asarray(arr[rows if rows is not None else slice(None)])
            return np.asarray(block[np.arange(len(block)), view], dtype=dtype)
        return np.asarray(arr[(rows if rows is not None else slice(None), view)], dtype=dtype)
    except Exception as exc:  # zarr raises assorted errors on a damaged chunk (CRC mismatch, …)
        raise _unreadable(arr, exc, root) from None


def _unreadable(arr, exc: Exception, root) -> KdError:
    """The one-line error of a damaged array read: which array, zarr's reason, and the repair."""
    store = arr.store_path.store
    where = Path(store.root) / arr.path if hasattr(store, "root") else f"{store.path}/{arr.path}"
    return KdError(f"cache array {where} cannot be read ({type(exc).__name__}: "
                   f"{str(exc).splitlines()[0][:100] if str(exc) else ''}); {fmt.repair_hint(root)}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise KdError(f"temperature={temperature} must be > 0")


def open_cache(path) -> TeacherCache:
    """Open a complete cache for reading (a local folder, a Path, a URL or a UPath); refuse
    incomplete or foreign directories."""
    root = storage.location(path)
    manifest = fmt.read_manifest(root)
    if manifest.get("status") != "complete":
        done, total = fmt.shard_progress(root, manifest)
        raise KdError(f"cache {root} is incomplete ({done}/{total} shards; its build was "
                      f"interrupted); finish it with `kdcache cache cache={root}` and the same settings")
    return TeacherCache(root, manifest)
