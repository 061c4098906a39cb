"""The student registry, and every hyperparameter of a run, declared once.

An entry is a :class:`~pipeline.students.Student` class (or a ``functools.partial`` of one that
fixes its architecture and sets its defaults): its constructor's arguments *are* the student's
hyperparameters — their names, types and defaults. A loss's hyperparameters are those it
registered (:func:`pipeline.losses.loss_params`). From these two declarations alone come the
keys ``kdcache student`` and ``kdcache sweep`` take, their checks, the run's saved config, the
results table's columns and the leaderboard's experiment key: adding an argument to a student
or a parameter to a loss adds it everywhere, with nothing else to edit.

A plugin may also register a ``factory(cfg) -> Student``; it then declares no hyperparameters
of its own (it reads the run keys of ``cfg``).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from pipeline import plugins
from pipeline.augment import check as check_policy
from pipeline.config import Param, Params, StudentConfig, declared_param, from_record
from pipeline.errors import KdError
from pipeline.losses import LOSSES, classification_losses, loss_params, token_form
from pipeline.registry import Registry
from pipeline.students.base import Student

KINDS = ("features", "inputs")
MODALITIES = ("array", "text", "tokens")  # what a dataset's inputs are (pipeline.data.Dataset.modality)
EXPORT_FORMATS = ("onnx", "skops", "hf")
DEFAULT_LOSS = "kd"  # students that train with a loss, when loss= is not given
DEFAULT_TARGET = "labels"  # students that fit hard targets, when target= is not given
# Constructor arguments a run supplies from its own keys, not hyperparameters: the seed and
# device of the run, the loss's name and the loss's parameters (declared by the loss)
RUN_ARGUMENTS = ("seed", "device", "loss", "loss_params")


@dataclass(frozen=True)
class StudentNeeds:
    """What a student declares at registration; its hyperparameters are its constructor's.

    - ``kind``: ``features`` (fits cached teacher features; never sees an input) or ``inputs``
      (trains on the dataset's inputs, joined to the cached targets by sample_id).
    - ``loss``: trains with a registered loss (``loss=``; what the loss needs is the loss's
      own declaration, :class:`pipeline.losses.LossNeeds`).
    - ``modality``: an ``inputs`` student's inputs: ``array`` (images, signals: float32
      arrays) or ``text`` (documents, ``str``). A run on a cache of another kind of data is
      refused up front (:func:`check_modality`). Feature students read cached features, which
      every cache holds whatever its data: they declare nothing here.
    - ``export``: the format ``kdcache export`` writes (``onnx``, ``skops``, or ``hf``: a Hugging
      Face model directory, for a language model with ``to_transformers``); None: ``onnx`` for
      an ``inputs`` student, ``skops`` for a ``features`` one.

    A constructor argument ``target`` means the student fits targets of the teacher's or the
    labels (the values it takes are the class's ``choices["target"]``: ``labels`` or
    ``teacher``, its argmax; ``soft``, its softmax at T); ``temperature``, that it softens the
    teacher's logits itself (with a ``target``: only ``target=soft`` does).
    """

    kind: str
    loss: bool = False
    modality: str | None = None
    export: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"student kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "features" and self.modality is not None:
            raise ValueError("a features student reads cached features, whatever the data: "
                             "it declares no modality")
        if self.kind == "inputs":  # (frozen: the defaults are filled in through object's setattr)
            object.__setattr__(self, "modality", self.modality or "array")
        if self.modality not in (None, *MODALITIES):
            raise ValueError(f"student modality {self.modality!r} is not one of {MODALITIES}")
        object.__setattr__(self, "export", self.export or ("onnx" if self.kind == "inputs" else "skops"))
        if self.export not in EXPORT_FORMATS:
            raise ValueError(f"student export format {self.export!r} is not one of {EXPORT_FORMATS}")


def _plugin_student(name: str, obj: Any) -> Any:
    """A plugin student: a Student subclass (its constructor declares its hyperparameters) or
    a ``factory(cfg) -> Student``. Its exceptions become one line naming it."""
    def checked(student):
        if not isinstance(student, Student):
            raise KdError(f"student {name} made a {type(student).__name__}, not a "
                          "pipeline.students.Student (the student contract)")
        return student

    if isinstance(obj, type):
        def make(**kwargs):
            return checked(plugins.call(f"student {name}: {obj.__name__}(...)", obj, **kwargs))
        make.__signature__ = inspect.signature(obj)
        make.student_class = obj
        return make
    factory = lambda cfg: checked(plugins.call(f"student {name}: factory(cfg)", obj, cfg))  # noqa: E731
    factory.from_config = True
    return factory


STUDENTS: Registry[Callable[..., Any]] = Registry("student", StudentNeeds, adapt=_plugin_student,
                                                  plugins=plugins.Plugins("student"))


def _student_class(entry: Any) -> type | None:
    while isinstance(entry, partial):
        entry = entry.func
    return entry if isinstance(entry, type) else getattr(entry, "student_class", None)


def _from_config(entry: Any) -> bool:
    """Whether an entry is a ``factory(cfg)`` (it declares no hyperparameters)."""
    return getattr(entry, "from_config", False) or (
        _student_class(entry) is None and not isinstance(entry, partial))


def student_params(model: str) -> dict[str, Param]:
    """The hyperparameters student ``model`` declares: its constructor's arguments, less the
    ones that name its entry (``fixed_params``) and the ones the run supplies."""
    entry = STUDENTS.get(model)
    if _from_config(entry):
        return {}
    cls = _student_class(entry)
    hints = typing.get_type_hints(cls.__init__) if cls is not None else {}
    fixed = getattr(cls, "fixed_params", ())
    out = {}
    for p in inspect.signature(entry).parameters.values():
        if p.name in fixed or p.name in RUN_ARGUMENTS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise KdError(f"student {model}: constructor argument {p.name!r} has no default; "
                          "every argument of a student needs one (scikit-learn's convention)")
        annotation = hints.get(p.name) or (type(p.default) if p.default is not None else str | None)
        out[p.name] = declared_param(p.name, annotation, p.default)
    return out


def run_loss(model: str, loss: str | None) -> str | None:
    """The loss a run of ``model`` trains with: ``loss`` or the default for students that take
    one; None for students that take none (``loss=`` given to one is refused)."""
    if loss is not None:
        LOSSES.get(loss)  # a typo is an error before "does not apply"
    if STUDENTS.declared(model).loss:
        return loss or DEFAULT_LOSS
    if loss is not None:
        raise KdError(f"loss={loss} does not apply: model {model} trains without a loss; "
                      f"drop loss= or pick a student that takes one ({', '.join(_with_loss())})")
    return None


def hyperparameters(model: str, loss: str | None) -> dict[str, Param]:
    """Every hyperparameter of a run of ``model`` with ``loss`` (the student's and the loss's)."""
    out = student_params(model)
    if loss is not None:
        out.update(loss_params(loss))
    return out


def complete(cfg: StudentConfig, given: dict[str, Any]) -> StudentConfig:
    """``cfg`` with its loss decided and every hyperparameter of its student and loss set:
    the values ``given`` (text or YAML values, checked and converted) and the declared
    defaults for the rest. A key neither declares is refused in one line. This is the
    ``complete`` hook of :func:`pipeline.config.resolve` for student runs."""
    loss = run_loss(cfg.model, cfg.loss)
    declared = hyperparameters(cfg.model, loss)
    values = {}
    for key, raw in given.items():
        if key not in declared:
            raise KdError(not_applicable(key, raw, cfg.model, loss, declared))
        values[key] = declared[key].coerce(raw)
    params = Params({k: values.get(k, p.default) for k, p in declared.items()})
    cfg = dataclasses.replace(cfg, loss=loss, params=params)
    uses(cfg)  # the checks across keys (augment with a teacher loss, layer=, ...), up front
    return cfg


def not_applicable(key: str, value: Any, model: str, loss: str | None,
                   declared: dict[str, Param]) -> str:
    """The one line for a key that the run's student and loss do not declare."""
    what = f"model {model}" + (f" with loss {loss}" if loss else "")
    takes = f"{what} takes: {', '.join(sorted(declared)) or 'no hyperparameters'}"
    models = [m for m in STUDENTS if key in _safe_params(m)]
    losses = [name for name in LOSSES if key in loss_params(name)]
    if not models and not losses:
        return (f"unknown key {key!r} for `kdcache student`; run keys: "
                f"{', '.join(f.name for f in dataclasses.fields(StudentConfig) if f.name != 'params')}; "
                f"{takes}")
    where = ", ".join([*(f"model {m}" for m in models), *(f"loss {name}" for name in losses)])
    return f"{key}={value} does not apply: {what} takes no {key} (it does: {where}); drop {key}= ({takes})"


