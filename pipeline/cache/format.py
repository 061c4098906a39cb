"""The on-disk layout of a teacher cache (documented for other tools in docs/CACHE_FORMAT.md).

    <cache>/
      manifest.json                     what the cache is; status building | complete
      config.json                       the resolved config that built it
      arrays.zarr/                      Zarr v3 group
        <split>/logits                  [N, V, C]      raw teacher logits (not softened; dense caches)
        <split>/topk/classes            [N, V, K]      logits=topk:K (format 3): the K largest logits'
        <split>/topk/logits             [N, V, K]        class ids, those raw logits (descending) and
        <split>/topk/tail               [N, V, 2]        the rest's log partition function at
                                                         T=1 and at the cache's T (float32)
        <split>/sample/classes          [N, V, K]      logits=sample:K (format 3): K classes drawn from
                                                         softmax(z / T), sorted
        <split>/features/<layer>        [N, V, ...]    tapped activations
        <split>/augment                 [N, V, P]      int16 augmentation parameters of each view
                                                       (format 2, multi-view splits only)
      token caches (format 4: a causal-LM teacher on a token dataset; T = seq_len positions
      take the place of the views axis, and position j holds the teacher's distribution of
      token j + 1):
        <split>/tokens/ids              [N, T]         int32 the window's token ids
        <split>/tokens/mask             [N, T]         uint8 1 where position j has a target
                                                         (j + 1 < T and token j + 1 is real)
        <split>/tokens/segments         [N, T]         int32 document within the window (-1: padding)
        <split>/topk/{classes,logits,tail}  [N, T, K|2]  as above, per position
        <split>/sample/classes          [N, T, K]      as above, per position
        <split>/logits                  [N, T, C]      dense (C <= 4,096 only)
      index/<split>.parquet             one row per sample, in cache row order
      parts/<split>/<shard>.parquet     per-shard index parts (only while building)
      parts/<split>/<shard>.json        per-shard completion records (only while building)

Row r of every array of a split and row r of its index describe the same sample; the index's
``sample_id`` column names it. A text cache's index also has ``tokens`` and ``truncated`` per
row, and its manifest the ``tokenizer`` and the ``tokens`` hashes (token ids are not stored). View v of row r is the teacher's output on the input augmented
with ``augment[r, v]`` (view 0: the input itself). Single-view dense caches are written as format 1,
exactly as before views existed; multi-view dense caches as format 2; sparse-logit caches
(``logits=topk:K`` / ``sample:K``, see pipeline/sparse.py) as format 3. Shards are runs of ``shard_size`` rows; each is written whole,
once, by one task, and recorded done only after its data is on disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.errors import KdError

FORMAT = "kdcache"
FORMAT_VERSION = 4  # the newest this kdcache writes (token caches); it reads 1 to 4
READABLE_VERSIONS = (1, 2, 3, 4)
TOKEN_FORMAT = 4  # token caches: [N, T, ...] arrays, positions in place of views
MANIFEST = "manifest.json"
CONFIG = "config.json"
ARRAYS = "arrays.zarr"
INDEX = "index"
PARTS = "parts"
AUGMENT_DTYPE = "int16"  # augmentation parameters: pixel offsets and boxes, |value| < 32768

INDEX_COLUMNS = ("sample_id", "row", "label", "teacher_pred", "teacher_prob", "margin",
                 "entropy", "correct", "shard")


def logits_key(split: str) -> str:
    return f"{split}/logits"


def feature_key(split: str, layer: str) -> str:
    return f"{split}/features/{layer}"


def sparse_key(split: str, kind: str, part: str) -> str:
    """The array of sparse logits ``part`` (classes | logits | tail) of a ``kind`` (topk |
    sample) cache (a topk:K+sample:M cache has both kinds' arrays)."""
    return f"{split}/{kind}/{part}"


TOKEN_PARTS = {"ids": "int32", "mask": "uint8", "segments": "int32"}  # a token cache's windows


def tokens_key(split: str, part: str) -> str:
    """A token cache's window array ``part`` (ids | mask | segments)."""
    return f"{split}/tokens/{part}"


def is_token_cache(manifest: dict[str, Any]) -> bool:
    """Whether a cache holds per-token outputs of a causal LM (format 4, ``lm`` in the manifest)."""
    return "lm" in manifest


def logits_keys(split: str, manifest: dict[str, Any]) -> list[str]:
    """The arrays that hold a split's logits in this cache, by its logits mode."""
    mode = (manifest.get("logits") or {"mode": "dense"})["mode"]
    if mode == "dense":
        return [logits_key(split)]
    keys = []
    if mode in ("topk", "topk+sample"):
        keys += [sparse_key(split, "topk", part) for part in ("classes", "logits", "tail")]
    if mode in ("sample", "topk+sample"):
        keys.append(sparse_key(split, "sample", "classes"))
    return keys


def sparse_part(key: str, manifest: dict[str, Any]) -> str:
    """The name a reader gives sparse array ``key``: its last part (classes | logits | tail),
    but ``draws`` for a topk:K+sample:M cache's ``sample/classes`` (its classes are the top K)."""
    if manifest["logits"]["mode"] == "topk+sample" and key.endswith("/sample/classes"):
        return "draws"
    return key.rpartition("/")[2]


def sparse_width(key: str, manifest: dict[str, Any]) -> tuple[int]:
    """The per-row-and-view shape of sparse array ``key``: (2,) for the tail, (M,) for a
    topk:K+sample:M cache's draws, else (K,)."""
    entry = manifest["logits"]
    if key.endswith("/tail"):
        return (2,)
    return (int(entry["m"]),) if sparse_part(key, manifest) == "draws" else (int(entry["k"]),)


def array_dtype(key: str, manifest: dict[str, Any]) -> str:
    """The dtype an array of the cache is stored in."""
    if key.endswith("/augment"):
        return AUGMENT_DTYPE
    split, _, rest = key.partition("/")
    if rest.startswith("tokens/"):
        return TOKEN_PARTS[rest.removeprefix("tokens/")]
    if key.endswith("/classes"):
        return manifest["logits"]["classes_dtype"]
    if key.endswith("/topk/tail"):
        return "float32"
    return manifest["dtype"]


def version_for(views: int, sparse: bool = False) -> int:
    """The format a cache is written as: the oldest that holds what it needs (1: one view of
    dense logits, 2: several views, 3: sparse logits)."""
    return 3 if sparse else (1 if views == 1 else 2)


def augment_key(split: str) -> str:
    return f"{split}/augment"


def split_views(manifest: dict[str, Any], split: str) -> int:
    """Views cached per row of ``split`` (format 1: always 1)."""
    return int(manifest["splits"][split].get("views", 1))


def index_path(root: Path, split: str) -> Path:
    return root / INDEX / f"{split}.parquet"


def part_paths(root: Path, split: str, shard: int) -> tuple[Path, Path]:
    base = root / PARTS / split / f"{shard:06d}"
    return base.with_suffix(".parquet"), base.with_suffix(".json")


def shard_progress(root, manifest: dict[str, Any]) -> tuple[int, int]:
    """(shards with a completion record, shards in all) of a cache that is still building."""
    done = sum(1 for name in storage.files(storage.location(root) / PARTS) if name.endswith(".json"))
    return done, sum(s["shards"] for s in manifest["splits"].values())


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace) without its own
    ``checksum`` field. Stored in the manifest, so a hand-edited manifest is refused on open."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(root, manifest: dict[str, Any]) -> None:
    manifest = {**manifest, "checksum": manifest_checksum(manifest)}
    storage.write_text(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(root) -> dict[str, Any]:
    path = storage.location(root) / MANIFEST
    if not path.is_file():
        raise KdError(f"no kdcache cache at {root} ({MANIFEST} missing); build one with "
                      f"`make teacher-cache` or `kdcache cache cache={root}`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KdError(f"{path} is not valid JSON ({exc}); the cache is damaged, rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KdError(f"{path} is not a kdcache manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise KdError(f"{root} has cache format version {manifest.get('format_version')}; this "
                      f"kdcache reads versions {', '.join(map(str, READABLE_VERSIONS[:-1]))} and "
                      f"{READABLE_VERSIONS[-1]}; rebuild "
                      "the cache (or upgrade kdcache)")
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise KdError(f"{path} was modified after kdcache wrote it (its checksum does not match); "
                      "restore the original or rebuild the cache")
    return manifest


def repair_command(root) -> str:
    """The command that recomputes exactly what is damaged in a cache (pipeline.cache.build)."""
    return f"kdcache cache cache={root} repair=true"


def repair_hint(root) -> str:
    """The way out of a shard or an index that fails its checksum, named by every message that
    meets one."""
    return (f"the cache is damaged: `{repair_command(root)}` recomputes what is damaged "
            f"(`kdcache verify cache={root}` lists it)")


def remove_temporaries(root: Path) -> list[Path]:
    """Delete what a killed writer can leave behind: our ``.*.tmp`` files (io.atomic_path),
    Zarr's ``*.partial`` files, and ``.<name>.init-*`` directories beside the cache. Call only
    while holding the build lock: then no live writer owns any of them. (An object store has
    none: every object is written by one PUT, whole or not at all.)"""
    if storage.is_remote(root):
        return []
    root = Path(root)
    stray = [p for p in root.parent.glob(f".{root.name}.init-*")]
    if root.is_dir():
        stray += [p for p in root.rglob("*") if p.is_file() and
                  ((p.name.startswith(".") and p.name.endswith(".tmp")) or p.name.endswith(".partial"))]
    for path in stray:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stray
