"""Stage zero: train the teacher for a dataset.

    kdcache teacher dataset=digits teacher=cnn_small epochs=40

Trains with light shift augmentation, keeps the epoch with the best validation accuracy,
scores the test split once, and saves ``model.safetensors``, ``config.json`` and
``metrics.json`` under ``data/teachers/<dataset>/<teacher>-<key>/`` (the key: the data's
fingerprint and the training settings, see pipeline.teacher_training). Prints a line per epoch,
checkpoints every epoch, and resumes from the last finished one when re-run after Ctrl-C.
"""

from __future__ import annotations

from pipeline.config import TeacherConfig

from pipeline.data import open_dataset
from pipeline.settings import resolve
from pipeline.teacher_training import train_teacher


def main(args: list[str]) -> dict:
    cfg = resolve(TeacherConfig, args, verb="teacher")
    dataset = open_dataset(cfg)
    summary = train_teacher(cfg, dataset)
    print(f"teacher {summary['arch']} on {summary['dataset']}: val {summary['val_accuracy']:.4f}, "
          f"test {summary['test_accuracy']:.4f} ({summary['params']:,} params, "
          f"{summary['fit_seconds']:.1f}s)\nsaved {summary['checkpoint']}")
    return summary
