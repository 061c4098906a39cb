"""Input students: small PyTorch networks trained on the original inputs against cached
teacher targets. The architectures are the teacher registry's, built narrower."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline import runtime, training
from pipeline.augment import parse
from pipeline.cache.reader import log_softmax, softmax
from pipeline.losses import LOSSES
from pipeline.students.base import Student
from pipeline.students.data import StudentData
from pipeline.students.registry import DEFAULT_LOSS, STUDENTS
from pipeline.teachers import DEFAULT_LAYER, TEACHERS, Tapped

# Default widths: small enough to be worth distilling into (a few thousand parameters).
STUDENT_WIDTHS = {"mlp": 32, "cnn1d": 8, "cnn_small": 4, "resnet_small": 4}


class _Net(nn.Module):
    """The student network, returning (logits, penultimate features); plus, for hint losses,
    a linear adapter from the student's feature width to the teacher's."""

    def __init__(self, arch: str, width: int, input_shape, num_classes: int, hint_dim: int = 0):
        super().__init__()
        base = TEACHERS.get(arch)
        net = base(tuple(input_shape), num_classes, width) if width else base(tuple(input_shape), num_classes)
        self.net = Tapped(net, (DEFAULT_LAYER,), pool=True, arch=arch)
        self.adapter = None
        if hint_dim:
            self.net.eval()  # probe the feature width without touching BatchNorm statistics
            with torch.no_grad():
                _, feats = self.net(torch.zeros((2, *input_shape)))
            self.net.train()
            self.adapter = nn.Linear(feats[DEFAULT_LAYER].shape[1], hint_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = self.net(x)
        hint = feats[DEFAULT_LAYER]
        return logits, (self.adapter(hint) if self.adapter is not None else hint)


class TorchStudent(Student):
    """A small network distilled from cached teacher logits (and features, for feature losses).

    ``fit_cache(data)`` streams the train split from the cache (inputs joined to the cached
    targets by sample_id); ``fit(X, y, teacher_logits=..., teacher_features=..., X_val=...,
    y_val=...)`` trains on in-memory arrays whose row i describes one sample. What the loss
    reads (logits, a feature) and whether it takes a temperature is the loss's declaration.
    Training is seeded and deterministic on CPU; the epoch with the best validation accuracy is
    kept. ``temperature=None`` takes the cache's default in ``fit_cache``. ``augment`` is a
    policy applied afresh to every batch (label-only losses: cached targets are valid only for
    the inputs the teacher saw; a multi-view cache replays its own views in ``fit_cache``).
    """

    def __init__(self, arch: str = "cnn_small", width: int = 0, loss: str = "kd",
                 temperature: float | None = None, alpha: float = 0.9, hint_weight: float = 1.0,
                 dkd_alpha: float = 1.0, dkd_beta: float = 8.0, epochs: int = 60, lr: float = 3e-3,
                 weight_decay: float = 5e-4, batch_size: int = 128, seed: int = 0,
                 device: str = "auto", augment: str = "none"):
        self.arch = arch
        self.width = width
        self.loss = loss
        self.temperature = temperature
        self.alpha = alpha
        self.hint_weight = hint_weight
        self.dkd_alpha = dkd_alpha
        self.dkd_beta = dkd_beta
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.augment = augment

    def fit_cache(self, data: StudentData) -> "TorchStudent":
        needs = LOSSES.declared(self.loss)
        temperature = self.temperature if self.temperature is not None else data.temperature
        batches = data.input_batches(self.batch_size, self.seed, logits=needs.logits,
                                     features=needs.features,
                                     temperature=temperature if needs.temperature else None)
        return self._fit_batches(batches, data.steps_per_epoch(self.batch_size),
                                 data.rows("val", "inputs"), data.labels("val"), data.num_classes,
                                 data.feature_dim if needs.features else 0, temperature,
                                 data.progress)

    def fit(self, X: np.ndarray, y: np.ndarray, *, teacher_logits: np.ndarray | None = None,
            teacher_features: np.ndarray | None = None, X_val: np.ndarray, y_val: np.ndarray):
        """Train on in-memory arrays (row i of each describes one sample)."""
        needs = LOSSES.declared(self.loss)
        if needs.logits and teacher_logits is None:
            raise ValueError(f"loss {self.loss} needs teacher_logits")
        if needs.features and teacher_features is None:
            raise ValueError(f"loss {self.loss} needs teacher_features")
        if needs.temperature and self.temperature is None:
            raise ValueError(f"loss {self.loss} needs a temperature (temperature=...)")
        num_classes = (teacher_logits.shape[1] if teacher_logits is not None
                       else int(max(y.max(), y_val.max())) + 1)
        feats = teacher_features.reshape(len(X), -1) if needs.features else None
        targets = {"z_t": teacher_logits if needs.logits else None, "f_t": feats}
        batches = training.array_batches(X, y, self.batch_size, self.seed, targets)
        if needs.temperature and needs.logits:
            batches = _with_soft_targets(batches, self.temperature)
        return self._fit_batches(batches, -(-len(X) // self.batch_size), X_val, y_val, num_classes,
                                 0 if feats is None else feats.shape[1], self.temperature)

    def _fit_batches(self, batches: training.Batches, steps_per_epoch: int, X_val, y_val: np.ndarray,
                     num_classes: int, hint_dim: int, temperature: float | None,
                     progress: bool = False) -> "TorchStudent":
        """Train from ``batches(epoch)``, which yields ``(x, y, {"z_t": raw teacher logits,
        "log_p_t", "p_t": its soft targets at the temperature, "f_t": teacher features})``
        batches (only what the loss reads)."""
        loss_fn, needs = LOSSES.get(self.loss), LOSSES.declared(self.loss)
        self.device_ = runtime.pick_device(self.device)
        torch.manual_seed(self.seed)
        self.classes_ = np.arange(num_classes)
        width = self.width or STUDENT_WIDTHS.get(self.arch, 0)
        self.model_ = _Net(self.arch, width, X_val.shape[1:], num_classes, hint_dim)
        self.temperature_ = temperature if needs.temperature else None

        def objective(out, labels, targets):
            z_s, hint = out
            return loss_fn(z_s, labels, hint=hint, T=self.temperature_, alpha=self.alpha,
                           hint_weight=self.hint_weight, dkd_alpha=self.dkd_alpha,
                           dkd_beta=self.dkd_beta, **targets)

        result = training.fit(self.model_, batches, steps_per_epoch, X_val, y_val, objective,
                              epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                              seed=self.seed, device=self.device_, progress=progress,
                              augment=parse(self.augment, tuple(X_val.shape[1:])),
                              desc=f"student {self.arch}/{self.loss}")
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.fit_seconds_ = result.seconds
        return self

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


def _with_soft_targets(batches: training.Batches, T: float) -> training.Batches:
    """Add the teacher's soft targets log softmax(z_t/T) and softmax(z_t/T) to every batch,
    computed in NumPy: they carry no gradient, and as torch ops each would cost a step of a
    small student tens of microseconds (most of it waking the intra-op thread pool)."""
    def soft(epoch: int):
        for x, y, targets in batches(epoch):
            log_p_t = log_softmax(np.asarray(targets["z_t"], np.float32) / np.float32(T), axis=1)
            yield x, y, {**targets, "log_p_t": log_p_t, "p_t": np.exp(log_p_t)}
    return soft


def _torch_factory(arch: str):
    def factory(cfg) -> TorchStudent:
        return TorchStudent(arch=arch, width=cfg.width, loss=cfg.loss or DEFAULT_LOSS,
                            temperature=cfg.temperature, alpha=cfg.alpha, hint_weight=cfg.hint_weight,
                            dkd_alpha=cfg.dkd_alpha, dkd_beta=cfg.dkd_beta, epochs=cfg.epochs,
                            lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
                            seed=cfg.seed, device=cfg.device, augment=cfg.augment)

    factory.__doc__ = f"A narrow {arch} (width {STUDENT_WIDTHS[arch]}) trained on inputs."
    return factory


for _arch in STUDENT_WIDTHS:
    STUDENTS.register(_arch, kind="inputs", loss=True)(_torch_factory(_arch))