def _safe_params(model: str) -> dict[str, Param]:
    try:
        return student_params(model)
    except KdError:  # a broken plugin's entry must not hide the message about another key
        return {}


@dataclass(frozen=True)
class Uses:
    """What one run reads and records, from its declarations and its resolved config:
    ``loss`` / ``target`` are names or None (the student has no such axis), ``temperature``
    whether T applies, ``layer`` whether it reads a cached feature, ``logits`` whether it reads
    the cached logits at all, ``augment`` the policy of fresh augmentation (None: none)."""

    kind: str
    loss: str | None
    target: str | None
    temperature: bool
    layer: bool
    logits: bool
    augment: str | None = None


def uses(cfg: StudentConfig) -> Uses:
    """What a run of ``cfg`` (completed by :func:`complete`) uses; values given for what it
    does not use (a layer, augmentation with a teacher's loss) are refused."""
    needs = STUDENTS.declared(cfg.model)
    loss = cfg.loss
    loss_needs = LOSSES.declared(loss) if loss else None
    cls = _student_class(STUDENTS.get(cfg.model))
    for name, allowed in getattr(cls, "choices", Student.choices).items():
        if name in cfg.params and cfg.param(name) not in allowed:
            raise KdError(f"{name}={cfg.param(name)!r} must be {_alternatives(allowed)}")
    target = cfg.param("target")
    # with a target, the teacher's logits are softened only for soft targets
    temperature = "temperature" in cfg.params and target in (None, "soft")
    if target not in (None, "soft") and cfg.param("temperature") is not None:
        raise KdError(f"temperature={cfg.param('temperature'):g} does not apply with target={target}: "
                      "only target=soft softens the teacher's logits; drop temperature= or pass "
                      "target=soft")
    if loss_needs is not None and loss_needs.tokens_only and needs.modality != "tokens":
        raise KdError(f"loss={loss} trains a language model from a token cache; model {cfg.model} "
                      f"is not one: use model=lm on a token cache, or a loss of classes "
                      f"({', '.join(classification_losses()[:6])}, ...)")
    if loss is not None and needs.modality == "tokens":
        token_form(loss)  # a loss with no per-position form is refused here, before any work
    layer = needs.kind == "features" or bool(loss_needs and loss_needs.features)
    if cfg.layer and not layer:
        raise KdError(f"layer={cfg.layer} does not apply: {f'loss {loss}' if loss else cfg.model} "
                      "reads no cached feature; drop layer=")
    logits = (loss_needs.logits if loss_needs else
              (temperature and "target" not in cfg.params) or target in ("teacher", "soft"))
    augment = cfg.param("augment")
    augment = None if augment in (None, "none") else augment
    if augment is not None:
        check_policy(augment, "augment")
        if logits or (loss_needs and loss_needs.features):
            raise KdError(f"augment={augment} does not apply to loss {loss}: it reads the teacher's "
                          "cached outputs, valid only for the inputs the teacher saw; cache augmented "
                          f"views instead (kdcache cache views=K augment={augment}) and train with "
                          "views=all, or use a label-only loss (loss=ce)")
        if cfg.views not in ("all", "1"):
            raise KdError(f"views={cfg.views} with augment={augment}: fresh augmentation trains on "
                          "view 0 of each row; drop views= or augment=")
    return Uses(needs.kind, loss, target, temperature, layer, bool(logits), augment)


