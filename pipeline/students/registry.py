"""The student registry: name → ``factory(cfg: StudentConfig) -> Student``, and what each
student declares when it registers."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from pipeline import plugins
from pipeline.config import StudentConfig
from pipeline.errors import KdError
from pipeline.losses import LOSSES
from pipeline.registry import Registry
from pipeline.students.base import Student

KINDS = ("features", "inputs")
DEFAULT_LOSS = "kd"  # students that train with a loss, when loss= is not given
DEFAULT_TARGET = "labels"  # students that fit hard targets, when target= is not given


@dataclass(frozen=True)
class StudentNeeds:
    """What a student declares at registration; runs, sweeps and results rows derive from it.

    - ``kind``: ``features`` (fits cached teacher features; never sees an input) or ``inputs``
      (trains on the dataset's inputs, joined to the cached targets by sample_id).
    - ``loss``: trains with a registered loss (``loss=``; what the loss needs is the loss's
      own declaration, :class:`pipeline.losses.LossNeeds`).
    - ``target``: fits hard targets, the labels or the teacher's argmax (``target=``).
    - ``temperature``: softens the teacher's logits itself (not through a loss).
    """

    kind: str
    loss: bool = False
    target: bool = False
    temperature: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"student kind {self.kind!r} is not one of {KINDS}")


def _plugin_student(name: str, obj: Any) -> Callable[[StudentConfig], Any]:
    """A plugin student: a Student subclass, built with the config values its constructor
    names (``seed=``, ``epochs=``, ``temperature=``, ...), or a ``factory(cfg) -> Student``."""
    def checked(student):
        if not isinstance(student, Student):
            raise KdError(f"student {name} made a {type(student).__name__}, not a "
                          "pipeline.students.Student (the student contract)")
        return student

    if isinstance(obj, type):
        names = [p for p in inspect.signature(obj).parameters if p in StudentConfig.__dataclass_fields__]
        return lambda cfg: checked(plugins.call(f"student {name}: {obj.__name__}(...)", obj,
                                                **{p: getattr(cfg, p) for p in names}))
    return lambda cfg: checked(plugins.call(f"student {name}: factory(cfg)", obj, cfg))


STUDENTS: Registry[Callable[[StudentConfig], Any]] = Registry("student", StudentNeeds,
                                                              adapt=_plugin_student,
                                                              plugins=plugins.Plugins("student"))


@dataclass(frozen=True)
class Uses:
    """What one run of a student reads and records: ``loss`` / ``target`` are names or None
    (the student has no such axis), ``temperature`` whether T applies, ``layer`` whether it
    reads a cached feature, ``logits`` whether it reads the cached logits at all, ``augment``
    the policy of fresh augmentation (None: none); ``loss_weight``, ``standardize_logits`` and
    ``student_layer`` whether those options apply (the loss declares a weight, a temperature,
    a feature)."""

    kind: str
    loss: str | None
    target: str | None
    temperature: bool
    layer: bool
    logits: bool
    augment: str | None = None
    loss_weight: bool = False
    standardize_logits: bool = False
    student_layer: bool = False


def uses(cfg: StudentConfig) -> Uses:
    """What a run of ``cfg.model`` with ``cfg``'s loss uses, from the declarations alone.
    Unknown names and values given for an axis the run does not have are refused."""
    needs = STUDENTS.declared(cfg.model)
    loss = None
    if cfg.loss is not None:
        LOSSES.get(cfg.loss)  # a typo is an error before "does not apply"
    if needs.loss:
        loss = cfg.loss or DEFAULT_LOSS
    elif cfg.loss is not None:
        raise KdError(f"loss={cfg.loss} does not apply: model {cfg.model} trains without a loss; "
                      f"drop loss= or pick a student that takes one ({', '.join(_with('loss'))})")
    if cfg.target is not None and not needs.target:
        raise KdError(f"target={cfg.target} does not apply: model {cfg.model} fits no hard targets; "
                      f"drop target= or pick {', '.join(_with('target'))}")
    loss_needs = LOSSES.declared(loss) if loss else None
    temperature = needs.temperature or bool(loss_needs and loss_needs.temperature)
    if cfg.temperature is not None and not temperature:
        what = f"loss {loss}" if loss else f"model {cfg.model}"
        raise KdError(f"temperature={cfg.temperature:g} does not apply: {what} uses no temperature; "
                      "drop temperature=")
    layer = needs.kind == "features" or bool(loss_needs and loss_needs.features)
    if cfg.layer and not layer:
        raise KdError(f"layer={cfg.layer} does not apply: {f'loss {loss}' if loss else cfg.model} "
                      "reads no cached feature; drop layer=")
    what = f"loss {loss}" if loss else f"model {cfg.model}"
    loss_weight = bool(loss_needs and loss_needs.weight is not None)
    if cfg.loss_weight is not None and not loss_weight:
        raise KdError(f"loss_weight={cfg.loss_weight:g} does not apply: {what} adds no weighted term "
                      f"of its own (kd, mse_logits weigh theirs by alpha); drop loss_weight= or "
                      f"pick {', '.join(n for n in LOSSES if LOSSES.declared(n).weight is not None)}")
    standardize = bool(loss_needs and loss_needs.temperature)
    if cfg.standardize_logits and not standardize:
        raise KdError(f"standardize_logits=true does not apply: {what} softens no logits by a "
                      "temperature; drop it or pick a temperature loss "
                      f"({', '.join(n for n in LOSSES if LOSSES.declared(n).temperature)})")
    student_layer = bool(loss_needs and loss_needs.features)
    if cfg.student_layer and not student_layer:
        raise KdError(f"student_layer={cfg.student_layer} does not apply: {what} reads no "
                      "student feature; drop student_layer=")
    logits = (loss_needs.logits if loss_needs else
              needs.temperature or (needs.target and (cfg.target or DEFAULT_TARGET) == "teacher"))
    augment = None if cfg.augment == "none" else cfg.augment
    if augment is not None:
        if needs.kind != "inputs":
            raise KdError(f"augment={augment} does not apply: model {cfg.model} reads cached features, "
                          "not inputs; cache augmented views instead (kdcache cache views=K "
                          f"augment={augment}) and train with views=all")
        if logits or (loss_needs and loss_needs.features):
            raise KdError(f"augment={augment} does not apply to loss {loss}: it reads the teacher's "
                          "cached outputs, valid only for the inputs the teacher saw; cache augmented "
                          f"views instead (kdcache cache views=K augment={augment}) and train with "
                          "views=all, or use a label-only loss (loss=ce)")
        if cfg.views not in ("all", "1"):
            raise KdError(f"views={cfg.views} with augment={augment}: fresh augmentation trains on "
                          "view 0 of each row; drop views= or augment=")
    return Uses(needs.kind, loss, (cfg.target or DEFAULT_TARGET) if needs.target else None,
                temperature, layer, bool(logits), augment, loss_weight, standardize, student_layer)


def _with(axis: str) -> list[str]:
    return [name for name in STUDENTS if getattr(STUDENTS.declared(name), axis)]


def create_student(name: str, cfg: StudentConfig | None = None, **overrides: Any):
    """An unfitted student ``name`` with its parameters taken from ``cfg`` (default: the
    defaults) and ``overrides`` (StudentConfig keys, e.g. ``C=0.5``)."""
    cfg = dataclasses.replace(cfg or StudentConfig(), model=name, **overrides)
    return STUDENTS.get(name)(cfg)
