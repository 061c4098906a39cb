"""Summarise a cache: what it holds, from which teacher and data, and how complete it is.

    kdcache info cache=data/caches/digits-cnn_small [--json]
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cache import format as fmt
from pipeline.config import InfoConfig, resolve
from stages.cache import default_cache_path, describe, summarise


def cache_path(cfg) -> Path:
    """The cache a verb works on: ``cache=`` or the default one of dataset/teacher."""
    if cfg.cache:
        return Path(cfg.cache)
    from pipeline.config import DataConfig
    from pipeline.data import open_dataset
    from pipeline.teachers import auto_teacher

    # The dataset's canonical spec names the cache (synthetic:N:8 and synthetic:N:8:10 are one).
    dataset = open_dataset(DataConfig(dataset=cfg.dataset))
    teacher = auto_teacher(dataset.input_shape) if cfg.teacher == "auto" else cfg.teacher
    return default_cache_path(cfg.cache_root, dataset.spec, teacher)


def main(args: list[str]) -> dict:
    cfg = resolve(InfoConfig, args, verb="info")
    root = cache_path(cfg)
    manifest = fmt.read_manifest(root)
    summary = summarise(root, manifest)
    if manifest["status"] != "complete":
        summary["shards_done"] = "{}/{}".format(*fmt.shard_progress(root, manifest))
    print(describe(summary))
    if "shards_done" in summary:
        print(f"incomplete: {summary['shards_done']} shards done; re-run `kdcache cache` with the same settings")
    return summary