def _alternatives(values) -> str:
    """``a or b``, ``a, b or c``."""
    values = list(values)
    return " or ".join(values) if len(values) < 3 else f"{', '.join(values[:-1])} or {values[-1]}"


def check_modality(model: str, modality: str, where: str) -> None:
    """Refuse, in one line, a run of ``model`` on data of another ``modality`` than the inputs
    it declares it reads (``where``: the cache, for the message). Feature students read any."""
    needs = STUDENTS.declared(model)
    if needs.kind != "inputs" or needs.modality == modality:
        return
    if needs.modality == "text":
        raise KdError(f"model {model} reads text, and {where} holds {modality} inputs; train it "
                      "from a cache of a text dataset (dataset=text:FILE or textdir:DIR), or pick "
                      f"a student of {modality} inputs ({', '.join(_reading(modality))}) or of the "
                      "cached features (logreg, linear_svc, sgd)")
    raise KdError(f"model {model} reads {needs.modality} inputs, and {where} holds {modality}; pick "
                  f"a student of {modality} ({', '.join(_reading(modality))}) or of the cached "
                  "features (logreg, linear_svc, sgd)")


def _reading(modality: str) -> list[str]:
    """The registered input students of ``modality``."""
    return [n for n in STUDENTS if n in STUDENTS and STUDENTS.declared(n).kind == "inputs"
            and STUDENTS.declared(n).modality == modality]


