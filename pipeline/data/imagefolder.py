"""A folder of the user's image files, one subfolder per class."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import decoding
from pipeline.config import DataConfig
from pipeline.data.dataset import Dataset
from pipeline.data.registry import DATASETS
from pipeline.errors import KdError

@dataclass
class ImageFiles:
    """A pool of image files read lazily, resized to a square of ``size`` pixels, decoded on
    ``decoders`` worker processes (1: on the reading thread; see :mod:`pipeline.decoding`)."""

    paths: list[Path]
    labels: np.ndarray
    ids: np.ndarray
    size: int
    decoders: int = 1

    def read(self, positions: np.ndarray) -> np.ndarray:
        try:
            return decoding.decode([str(self.paths[int(p)]) for p in positions], self.size,
                                   self.decoders)
        except decoding.Unreadable as exc:
            raise KdError(f"{exc.path} is not a readable image ({exc.kind}); remove it or replace "
                          "it with a valid image file") from None


MAX_IMAGE_SIZE = 1024  # pixels per side: one float32 RGB image of 1024² is already 12 MB
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@DATASETS.register("imagefolder", path=True)
def imagefolder(arg: str, cfg: DataConfig) -> Dataset:
    """Your own images: ``imagefolder:PATH[:SIZE]`` with ``PATH/{train,test}[,val]/CLASS/*.png``.

    Images are read lazily, converted to RGB and resized to SIZE×SIZE (default 32), on
    ``cfg.decoders`` processes (0 = auto, :func:`pipeline.decoding.auto_decoders` for the
    device of the verb's config, when it has one). sample_id is a 63-bit hash of the file's
    path relative to PATH, so it survives adding other files.
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
    decoders = cfg.decoders or decoding.auto_decoders(getattr(cfg, "device", "auto"))
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
        pools[name] = ImageFiles(paths, np.array(labels, np.int64), ids, size, decoders)
    return Dataset(f"imagefolder:{root}:{size}", pools, (3, size, size), len(classes), cfg)


def _path_id(rel: Path) -> int:
    digest = hashlib.blake2b(rel.as_posix().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


