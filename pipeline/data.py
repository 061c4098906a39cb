"""Dataset sources: every dataset becomes ``(sample_id, x, y)`` rows in train / val / test splits.

A source provides raw rows in *pools* (the splits the data ships with). :class:`Dataset` turns
pools into the three cached splits (carving a stratified, seeded validation split from train
when the data has none), computes normalisation statistics on train only, and fingerprints the
inputs exactly as the teacher will see them.

``sample_id`` is an int64 that names a sample for good: the same file and spec always give the
same ids, independent of split carving or batch order. Students join cached teacher outputs to
inputs by it, never by position.
"""

from __future__ import annotations

import hashlib
import threading
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from pipeline.config import DataConfig
from pipeline.errors import KdError
from pipeline.registry import Registry

SPLITS = ("train", "val", "test")
BLOCK = 4096  # rows per read when streaming over a whole split (stats, fingerprints)
MAX_SEED = 2**32 - 1  # the seed reaches scikit-learn's splitter, which takes 32-bit seeds
FLOAT32_MAX = float(np.finfo(np.float32).max)  # inputs reach the teacher as float32


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
    """A dataset ready for the teacher: three splits of normalised float32 inputs."""

    def __init__(self, spec: str, pools: dict[str, RowSource], sample_shape: tuple[int, ...],
                 num_classes: int, cfg: DataConfig, *, normalise: bool = True,
                 fixed_fingerprint: str | None = None, notes: dict | None = None):
        self.spec = spec
        self.cfg = cfg
        self.pools = pools
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.num_classes = int(num_classes)
        self.notes = notes or {}
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
                "val_from": self.splits["val"].pool, **self.notes}

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the split definition, the labels, the preprocessing and every raw input
        byte in cache order (or, for generated data, the generator's spec and version)."""
        h = hashlib.sha256()
        h.update(repr((self.spec, self.sample_shape, self.num_classes)).encode())
        h.update(repr(sorted(self.preprocessing.items())).encode())
        for name, split in self.splits.items():
            h.update(name.encode())
            h.update(np.ascontiguousarray(split.sample_ids, np.int64).tobytes())
            h.update(np.ascontiguousarray(split.labels, np.int64).tobytes())
            if self._fixed_fingerprint is None:
                for start, stop in self.blocks(name):
                    h.update(np.ascontiguousarray(self.raw(name, start, stop)).tobytes())
        if self._fixed_fingerprint is not None:
            h.update(self._fixed_fingerprint.encode())
        return h.hexdigest()


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
        keep, carved = train_test_split(positions, test_size=fraction, random_state=seed)
    return np.sort(keep), np.sort(carved)


# =========================================================================== the registry

DATASETS: Registry[Callable[[str, DataConfig], Dataset]] = Registry("dataset")


def open_dataset(cfg: DataConfig) -> Dataset:
    """Open ``cfg.dataset`` (``NAME`` or ``NAME:ARG``) through the dataset registry."""
    kind, _, arg = cfg.dataset.partition(":")
    source = DATASETS.get(kind)
    if not 0 <= cfg.seed <= MAX_SEED:
        raise KdError(f"seed={cfg.seed} must be in 0..{MAX_SEED}")
    return source(arg, cfg)


def dataset_slug(spec: str) -> str:
    """A short, filesystem-safe name for a dataset spec (used in default paths)."""
    kind, _, arg = spec.partition(":")
    if kind in ("npz", "imagefolder"):
        arg = Path(arg).stem or Path(arg).name
    text = f"{kind}-{arg}" if arg else kind
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-").lower()


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


@DATASETS.register("npz")
def npz(arg: str, cfg: DataConfig) -> Dataset:
    """A user's ``.npz`` with ``x_train, y_train, x_test, y_test`` (optionally ``x_val, y_val``).

    ``x``: (N, D) rows, (N, L) signals, (N, H, W) or (N, C, H, W) images, any real dtype.
    ``y``: integer labels 0..K-1. sample_id = position in the file's train, then val, then
    test arrays (train ids first).
    """
    path = Path(arg)
    if not arg:
        raise KdError("dataset npz needs a path: dataset=npz:PATH.npz")
    _check_file(path, "npz file", "dataset=npz:PATH")
    arrays = _read_npz(path)
    pool_names = ["train", "val", "test"] if "x_val" in arrays or "y_val" in arrays else ["train", "test"]
    for name in pool_names:
        for key in (f"x_{name}", f"y_{name}"):
            if key not in arrays:
                raise KdError(f"{path} has no array {key!r}; it needs x_train, y_train, x_test, "
                              f"y_test (and optionally x_val with y_val)")
    sample_shape = None
    pools, offset, max_label = {}, 0, -1
    for name in pool_names:
        x, y = arrays[f"x_{name}"], arrays[f"y_{name}"]
        if x.dtype.kind not in "biuf" or x.dtype.kind == "b":
            raise KdError(f"{path}: x_{name} has dtype {x.dtype}; it must be a real numeric array")
        if x.ndim not in (2, 3, 4):
            raise KdError(f"{path}: x_{name} has shape {x.shape}; expected (N, D), (N, H, W) "
                          "or (N, C, H, W)")
        if y.ndim != 1 or len(y) != len(x):
            raise KdError(f"{path}: y_{name} has shape {y.shape}; expected ({len(x)},) to match "
                          f"x_{name}")
        if y.dtype.kind not in "iu":
            raise KdError(f"{path}: y_{name} has dtype {y.dtype}; labels must be integers 0..K-1")
        if len(x) == 0:
            raise KdError(f"{path}: x_{name} is empty")
        if 0 in x.shape[1:]:
            raise KdError(f"{path}: x_{name} has shape {x.shape}; a sample needs at least one value")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
            raise KdError(f"{path}: x_{name} has {bad} rows with NaN or inf; clean them first")
        if x.dtype.kind == "f" and x.dtype.itemsize > 4 and np.abs(x).max() > FLOAT32_MAX:
            raise KdError(f"{path}: x_{name} holds values up to {float(np.abs(x).max()):.3g}, beyond "
                          "float32 (the teacher's input type); rescale them first")
        if y.min() < 0:
            raise KdError(f"{path}: y_{name} has negative labels; labels must be 0..K-1")
        shape = x.shape[1:] if x.ndim != 3 else (1,) + x.shape[1:]
        if sample_shape is not None and shape != sample_shape:
            raise KdError(f"{path}: x_{name} rows have shape {x.shape[1:]} but x_train rows "
                          f"have {sample_shape}")
        sample_shape = shape
        max_label = max(max_label, int(y.max()))
        ids = np.arange(offset, offset + len(y), dtype=np.int64)
        offset += len(y)
        pools[name] = ArraySource(x.reshape((len(x),) + shape), y.astype(np.int64), ids)
    num_classes = max_label + 1
    if num_classes < 2:
        raise KdError(f"{path}: labels hold a single class; a classifier needs at least 2")
    train_classes = np.unique(pools["train"].labels)
    if len(train_classes) < num_classes:
        # the first few absent classes, without materialising range(num_classes): a stray label
        # of 10**12 must give this message, not a MemoryError
        present = set(train_classes.tolist())
        missing = []
        for k in range(num_classes):
            if k not in present:
                missing.append(k)
                if len(missing) == 5:
                    break
        raise KdError(f"{path}: labels must be 0..{num_classes - 1} and each must occur in "
                      f"y_train; missing from y_train: {missing}")
    return Dataset(f"npz:{path}", pools, sample_shape, num_classes, cfg)


def _check_file(path: Path, what: str, how: str) -> None:
    try:
        if path.is_file():
            return
        exists = path.exists()
    except OSError as exc:  # e.g. a name too long for the filesystem
        raise KdError(f"{what} {path} cannot be opened ({exc.strerror or type(exc).__name__}); "
                      f"pass {how} to an existing file") from None
    if exists:
        raise KdError(f"{what} {path} is not a file; pass {how} to an existing file")
    raise KdError(f"{what} {path} does not exist; pass {how} to an existing file")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz archive, never unpickling anything."""
    try:
        f = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error, NotImplementedError) as exc:
        raise KdError(f"{path} is not a readable .npz archive ({type(exc).__name__}); "
                      "save it with numpy.savez") from None
    if not isinstance(f, np.lib.npyio.NpzFile):  # a single .npy array saved under a .npz name
        raise KdError(f"{path} holds a single .npy array, not an .npz archive of named arrays; "
                      "save it with numpy.savez(path, x_train=..., y_train=..., ...)")
    arrays = {}
    with f:
        for key in f.files:
            try:
                arrays[key] = f[key]
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise KdError(f"{path}: array {key!r} holds Python objects, which kdcache never "
                                  "unpickles; save numeric arrays (x: numbers, y: integers)") from None
                raise KdError(f"{path}: array {key!r} cannot be read ({str(exc)[:80]}); save it "
                              "with numpy.savez") from None
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as exc:
                raise KdError(f"{path}: array {key!r} cannot be read ({type(exc).__name__}); the "
                              "archive is damaged, save it again with numpy.savez") from None
    return arrays


TORCHVISION_DATASETS = ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST", "SVHN")


@DATASETS.register("torchvision")
def torchvision_dataset(arg: str, cfg: DataConfig) -> Dataset:
    """A torchvision dataset from ``data_root`` (``download=true`` fetches it, with internet).

    sample_id = index in the official train set, then len(train) + index in the test set.
    """
    if arg not in TORCHVISION_DATASETS:
        raise KdError(f"unknown torchvision dataset {arg!r}; known: {', '.join(TORCHVISION_DATASETS)}")
    import torchvision.datasets as tvd

    cls = getattr(tvd, arg)
    root = Path(cfg.data_root)
    pools, offset = {}, 0
    for name in ("train", "test"):
        kwargs = {"split": name} if arg == "SVHN" else {"train": name == "train"}
        try:
            ds = cls(str(root), download=cfg.download, **kwargs)
        except RuntimeError as exc:
            raise KdError(f"torchvision dataset {arg} not found under {root} ({exc}); pass "
                          "download=true with internet access, or data_root=DIR where it lives") from None
        x = np.asarray(ds.data)
        y = np.asarray(getattr(ds, "targets", None) if hasattr(ds, "targets") else ds.labels,
                       dtype=np.int64)
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3):  # HWC → CHW
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        ids = np.arange(offset, offset + len(y), dtype=np.int64)
        offset += len(y)
        pools[name] = ArraySource(x, y, ids)
    k = int(max(p.labels.max() for p in pools.values())) + 1
    return Dataset(f"torchvision:{arg}", pools, pools["train"].x.shape[1:], k, cfg)


@dataclass
class ImageFiles:
    """A pool of image files read lazily, resized to a square of ``size`` pixels."""

    paths: list[Path]
    labels: np.ndarray
    ids: np.ndarray
    size: int

    def read(self, positions: np.ndarray) -> np.ndarray:
        from PIL import Image

        out = np.empty((len(positions), 3, self.size, self.size), np.float32)
        for i, p in enumerate(positions):
            path = self.paths[int(p)]
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
                    out[i] = np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0
            except Exception as exc:  # PIL raises assorted errors on a damaged or foreign file
                raise KdError(f"{path} is not a readable image ({type(exc).__name__}); remove it "
                              "or replace it with a valid image file") from None
        return out


MAX_IMAGE_SIZE = 1024  # pixels per side: one float32 RGB image of 1024² is already 12 MB
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@DATASETS.register("imagefolder")
def imagefolder(arg: str, cfg: DataConfig) -> Dataset:
    """Your own images: ``imagefolder:PATH[:SIZE]`` with ``PATH/{train,test}[,val]/CLASS/*.png``.

    Images are read lazily, converted to RGB and resized to SIZE×SIZE (default 32). sample_id is
    a 63-bit hash of the file's path relative to PATH, so it survives adding other files.
    """
    root_text, _, size_text = arg.partition(":")
    root = Path(root_text)
    if not root_text:
        raise KdError("dataset imagefolder needs a path: dataset=imagefolder:PATH[:SIZE]")
    try:
        size = int(size_text) if size_text else 32
    except ValueError:
        raise KdError(f"imagefolder size {size_text!r} is not an integer; write imagefolder:PATH:32") from None
    if not 1 <= size <= MAX_IMAGE_SIZE:
        raise KdError(f"imagefolder size {size} must be in 1..{MAX_IMAGE_SIZE} pixels; write "
                      "imagefolder:PATH:32")
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise KdError(f"{root} must hold train/ and test/ folders of class subfolders "
                      "(optionally val/ too)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if len(classes) < 2:
        raise KdError(f"{root}/train must hold at least two class folders")
    pools = {}
    for name in ("train", "val", "test"):
        if not (root / name).is_dir():
            continue
        # a class the teacher never trains on would be silently dropped: refuse it instead
        foreign = sorted(p.name for p in (root / name).iterdir() if p.is_dir() and p.name not in classes)
        if foreign:
            raise KdError(f"{root}/{name} has class folders that {root}/train lacks: "
                          f"{', '.join(foreign[:3])}{'…' if len(foreign) > 3 else ''}; add them to "
                          "train/ or remove them")
        paths, labels = [], []
        for k, cls in enumerate(classes):
            for p in sorted((root / name / cls).glob("*")):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(p)
                    labels.append(k)
        names = f"{', '.join(classes[:3])}{'…' if len(classes) > 3 else ''}"
        if not paths:
            raise KdError(f"{root}/{name} holds no images (*{', *'.join(sorted(IMAGE_SUFFIXES))}) "
                          f"in its class folders {names}")
        present = set(labels)
        if name == "train" and len(present) < len(classes):
            empty = [c for k, c in enumerate(classes) if k not in present]
            raise KdError(f"{root}/train/{empty[0]} holds no images; every class needs training "
                          "images (remove the folder or add images)")
        ids = np.array([_path_id(p.relative_to(root)) for p in paths], dtype=np.int64)
        pools[name] = ImageFiles(paths, np.array(labels, np.int64), ids, size)
    return Dataset(f"imagefolder:{root}:{size}", pools, (3, size, size), len(classes), cfg)


def _path_id(rel: Path) -> int:
    digest = hashlib.blake2b(rel.as_posix().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


SYNTHETIC_VERSION = 1
SYNTHETIC_BLOCK = 1024
SYNTHETIC_CACHE_BYTES = 64 << 20  # generated blocks kept per pool (at least one)


@dataclass
class SyntheticPool:
    """Rows generated on demand from (seed, block): never holds N inputs in memory."""

    start: int
    stop: int
    shape: tuple[int, ...]
    classes: int
    seed: int
    # Readers ask for batches smaller than a block (e.g. 256 of 1024 rows, in order): without
    # this, every batch would regenerate its whole block. A few recent blocks, bounded in bytes.
    _blocks: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @cached_property
    def ids(self) -> np.ndarray:
        return np.arange(self.start, self.stop, dtype=np.int64)

    @cached_property
    def labels(self) -> np.ndarray:
        first, last = self.start // SYNTHETIC_BLOCK, (self.stop - 1) // SYNTHETIC_BLOCK
        y = np.concatenate([self._block_labels(b) for b in range(first, last + 1)])
        return y[self.start - first * SYNTHETIC_BLOCK: self.stop - first * SYNTHETIC_BLOCK]

    def _block_labels(self, b: int) -> np.ndarray:
        return np.random.default_rng([self.seed, b, 1]).integers(0, self.classes, SYNTHETIC_BLOCK)

    @cached_property
    def _prototypes(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 2**31])
        return (0.35 * rng.standard_normal((self.classes,) + self.shape)).astype(np.float32)

    def _block(self, b: int) -> np.ndarray:
        """All rows of block ``b``: noise from its own seed plus its rows' class prototypes."""
        with self._lock:
            if b in self._blocks:
                self._blocks.move_to_end(b)
                return self._blocks[b]
        x = np.random.default_rng([self.seed, b, 0]).standard_normal(
            (SYNTHETIC_BLOCK,) + self.shape, dtype=np.float32)
        x += self._prototypes[self._block_labels(b)]
        with self._lock:
            self._blocks[b] = x
            while len(self._blocks) > max(1, SYNTHETIC_CACHE_BYTES // x.nbytes):
                self._blocks.popitem(last=False)
        return x

    def read(self, positions: np.ndarray) -> np.ndarray:
        ids = self.start + np.asarray(positions, np.int64)
        out = np.empty((len(ids),) + self.shape, np.float32)
        blocks = ids // SYNTHETIC_BLOCK
        for b in np.unique(blocks):
            mask = blocks == b
            out[mask] = self._block(int(b))[ids[mask] - b * SYNTHETIC_BLOCK]
        return out


@DATASETS.register("synthetic")
def synthetic(arg: str, cfg: DataConfig) -> Dataset:
    """``synthetic:N:SHAPE[:CLASSES]``, e.g. ``synthetic:100000:3x32x32:10``: class prototypes
    plus Gaussian noise, generated block by block from ``seed``. Rows 0-80% are train, 80-90%
    val, 90-100% test; sample_id = row. For tests and benchmarks."""
    parts = arg.split(":")
    try:
        n = int(parts[0])
        shape = tuple(int(s) for s in parts[1].lower().split("x"))
        classes = int(parts[2]) if len(parts) > 2 else 10
        if len(parts) > 3 or n < 30 or classes < 2 or min(shape) < 1 or len(shape) > 3:
            raise ValueError
    except (ValueError, IndexError):
        raise KdError(f"dataset synthetic:{arg} is malformed; write synthetic:N:SHAPE[:CLASSES] "
                      "with N >= 30, e.g. synthetic:10000:3x32x32:10") from None
    cut1, cut2 = int(n * 0.8), int(n * 0.9)
    pools = {name: SyntheticPool(a, b, shape, classes, cfg.seed)
             for name, (a, b) in {"train": (0, cut1), "val": (cut1, cut2), "test": (cut2, n)}.items()}
    spec = f"synthetic:{n}:{'x'.join(map(str, shape))}:{classes}"
    fixed = f"synthetic-v{SYNTHETIC_VERSION}-seed{cfg.seed}"
    return Dataset(spec, pools, shape, classes, cfg, normalise=False, fixed_fingerprint=fixed,
                   notes={"generator_version": SYNTHETIC_VERSION})


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
