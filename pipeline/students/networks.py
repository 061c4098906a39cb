"""Input students: small PyTorch networks trained on the original inputs against cached
teacher targets. The architectures are the teacher registry's, built narrower."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn

from pipeline import runtime, training
from pipeline.cache.reader import log_softmax, softmax
from pipeline.losses import LOSSES, SOFT_TARGETS, USES_FEATURES
from pipeline.students.registry import STUDENTS
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


class TorchStudent(BaseEstimator, ClassifierMixin):
    """A small network distilled from cached teacher logits (and features, for ``fitnet``).

    ``fit(X, y, teacher_logits=..., teacher_features=..., X_val=..., y_val=...)``: row i of
    every array describes the same sample (the caller joins them by sample_id). Training is
    seeded and deterministic on CPU; the epoch with the best validation accuracy is kept.
    """

    kind = "inputs"
    has_proba = True

    def __init__(self, arch: str = "cnn_small", width: int = 0, loss: str = "kd", T: float = 4.0,
                 alpha: float = 0.9, hint_weight: float = 1.0, dkd_alpha: float = 1.0,
                 dkd_beta: float = 8.0, epochs: int = 60, lr: float = 3e-3,
                 weight_decay: float = 5e-4, batch_size: int = 128, seed: int = 0,
                 device: str = "auto", progress: bool = False):
        self.arch = arch
        self.width = width
        self.loss = loss
        self.T = T
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
        self.progress = progress

    def fit(self, X: np.ndarray, y: np.ndarray, *, teacher_logits: np.ndarray | None = None,
            teacher_features: np.ndarray | None = None, X_val: np.ndarray, y_val: np.ndarray):
        """Train on in-memory arrays (row i of each describes one sample)."""
        if self.loss != "ce" and teacher_logits is None:
            raise ValueError(f"loss {self.loss} needs teacher_logits")
        if self.loss in USES_FEATURES and teacher_features is None:
            raise ValueError(f"loss {self.loss} needs teacher_features")
        num_classes = (teacher_logits.shape[1] if teacher_logits is not None
                       else int(max(y.max(), y_val.max())) + 1)
        feats = teacher_features.reshape(len(X), -1) if self.loss in USES_FEATURES else None
        batches = training.array_batches(X, y, self.batch_size, self.seed,
                                         {"z_t": teacher_logits, "f_t": feats})
        return self.fit_stream(batches, -(-len(X) // self.batch_size), X_val=X_val, y_val=y_val,
                               num_classes=num_classes, hint_dim=0 if feats is None else feats.shape[1])

    def fit_stream(self, batches: training.Batches, steps_per_epoch: int, *, X_val: np.ndarray,
                   y_val: np.ndarray, num_classes: int, hint_dim: int = 0):
        """Train from ``batches(epoch)``, which yields ``(x, y, {"z_t": raw teacher logits,
        "f_t": teacher features})`` batches: e.g. block-shuffled chunks streamed from a cache,
        so training memory is bounded by the stream's buffer, not by the number of rows."""
        loss_fn = LOSSES.get(self.loss)
        if self.loss in USES_FEATURES and not hint_dim:
            raise ValueError(f"loss {self.loss} needs teacher features (hint_dim > 0)")
        self.device_ = runtime.pick_device(self.device)
        torch.manual_seed(self.seed)
        self.classes_ = np.arange(num_classes)
        width = self.width or STUDENT_WIDTHS.get(self.arch, 0)
        self.model_ = _Net(self.arch, width, X_val.shape[1:], num_classes, hint_dim)

        def objective(out, labels, targets):
            z_s, hint = out
            return loss_fn(z_s, labels, hint=hint, T=self.T, alpha=self.alpha,
                           hint_weight=self.hint_weight, dkd_alpha=self.dkd_alpha,
                           dkd_beta=self.dkd_beta, **targets)

        if self.loss in SOFT_TARGETS:
            batches = _with_soft_targets(batches, self.T)
        result = training.fit(self.model_, batches, steps_per_epoch, X_val, y_val, objective,
                              epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                              seed=self.seed, device=self.device_, augment=False,
                              progress=self.progress, desc=f"student {self.arch}/{self.loss}")
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

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(1)]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.model_.net.state_dict().items()}


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
    def factory(loss: str = "kd", **params) -> TorchStudent:
        known = TorchStudent._get_param_names()
        return TorchStudent(arch=arch, loss=loss, **{k: v for k, v in params.items() if k in known})

    factory.__doc__ = f"A narrow {arch} (width {STUDENT_WIDTHS[arch]}) trained on inputs."
    return factory


for _arch in STUDENT_WIDTHS:
    STUDENTS.register(_arch)(_torch_factory(_arch))
