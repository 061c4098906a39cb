"""A user's arrays in one ``.npz`` file."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.dataset import ArraySource, Dataset
from pipeline.data.registry import DATASETS
from pipeline.errors import KdError

FLOAT32_MAX = float(np.finfo(np.float32).max)  # inputs reach the teacher as float32


@DATASETS.register("npz", path=True)
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


