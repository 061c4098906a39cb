"""Stage one: run the teacher once over a dataset into a versioned, sharded cache.

    kdcache cache dataset=digits                        # trains the default teacher if needed
    kdcache cache dataset=npz:my.npz teacher=cnn1d teacher_ckpt=teacher.pt t=4
    kdcache cache scheduler=tcp://host:8786             # shards run on a dask cluster

An interrupted build resumes where it stopped when re-run with the same arguments.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import runtime
from pipeline.cache.build import build_cache
from pipeline.cache.plan import plan, probe, resolve_layout
from pipeline.config import CacheConfig, resolve
from pipeline.data import dataset_slug, open_dataset
from pipeline.errors import KdError
from pipeline.teachers import (Tapped, TeacherSpec, build_teacher, create_teacher, default_layers,
                               state_fingerprint)
from stages.teacher import teacher_arch, teacher_dir, train_teacher


def default_cache_path(cache_root: str, dataset_spec: str, arch: str, teacher_ckpt: str = "",
                       seed: int = 0) -> Path:
    """Where a cache lives when no cache= is given: one name per dataset, teacher and weights."""
    name = f"{dataset_slug(dataset_spec)}-{arch}"
    if teacher_ckpt == "random":
        name += f"-random{seed}"
    elif teacher_ckpt:
        name += f"-{Path(teacher_ckpt).stem}"
    return Path(cache_root) / name


def main(args: list[str]) -> dict:
    cfg = resolve(CacheConfig, args, verb="cache")
    dataset = open_dataset(cfg)
    cfg = resolve_layout(cfg, dataset)  # chunk_size=0 (auto) made concrete, saved as such
    arch = teacher_arch(cfg, dataset)

    create_teacher(arch, dataset.input_shape, dataset.num_classes)  # fail fast if it cannot fit

    # 1. Which weights: the user's checkpoint, seeded random ones, or the trained default.
    ckpt = cfg.teacher_ckpt
    if not ckpt:
        ckpt = str(teacher_dir(cfg, dataset) / "model.safetensors")
        if not Path(ckpt).is_file():
            print(f"no trained {arch} teacher for {dataset.spec} yet; training one first")
            train_teacher(cfg, dataset)

    # 2. Build it once here (on the CPU) to fingerprint it and learn the tapped layers' shapes.
    device = runtime.pick_device(cfg.device)
    spec = TeacherSpec(arch, dataset.input_shape, dataset.num_classes, ckpt, cfg.seed,
                       device=str(device), compile=cfg.compile, pool=cfg.pool)
    model = build_teacher(spec)
    layers = cfg.layers or default_layers(model)
    tapped = Tapped(model, layers, cfg.pool, arch)
    shapes, finite = probe(tapped, dataset)
    if not finite:
        raise KdError(f"teacher {arch} produced NaN/inf outputs on the first training rows; check "
                      f"the checkpoint {ckpt} and the inputs")
    if shapes["logits"] != (dataset.num_classes,):
        raise KdError(f"teacher {arch} outputs {shapes['logits']} logits but {dataset.spec} has "
                      f"{dataset.num_classes} classes; use a checkpoint trained on this dataset")
    spec = TeacherSpec(arch, dataset.input_shape, dataset.num_classes, ckpt, cfg.seed,
                       layers=tuple(layers), pool=cfg.pool, device=str(device), compile=cfg.compile,
                       fingerprint=state_fingerprint(model, arch, dataset.input_shape, dataset.num_classes))
    manifest = plan(cfg, dataset, spec, shapes, sum(p.numel() for p in model.parameters()))
    del model, tapped  # workers load their own copy

    # 3. Compute the shards that are not done yet (all of them, on a fresh cache).
    root = Path(cfg.cache) if cfg.cache else default_cache_path(
        cfg.cache_root, dataset.spec, arch, cfg.teacher_ckpt, cfg.seed)
    manifest, run = build_cache(root, cfg, dataset, spec, manifest)

    # 4. Summarise.
    summary = summarise(root, manifest)
    summary.update(computed_rows=run["computed_rows"], skipped=run["skipped"],
                   samples_per_s=round(run["computed_rows"] / run["seconds"], 1) if run["seconds"] else None,
                   seconds=round(run["seconds"], 2))
    print(describe(summary))
    if run["skipped"]:
        print("(cache was already complete: nothing recomputed)")
    else:
        print(f"computed {run['computed_rows']:,} rows in {run['seconds']:.1f}s "
              f"({summary['samples_per_s']:,.0f} samples/s)")
    return summary


def summarise(root: Path, manifest: dict) -> dict:
    splits = manifest["splits"]
    return {
        "cache": str(root), "status": manifest["status"],
        "dataset": manifest["dataset"]["spec"], "teacher": manifest["teacher"]["arch"],
        "teacher_fingerprint": manifest["teacher"]["fingerprint"][:16],
        "dataset_fingerprint": manifest["dataset"]["fingerprint"][:16],
        "rows": {s: v["rows"] for s, v in splits.items()},
        "teacher_accuracy": {s: v.get("accuracy") for s, v in splits.items()},
        "layers": manifest["layers"], "num_classes": manifest["num_classes"],
        "temperature": manifest["temperature"], "dtype": manifest["dtype"],
        "bytes": manifest.get("bytes") or sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
    }


def describe(s: dict) -> str:
    rows = ", ".join(f"{k} {v:,}" for k, v in s["rows"].items())
    acc = ", ".join(f"{k} {v:.4f}" for k, v in s["teacher_accuracy"].items() if v is not None) or "n/a"
    layers = ", ".join(f"{k} {tuple(v)}" for k, v in s["layers"].items())
    return "\n".join([
        f"cache      {s['cache']} ({s['status']})",
        f"dataset    {s['dataset']}  [{s['dataset_fingerprint']}]",
        f"teacher    {s['teacher']}  [{s['teacher_fingerprint']}]",
        f"rows       {rows}",
        f"accuracy   teacher: {acc}",
        f"stored     logits ({s['num_classes']},), features {layers}; {s['dtype']}, default T={s['temperature']}",
        f"on disk    {s['bytes'] / 1e6:.2f} MB",
    ])
