"""A verb's settings: its config (:mod:`pipeline.config`: types, ranges, absolute paths) with the
values that other modules own checked by their owners, before any work.

The owners: the dataset registry (``dataset=``: the source must exist, and a source that takes
a file gets it absolute; so does a text teacher's model directory, ``teacher=hf:DIR``), the
augmentation policies (``augment=``, ``teacher_augment=``) and the logits modes (``logits=``). They sit below this module and above :mod:`pipeline.config`
(the data package imports its ``DataConfig``), which therefore cannot call them: resolve every
verb's config with :func:`resolve`, which hands :func:`owned` to :func:`pipeline.config.resolve`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, TypeVar

from pipeline import config
from pipeline.data import absolute_spec
from pipeline.sparse import parse_mode

C = TypeVar("C")
POLICY_KEYS = ("teacher_augment", "augment")  # augmentation policies (auto: decided later)


def resolve(cls: type[C], overrides: list[str] | dict[str, Any] = (), verb: str = "",
            params: config.ParamsHook | None = None) -> C:
    """The config of type ``cls`` from defaults, ``config=FILE.yaml`` and ``key=value``
    overrides (:func:`pipeline.config.resolve`), its owned values checked (:func:`owned`);
    ``params`` completes a student run's hyperparameters (pipeline.students.complete). A
    bad value of either kind is one :class:`~pipeline.errors.KdError`."""
    return config.resolve(cls, overrides, verb, owners=owned, params=params)


def owned(cfg: C) -> C:
    """``cfg`` with its dataset spec made absolute, and its policies and logits mode checked by
    the modules that define them."""
    from pipeline import augment  # imports torch: resolving a config may, importing this module not

    changes = {f.name: absolute_spec(getattr(cfg, f.name))
               for f in dataclasses.fields(cfg) if f.metadata.get("dataset")}
    teacher = getattr(cfg, "teacher", "")
    if teacher.startswith("hf:"):  # a model directory made absolute, like any path; a model name
        folder = os.path.expanduser(teacher[3:])  # of the local HF cache stays as it is
        if teacher[3:] and os.path.isdir(folder):
            changes["teacher"] = "hf:" + os.path.abspath(folder)
    cfg = dataclasses.replace(cfg, **changes) if changes else cfg
    for key in POLICY_KEYS:
        spec = getattr(cfg, key, "auto")
        if spec != "auto":
            augment.check(spec, key)
    if hasattr(cfg, "logits"):
        parse_mode(cfg.logits)
    return cfg
