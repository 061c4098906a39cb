"""Stage zero: train the teacher for a dataset.

    kdcache teacher dataset=digits teacher=cnn_small epochs=40
    kdcache teacher dataset=tokens:corpus.txt epochs=5   # a tokenizer and a small causal LM

Trains with light shift augmentation, keeps the epoch with the best validation accuracy,
scores the test split once, and saves ``model.safetensors``, ``config.json`` and
``metrics.json`` under ``data/teachers/<dataset>/<teacher>-<key>/`` (the key: the data's
fingerprint and the training settings, see pipeline.teacher_training). Prints a line per epoch,
checkpoints every epoch, and resumes from the last finished one when re-run after Ctrl-C.

On a token dataset with teacher=auto it trains a byte-level BPE tokenizer and a small causal
LM instead (pipeline.lm_teacher), saved as a Hugging Face model directory that teacher=hf:DIR
loads.
"""

from __future__ import annotations

from pipeline.config import TeacherConfig
from pipeline.data import split_spec
from pipeline.errors import KdError

from pipeline.data import open_dataset
from pipeline.lm_teacher import train_lm_teacher, wants_lm_teacher
from pipeline.settings import resolve
from pipeline.teacher_training import train_teacher


def main(args: list[str]) -> dict:
    cfg = resolve(TeacherConfig, args, verb="teacher")
    if wants_lm_teacher(cfg):  # the data's tokenizer is trained with the teacher
        summary = train_lm_teacher(cfg)
        print(f"teacher {summary['arch']} on {summary['dataset']}: val ppl "
              f"{summary['val_perplexity']:.2f}, test ppl {summary['test_perplexity']:.2f} "
              f"(uniform {summary['uniform_perplexity']:.0f}; {summary['params']:,} params, "
              f"{summary['fit_seconds']:.1f}s)\nsaved {summary['checkpoint']} (use it as "
              f"teacher=hf:{summary['checkpoint']})")
        return summary
    if split_spec(cfg.dataset)[0] == "tokens":
        raise KdError(f"`kdcache teacher` on a token dataset trains a language model of its own "
                      f"(teacher=auto); teacher={cfg.teacher} is one already: pass it to kdcache "
                      "cache, or drop teacher=")
    dataset = open_dataset(cfg)
    summary = train_teacher(cfg, dataset)
    print(f"teacher {summary['arch']} on {summary['dataset']}: val {summary['val_accuracy']:.4f}, "
          f"test {summary['test_accuracy']:.4f} ({summary['params']:,} params, "
          f"{summary['fit_seconds']:.1f}s)\nsaved {summary['checkpoint']}")
    return summary
