"""Where things live by default: caches, results, run directories. Every path a config holds
is absolute already (see pipeline.config.path_field), so these are too."""

from __future__ import annotations

import json
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

    name = f"{dataset_slug(dataset_spec)}-{teacher_slug(arch)}"  # timm:resnet18 -> timm-resnet18
    if teacher_ckpt == "random":
        name += f"-random{seed}"
    elif teacher_ckpt:
        name += f"-{Path(teacher_ckpt).stem}"
    if views > 1:
        name += f"-views{views}-" + "".join(c if c.isalnum() or c in "._" else "-" for c in augment.replace(":", ""))
    if logits != "dense":
        name += "-" + logits.replace(":", "")
    return location(cache_root, "cache_root") / name


def teacher_slug(arch: str) -> str:
    """A short, filesystem-safe name for a teacher: ``timm:resnet18`` -> ``timm-resnet18``; a
    text teacher by its model directory's name, ``hf:/models/all-MiniLM-L6-v2`` ->
    ``hf-all-minilm-l6-v2``."""
    from pipeline.data import dataset_slug

    if arch.startswith("hf:"):
        arch = "hf-" + Path(arch[3:]).name
    return dataset_slug(arch)


# The architectures teacher=auto picks from (pipeline.teachers.auto_teacher, by input rank)
AUTO_TEACHERS = ("mlp", "cnn1d", "cnn_small", "resnet_small")


def cache_path(cfg) -> Location:
    """The cache a verb reads: ``cfg.cache``, or the default cache of ``cfg.dataset`` and
    ``cfg.teacher`` under ``cfg.cache_root`` (a local Path or an object store's UPath).

    The default is found by name, without opening the dataset (which may mean reading every
    file of an image folder): ``<dataset>-<teacher>`` (for ``teacher=auto``, a teacher auto
    picks); for a spec the cache stage wrote in another form (``synthetic:300:8`` is
    ``synthetic:300:8:10``), the cache whose manifest records the spec as given."""
    if cfg.cache:
        return location(cfg.cache)
    # only for a default cache: info, report and export on a given cache= import neither the
    # dataset sources nor the cache package (which imports torch)
    from pipeline.cache.format import MANIFEST
    from pipeline.data import dataset_slug

    root, base = location(cfg.cache_root, "cache_root"), dataset_slug(cfg.dataset)
    archs = AUTO_TEACHERS if cfg.teacher == "auto" else (cfg.teacher,)
    found = [root / f"{base}-{teacher_slug(a)}" for a in archs
             if (root / f"{base}-{teacher_slug(a)}" / MANIFEST).is_file()]
    if not found and root.is_dir():
        for child in sorted(root.iterdir(), key=lambda c: c.name):
            if not child.name.startswith(base + "-") or not (child / MANIFEST).is_file():
                continue
            m = json.loads((child / MANIFEST).read_text())
            arch = m["teacher"]["arch"]
            if (m["dataset"]["config"]["dataset"] == cfg.dataset and arch in archs
                    and child.name == f"{dataset_slug(m['dataset']['spec'])}-{teacher_slug(arch)}"):
                found.append(child)
    if len(found) > 1:
        raise KdError(f"dataset={cfg.dataset} has caches of several teachers under {root} "
                      f"({', '.join(p.name for p in found)}); pass teacher=NAME or cache=PATH")
    if found:
        return found[0]
    if cfg.teacher != "auto":  # (opening it names the command that builds it)
        return default_cache_path(cfg.cache_root, cfg.dataset, cfg.teacher)
    raise KdError(f"no cache of dataset={cfg.dataset} under {root}; build one with `kdcache "
                  f"cache dataset={cfg.dataset}`, or pass cache=PATH")


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
