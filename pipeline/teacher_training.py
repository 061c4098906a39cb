"""Training the teacher of a dataset (``kdcache teacher``, and the first ``kdcache cache`` of a
dataset that has none): augmentation by ``teacher_augment`` (default: a shift of ±1), the best
validation epoch kept, test scored once, saved as ``model.safetensors`` + ``config.json`` + ``metrics.json`` under
``<teacher_dir>/<dataset>/<arch>/``."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from pipeline import runtime, training
from pipeline.augment import Policy, parse
from pipeline.config import TeacherConfig, save_config
from pipeline.data import Dataset, dataset_slug
from pipeline.io import atomic_write_text, fsync_dir
from pipeline.teachers import auto_teacher, create_teacher, pretrained_state


def teacher_arch(cfg: TeacherConfig, dataset: Dataset) -> str:
    """The architecture ``cfg.teacher`` names (``auto``: picked by the input's rank)."""
    return auto_teacher(dataset.input_shape) if cfg.teacher == "auto" else cfg.teacher


def teacher_dir(cfg: TeacherConfig, dataset: Dataset) -> Path:
    """Where the trained default teacher of this dataset and architecture lives."""
    return Path(cfg.teacher_dir) / dataset_slug(dataset.spec) / dataset_slug(teacher_arch(cfg, dataset))


def teacher_policy(cfg: TeacherConfig, dataset: Dataset) -> Policy | None:
    """``teacher_augment``; ``auto`` is a shift of ±1 for inputs with a channel axis (signals
    (C, L), images (C, H, W)) and none for flat rows, which may be tabular features."""
    spec = cfg.teacher_augment
    if spec == "auto":
        spec = "shift:1" if len(dataset.input_shape) >= 2 else "none"
    return parse(spec, dataset.input_shape, key="teacher_augment")


def default_checkpoint(cfg: TeacherConfig, dataset: Dataset) -> Path:
    return teacher_dir(cfg, dataset) / "model.safetensors"


def train_teacher(cfg: TeacherConfig, dataset: Dataset, progress: bool = True) -> dict:
    """Train, score once on test, and save the teacher atomically. Returns its metrics."""
    with runtime.torch_threads(cfg.threads):  # here: torch runs in this thread
        return _train_teacher(cfg, dataset, progress)


def _train_teacher(cfg: TeacherConfig, dataset: Dataset, progress: bool) -> dict:
    arch = teacher_arch(cfg, dataset)
    device = runtime.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = create_teacher(arch, dataset.input_shape, dataset.num_classes)
    if cfg.pretrained:
        state = pretrained_state(arch, dataset.input_shape, dataset.num_classes)
        own = model.state_dict()
        # the classifier head rarely matches num_classes; keep every tensor that fits
        model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape},
                              strict=False)

    # Teacher training holds train and val in memory; caching (stage one) is what streams.
    x = {s: dataset.inputs(s, 0, len(dataset.splits[s])) for s in ("train", "val", "test")}
    y = {s: dataset.splits[s].labels for s in ("train", "val", "test")}
    ce = nn.CrossEntropyLoss()
    batches = training.array_batches(x["train"], y["train"], cfg.batch_size, cfg.seed)
    result = training.fit(model, batches, -(-len(y["train"]) // cfg.batch_size), x["val"], y["val"],
                          lambda out, labels, targets: ce(out, labels),
                          epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          seed=cfg.seed, device=device,
                          augment=teacher_policy(cfg, dataset), progress=progress,
                          desc=f"teacher {arch}")
    test_logits = training.predict_logits(model, x["test"], device)
    test_acc = float((test_logits.argmax(1) == y["test"]).mean())  # scored once
    metrics = {"arch": arch, "dataset": dataset.spec, "params": sum(p.numel() for p in model.parameters()),
               "best_epoch": result.best_epoch, "val_accuracy": result.best_val_accuracy,
               "test_accuracy": test_acc, "fit_seconds": round(result.seconds, 2),
               "history": result.history}

    out = teacher_dir(cfg, dataset)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        save_config(cfg, tmp / "config.json")
        atomic_write_text(tmp / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**{k: v for k, v in metrics.items() if k != "history"},
            "checkpoint": str(out / "model.safetensors")}
