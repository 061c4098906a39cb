"""Where things live by default: caches, results, run directories. Every path a config holds
is absolute already (see pipeline.config.path_field), so these are too."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.errors import KdError
from pipeline.storage import Location, check_reachable, is_remote, location


def default_cache_path(cache_root: str, dataset_spec: str, arch: str, teacher_ckpt: str = "",
                       seed: int = 0, views: int = 1, augment: str = "none",
                       logits: str = "dense") -> Location:
    """Where a cache lives when no cache= is given: one name per dataset, teacher, weights,
    views and logits mode (``digits-cnn_small``, ``digits-cnn_small-views16-crop4-flip``,
    ``digits3-resnet_small-topk16``)."""
    from pipeline.data import dataset_slug  # the dataset sources: only for a default path

    name = f"{dataset_slug(dataset_spec)}-{dataset_slug(arch)}"  # timm:resnet18 -> timm-resnet18
    if teacher_ckpt == "random":
        name += f"-random{seed}"
    elif teacher_ckpt:
        name += f"-{Path(teacher_ckpt).stem}"
    if views > 1:
        name += f"-views{views}-" + "".join(c if c.isalnum() or c in "._" else "-" for c in augment.replace(":", ""))
    if logits != "dense":
        name += "-" + logits.replace(":", "")
    return location(cache_root, "cache_root") / name


def cache_path(cfg) -> Location:
    """The cache a verb reads: ``cfg.cache``, or the default cache of ``cfg.dataset`` and
    ``cfg.teacher`` under ``cfg.cache_root`` (a local Path or an object store's UPath)."""
    if cfg.cache:
        return location(cfg.cache)
    # only for a default cache: info, report and export on a given cache= import neither the
    # dataset sources nor torch (the teachers)
    from pipeline.data import open_dataset
    from pipeline.teachers import auto_teacher

    # The dataset's canonical spec names the cache (synthetic:N:8 and synthetic:N:8:10 are one).
    dataset = open_dataset(DataConfig(dataset=cfg.dataset))
    teacher = auto_teacher(dataset.input_shape) if cfg.teacher == "auto" else cfg.teacher
    return default_cache_path(cfg.cache_root, dataset.spec, teacher)


def check_writable(path: Location, key: str) -> None:
    """Refuse a directory that cannot be created or written, without creating anything (on an
    object store: a bucket that does not exist, or credentials that do not work)."""
    if is_remote(path):
        check_reachable(path, key)
        return
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise KdError(f"{key}: cannot create {path}: {existing} is not a directory; pass {key}=DIR")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KdError(f"{key}: cannot write in {existing} (permission denied); pass {key}=DIR")
