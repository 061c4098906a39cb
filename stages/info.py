"""Summarise a cache: what it holds, from which teacher and data, and how complete it is.

    kdcache info cache=data/caches/digits-cnn_small [--json]
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cache import format as fmt
from pipeline.config import InfoConfig, resolve
from pipeline.data import dataset_slug
from stages.cache import describe, summarise


def cache_path(cfg) -> Path:
    """The cache a verb works on: ``cache=`` or the default one of dataset/teacher."""
    if cfg.cache:
        return Path(cfg.cache)
    from pipeline.config import DataConfig
    from pipeline.data import open_dataset
    from pipeline.teachers import auto_teacher

    teacher = cfg.teacher
    if teacher == "auto":
        teacher = auto_teacher(open_dataset(DataConfig(dataset=cfg.dataset)).input_shape)
    return Path(cfg.cache_root) / f"{dataset_slug(cfg.dataset)}-{teacher}"


def main(args: list[str]) -> dict:
    cfg = resolve(InfoConfig, args, verb="info")
    root = cache_path(cfg)
    manifest = fmt.read_manifest(root)
    summary = summarise(root, manifest)
    if manifest["status"] != "complete":
        done = len(list((root / fmt.PARTS).glob("*/*.json")))
        total = sum(v["shards"] for v in manifest["splits"].values())
        summary["shards_done"] = f"{done}/{total}"
    print(describe(summary))
    if "shards_done" in summary:
        print(f"incomplete: {summary['shards_done']} shards done; re-run `kdcache cache` with the same settings")
    return summary
