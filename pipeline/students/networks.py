"""Input students: small PyTorch networks trained on the original inputs against cached
teacher targets. The architectures are the teachers' (:mod:`pipeline.architectures`), built
narrower: each declares its students' default width there."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import nn

from pipeline import runtime, training
from pipeline.architectures import ARCHITECTURES, DEFAULT_LAYER, student_width
from pipeline.augment import parse
from pipeline.errors import KdError
from pipeline.latency import torch_predict
from pipeline.losses import LOSSES, loss_arguments, soft_targets
from pipeline.numerics import softmax
from pipeline.students.base import Student
from pipeline.students.data import StudentData
from pipeline.students.registry import STUDENTS
from pipeline.teachers import Tapped, layer_names


class _Net(nn.Module):
    """The student network, returning (logits, its feature at ``layer``); plus, for losses with
    learned parts (an adapter, projection heads), the loss's head, which trains with the
    network and is dropped when it is deployed."""

    def __init__(self, arch: str, width: int, input_shape, num_classes: int,
                 layer: str = DEFAULT_LAYER, pool: bool = True):
        super().__init__()
        net = ARCHITECTURES.get(arch)(tuple(input_shape), num_classes, width)
        self.net = Tapped(net, (layer,), pool=pool, arch=arch, role="student")
        self.layer = layer
        self.head: nn.Module | None = None

    def feature_shape(self, input_shape) -> tuple[int, ...]:
        """The shape of one sample's feature at ``layer`` (probed without touching BatchNorm's
        running statistics)."""
        was_training = self.net.training
        self.net.eval()
        with torch.no_grad():
            _, feats = self.net(torch.zeros((2, *input_shape)))
        self.net.train(was_training)
        return tuple(feats[self.layer].shape[1:])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = self.net(x)
        return logits, feats[self.layer]


def student_layer(arch: str, width: int, input_shape, num_classes: int, asked: str | None,
                  cached: str | None) -> str:
    """The student's layer a feature loss reads: ``asked`` (checked), else the cached layer's
    name where the student has a layer of that name, else its penultimate (``embed``)."""
    net = ARCHITECTURES.get(arch)(tuple(input_shape), num_classes, width)
    names = layer_names(net)
    if asked is not None:
        if asked not in names:
            raise KdError(f"student {arch} has no layer {asked!r}; its layers include: "
                          f"{', '.join(names[-10:])} ({len(names)} in all)")
        return asked
    return cached if cached in names else DEFAULT_LAYER


class TorchStudent(Student):
    """A small network distilled from cached teacher logits (and features, for feature losses).

    ``fit_cache(data)`` streams the train split from the cache (inputs joined to the cached
    targets by sample_id); ``fit(X, y, teacher_logits=..., teacher_features=..., X_val=...,
    y_val=...)`` trains on in-memory arrays whose row i describes one sample. What the loss
    reads (logits, a feature) and whether it takes a temperature is the loss's declaration.
    Training is seeded and deterministic on CPU; the epoch with the best validation accuracy is
    kept. ``loss_params`` are the loss's registered parameters
    (:func:`pipeline.losses.loss_params`: ``temperature``, ``alpha``, ``loss_weight``, ...; a
    missing one takes its declared default, ``temperature`` the cache's in ``fit_cache``).
    ``student_layer`` names the layer a feature loss reads (default: the cached layer's name if
    the student has one, else ``embed``); it is tapped unpooled when the cached feature is a
    spatial map. ``augment`` is a policy applied afresh
    to every batch (label-only losses: cached targets are valid only for the inputs the
    teacher saw; a multi-view cache replays its own views in ``fit_cache``).
    """

    fixed_params = ("arch",)  # names the registry entry (mlp, cnn_small, ...): no hyperparameter

    def __init__(self, arch: str = "cnn_small", width: int = 0, loss: str = "kd",
                 loss_params: dict | None = None, epochs: int = 60, lr: float = 1e-2,
                 weight_decay: float = 5e-4, batch_size: int = 64, augment: str = "none",
                 seed: int = 0, device: str = "auto"):
        self.arch = arch
        self.width = width
        self.loss = loss
        self.loss_params = loss_params
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.augment = augment
        self.seed = seed
        self.device = device

    def _loss_param(self, name: str):
        """The loss's parameter ``name`` as given (None: not given, its declared default)."""
        return (self.loss_params or {}).get(name)

    def fit_cache(self, data: StudentData) -> "TorchStudent":
        needs = LOSSES.declared(self.loss)
        asked = self._loss_param("temperature")
        temperature = asked if asked is not None else data.temperature
        standardize = bool(self._loss_param("standardize_logits"))
        if needs.logits:
            data.check_targets(temperature if needs.temperature else None, standardize)
        batches = data.input_batches(self.batch_size, self.seed, logits=needs.logits,
                                     features=needs.features,
                                     temperature=temperature if needs.temperature else None,
                                     standardize_logits=standardize, sparse=needs.sparse)
        teacher_shape = tuple(data.feature_shape) if needs.features else None
        return self._fit_batches(batches, data.steps_per_epoch(self.batch_size),
                                 data.rows("val", "inputs"), data.labels("val"), data.num_classes,
                                 teacher_shape, data.layer if needs.features else None,
                                 temperature, data.progress)

    def fit(self, X: np.ndarray, y: np.ndarray, *, teacher_logits: np.ndarray | None = None,
            teacher_features: np.ndarray | None = None, X_val: np.ndarray, y_val: np.ndarray,
            teacher_layer: str | None = None):
        """Train on in-memory arrays (row i of each describes one sample); ``teacher_features``
        keep their shape ([N, D], or [N, C, H, W] maps for map losses); ``teacher_layer`` names
        the teacher's layer they come from (for the student's matching layer)."""
        needs = LOSSES.declared(self.loss)
        if needs.logits and teacher_logits is None:
            raise ValueError(f"loss {self.loss} needs teacher_logits")
        if needs.features and teacher_features is None:
            raise ValueError(f"loss {self.loss} needs teacher_features")
        temperature = self._loss_param("temperature")
        if needs.temperature and temperature is None:
            raise ValueError(f"loss {self.loss} needs a temperature (loss_params={{'temperature': ...}})")
        num_classes = (teacher_logits.shape[1] if teacher_logits is not None
                       else int(max(y.max(), y_val.max())) + 1)
        feats = teacher_features if needs.features else None
        targets = {"z_t": teacher_logits if needs.logits else None, "f_t": feats}
        batches = training.array_batches(X, y, self.batch_size, self.seed, targets)
        if needs.temperature and needs.logits:
            batches = _with_soft_targets(batches, temperature,
                                         bool(self._loss_param("standardize_logits")))
        return self._fit_batches(batches, -(-len(X) // self.batch_size), X_val, y_val, num_classes,
                                 None if feats is None else tuple(feats.shape[1:]), teacher_layer,
                                 temperature)

    def _fit_batches(self, batches: training.Batches, steps_per_epoch: int, X_val, y_val: np.ndarray,
                     num_classes: int, teacher_shape: tuple[int, ...] | None,
                     teacher_layer: str | None, temperature: float | None,
                     progress: bool = False) -> "TorchStudent":
        """Train from ``batches(epoch)``, which yields ``(x, y, {"z_t": raw teacher logits,
        "log_p_t", "p_t": its soft targets at the temperature, "f_t": teacher features})``
        batches (only what the loss reads)."""
        input_shape = tuple(X_val.shape[1:])
        objective = self._build(input_shape, num_classes, teacher_shape, teacher_layer, temperature)
        result = training.fit(self.model_, batches, steps_per_epoch, X_val, y_val, objective,
                              epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                              seed=self.seed, device=self.device_, progress=progress,
                              augment=self._augmentation(input_shape),
                              desc=f"student {self.arch}/{self.loss}")
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.fit_seconds_ = result.seconds
        return self

    def _augmentation(self, input_shape: tuple[int, ...]):
        """The policy applied afresh to every training batch (None: none)."""
        return parse(self.augment, input_shape)

    def _build(self, input_shape: tuple[int, ...], num_classes: int,
               teacher_shape: tuple[int, ...] | None, teacher_layer: str | None,
               temperature: float | None):
        """Build the untrained network (and the loss's head) as ``model_``; returns the
        objective ``(outputs, labels, targets) -> loss`` that training minimises."""
        needs = LOSSES.declared(self.loss)
        self.device_ = runtime.pick_device(self.device)
        torch.manual_seed(self.seed)
        self.classes_ = np.arange(num_classes)
        self.input_shape_ = tuple(input_shape)
        width = self.width or student_width(self.arch)
        self.student_layer_ = None
        layer, pool = DEFAULT_LAYER, True
        if needs.features:
            layer = self.student_layer_ = student_layer(self.arch, width, input_shape, num_classes,
                                                        self._loss_param("student_layer"), teacher_layer)
            pool = len(teacher_shape) == 1  # a spatial cached map is compared with a spatial map
        self.model_ = _Net(self.arch, width, input_shape, num_classes, layer, pool)
        if needs.features:
            own = self.model_.feature_shape(input_shape)
            if needs.maps and (len(own) < 2 or len(teacher_shape) < 2 or len(own) != len(teacher_shape)):
                raise KdError(f"loss {self.loss} compares spatial feature maps, but the cached "
                              f"feature is shaped {teacher_shape} and student layer {layer!r} "
                              f"{own}; build a cache with pool=false and train with a "
                              "student_layer= of the same kind of map")
            if needs.head is not None:
                self.model_.head = needs.head(own, teacher_shape)
        return self._objective(temperature)

    def _objective(self, temperature: float | None):
        """The objective ``(outputs, labels, targets) -> loss`` of the loss with its arguments,
        for ``model_`` (whose outputs are ``(logits, hint)``, and whose ``head`` is the loss's
        head or None)."""
        loss_fn, needs = LOSSES.get(self.loss), LOSSES.declared(self.loss)
        self.temperature_ = temperature if needs.temperature else None
        arguments = loss_arguments(self.loss, {**(self.loss_params or {}), "temperature": self.temperature_})
        self.loss_weight_ = arguments.get("weight")  # the weight trained with (declared default or given)
        head = self.model_.head

        def objective(out, labels, targets):
            z_s, hint = out
            value = loss_fn(z_s, labels, hint=hint, head=head, **arguments, **targets)
            if head is not None:  # after the step's loss: a memory never holds its own batch yet
                head.remember(targets["f_t"])
            return value

        return objective

    @property
    def n_params_(self) -> int:
        """Parameters of the deployed network (the training-only hint adapter excluded)."""
        return sum(p.numel() for p in self.model_.net.parameters())

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits [N, K]; ``X`` may be a :class:`~pipeline.rows.LazyRows` (read batch by batch)."""
        return training.predict_logits(self.model_, X, self.device_)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self.decision_function(X))

    def tensors(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().contiguous().numpy() for k, v in self.model_.net.state_dict().items()}

    def load_tensors(self, tensors: dict[str, np.ndarray], input_shape: tuple[int, ...],
                     num_classes: int) -> "TorchStudent":
        """The trained network rebuilt from :meth:`tensors` (every weight and BatchNorm
        statistic must fit: a strict load), on the CPU, in eval mode."""
        width = self.width or student_width(self.arch)
        self.model_ = _Net(self.arch, width, tuple(input_shape), num_classes)
        self.model_.net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
        self.model_.eval()
        self.classes_, self.device_ = np.arange(num_classes), torch.device("cpu")
        self.input_shape_ = tuple(input_shape)
        return self

    def deployed_module(self) -> nn.Module:
        """The trained network as a plain module on the CPU, input -> logits: without the
        feature taps and the loss's training-only head. What is timed and exported."""
        width = self.width or student_width(self.arch)
        net = ARCHITECTURES.get(self.arch)(self.input_shape_, len(self.classes_), width)
        # the taps' graph module keeps the network's own submodule names, under "extractor."
        net.load_state_dict({k.removeprefix("extractor."): v.detach().cpu()
                             for k, v in self.model_.net.state_dict().items()})
        return net.eval()

    def cpu_predict(self):
        return torch_predict(self.deployed_module())


def _with_soft_targets(batches: training.Batches, T: float, standardize: bool) -> training.Batches:
    """Add the teacher's soft targets (:func:`pipeline.losses.soft_targets`) to every batch."""
    def soft(epoch: int):
        for x, y, targets in batches(epoch):
            yield x, y, {**targets, **soft_targets(targets["z_t"], T, standardize)}
    return soft


for _arch in ARCHITECTURES:
    # the entry fixes the architecture; its narrow default width is the entry's default
    STUDENTS.register(_arch, kind="inputs", loss=True)(
        partial(TorchStudent, arch=_arch, width=student_width(_arch)))
