"""What kdcache trusts and what it writes: caches and run directories hold data formats only
(JSON, Zarr, Parquet, safetensors), never pickle; default paths built from user-supplied specs
stay under the roots the user configured. (Checkpoint loading with weights_only and the refusal
of pickled payloads is tested in test_teachers.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cache import format as fmt
from pipeline.data import dataset_slug
from pipeline.paths import default_cache_path
from stages.cli import main

PICKLE_OR_TORCH_ZIP = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def classify(path: Path) -> str:
    data = path.read_bytes()
    assert not data.startswith(PICKLE_OR_TORCH_ZIP), f"{path} looks like a pickle / torch.save file"
    if path.suffix in (".json", ".jsonl"):
        for line in data.decode().splitlines() if path.suffix == ".jsonl" else [data.decode()]:
            json.loads(line)
        return "json"
    if path.suffix == ".parquet":
        assert data[:4] == b"PAR1" and data[-4:] == b"PAR1", path
        return "parquet"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "np"):
            pass
        return "safetensors"
    assert fmt.ARRAYS in path.parts and "c" in path.parts, f"unexpected file {path}"
    return "zarr chunk"


def test_a_cache_holds_only_data_formats(make_cache):
    root = make_cache()
    kinds = {classify(p) for p in root.rglob("*") if p.is_file()}
    assert kinds == {"json", "parquet", "zarr chunk"}


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_a_student_run_holds_only_data_formats(make_cache, tmp_path, model):
    root = make_cache()
    from conftest import declared

    assert main(["student", f"cache={root}", f"runs_dir={tmp_path / 'runs'}", f"model={model}",
                 *declared(model, epochs=1, C=1)]) == 0
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["config.json", "log.jsonl", "metrics.json",
                                             "student.safetensors"]
    assert {classify(p) for p in files} == {"json", "safetensors"}
    for p in (root.parent / f"{root.name}.results").iterdir():
        assert classify(p) == "parquet"


@pytest.mark.parametrize("spec", ["npz:../../etc/passwd.npz", "npz:/abs/dir/../x.npz",
                                  "imagefolder:../..", "imagefolder:/", "synthetic:100:../..",
                                  "torchvision:../../CIFAR10", "npz:.hidden/..npz"])
def test_default_paths_stay_under_their_roots(tmp_path, spec):
    slug = dataset_slug(spec)
    assert slug and "/" not in slug and slug not in (".", "..")
    root = tmp_path / "caches"
    for ckpt in ("", "random", "../../weights/evil.pt", "/abs/teacher.safetensors"):
        path = default_cache_path(str(root), spec, "cnn_small", ckpt)
        assert path.parent == root and path.name not in (".", ".."), path
        assert path.resolve().is_relative_to(root.resolve())
