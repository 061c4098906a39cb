"""Summarise a cache: what it holds, from which teacher and data, and how complete it is.

    kdcache info cache=data/caches/digits-cnn_small [--json]
"""

from __future__ import annotations

from pipeline.cache import format as fmt
from pipeline.cache.summary import describe, summarise
from pipeline.config import InfoConfig
from pipeline.paths import cache_path
from pipeline.settings import resolve


def main(args: list[str]) -> dict:
    cfg = resolve(InfoConfig, args, verb="info")
    root = cache_path(cfg)
    summary = summarise(root, fmt.read_manifest(root))
    print(describe(summary))
    return summary