def _with_loss() -> list[str]:
    return [name for name in STUDENTS if STUDENTS.declared(name).loss]


def create_student(name: str, cfg: StudentConfig | None = None, **overrides: Any):
    """An unfitted student ``name`` built from ``cfg`` (default: the declared defaults) with
    ``overrides`` (its hyperparameters or run keys, e.g. ``C=0.5``, ``epochs=2``)."""
    entry = STUDENTS.get(name)
    base = cfg if cfg is not None and cfg.model == name else StudentConfig(model=name)
    if cfg is not None and cfg.model == name and cfg.params:
        run = cfg
    else:
        fields = {f.name for f in dataclasses.fields(StudentConfig)}
        keys = {k: v for k, v in overrides.items() if k in fields}
        run = complete(dataclasses.replace(base, model=name, **keys),
                       {k: v for k, v in overrides.items() if k not in fields})
        overrides = {}
    params = {**run.params, **overrides}
    if _from_config(entry):
        return entry(dataclasses.replace(run, params=Params(params)))
    accepted = inspect.signature(entry).parameters
    loss_keys = set(loss_params(run.loss)) if run.loss else set()
    kwargs = {k: v for k, v in params.items() if k in accepted and k not in loss_keys}
    for key in ("seed", "device", "loss"):
        if key in accepted:
            kwargs[key] = getattr(run, key)
    if "loss_params" in accepted:
        kwargs["loss_params"] = {k: v for k, v in params.items() if k in loss_keys}
    return entry(**kwargs)


def saved_config(record: dict[str, Any]) -> StudentConfig:
    """The StudentConfig a run directory's config.json records. A run saved before
    hyperparameters were declared by students and losses kept them as flat keys: those its
    student and loss declare are taken (None and a width of 0 meant "the default")."""
    cfg = from_record(StudentConfig, record)
    if "params" in record:
        return cfg
    loss = run_loss(cfg.model, cfg.loss)
    declared = hyperparameters(cfg.model, loss)
    given = {k: v for k, v in record.items() if k in declared and v is not None
             and not (k == "width" and v == 0) and k not in ("student_layer",)}
    return complete(dataclasses.replace(cfg, loss=loss), given)


def student_config(overrides: list[str] | dict[str, Any] = (), verb: str = "student") -> StudentConfig:
    """A student run's config from ``key=value`` overrides (or a dict), completed: what
    ``kdcache student`` resolves (:func:`pipeline.config.resolve` with :func:`complete`)."""
    from pipeline.settings import resolve  # (settings sits above the students: it imports data)

    return resolve(StudentConfig, overrides, verb=verb, params=complete)
