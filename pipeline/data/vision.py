"""torchvision's classic image datasets, read from ``data_root``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.dataset import ArraySource, Dataset
from pipeline.data.registry import DATASETS
from pipeline.errors import KdError

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


