"""Distillation losses (a registry). Each is a pure function of the student's outputs and the
cached teacher targets; each docstring gives the formula and the paper.

Common arguments, named as in the formulas: ``z_s`` student logits [B, C]; ``z_t`` raw cached
teacher logits [B, C]; ``y`` labels [B]; ``T`` the temperature; KL(p ‖ q) = Σ p (log p − log q),
averaged over the batch. Every loss returns a scalar tensor. Extra keyword arguments a loss does
not use are ignored, so the training loop can call every loss the same way.

Each loss declares at registration what it needs (:class:`LossNeeds`): whether it reads the
cached logits, a cached feature, and whether it softens by a temperature. Students, sweeps,
results rows and CLI checks all derive from that one declaration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.registry import Registry


@dataclass(frozen=True)
class LossNeeds:
    """What a loss reads from the cache and uses from the run, declared once at registration.

    - ``logits``: reads the cached teacher logits ``z_t``. False for a label-only baseline,
      whose runs read no teacher output at all.
    - ``features``: reads a cached teacher feature ``f_t`` (flattened) and the student's hint
      ``hint`` (its penultimate activation through a learned adapter to ``f_t``'s width); the
      run's ``layer`` names the cached feature.
    - ``temperature``: softens by ``T``. The trainer then passes ``T`` and the teacher's soft
      targets ``log_p_t = log softmax(z_t / T)`` and ``p_t = softmax(z_t / T)``, computed off
      the autograd graph; runs record the temperature (otherwise it is recorded as unused).
    """

    logits: bool = True
    features: bool = False
    temperature: bool = False


Loss = Callable[..., torch.Tensor]
LOSSES: Registry[Loss] = Registry("loss", LossNeeds)


def soft_kl(z_s: torch.Tensor, z_t: torch.Tensor, T: float, log_p_t: torch.Tensor | None = None,
            p_t: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(z_t/T) ‖ softmax(z_s/T)), summed over classes, averaged over the batch.

    ``log_p_t`` = log softmax(z_t/T) and ``p_t`` = softmax(z_t/T) may be passed precomputed:
    they are constants of the teacher, and on small students each op of a training step
    counts (the trainer computes them in NumPy per batch).
    """
    log_p_s = F.log_softmax(z_s / T, dim=1)
    if log_p_t is None:
        log_p_t = F.log_softmax(z_t / T, dim=1)
    if p_t is None:
        p_t = log_p_t.exp()
    return (p_t * (log_p_t - log_p_s)).sum(dim=1).mean()


@LOSSES.register("ce", logits=False)
def ce(z_s: torch.Tensor, y: torch.Tensor, **_) -> torch.Tensor:
    """Cross-entropy on the labels only: L = CE(z_s, y) = −log softmax(z_s)_y.

    The baseline every distillation result is compared with; it ignores the teacher.
    """
    return F.cross_entropy(z_s, y)


@LOSSES.register("kd", temperature=True)
def kd(z_s: torch.Tensor, y: torch.Tensor, *, z_t: torch.Tensor, T: float = 4.0,
       alpha: float = 0.9, log_p_t: torch.Tensor | None = None, p_t: torch.Tensor | None = None,
       **_) -> torch.Tensor:
    """Hinton knowledge distillation.

    L = α · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α) · CE(z_s, y)

    The T² keeps the soft term's gradient scale independent of T. ``log_p_t`` / ``p_t``: the
    teacher's soft targets, if precomputed (see :func:`soft_kl`).
    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015
    (arXiv:1503.02531).
    """
    if p_t is not None and log_p_t is not None and z_s.device.type == "cpu" and z_s.requires_grad:
        return _CpuHintonKD.apply(z_s, y, p_t, log_p_t, float(T), float(alpha))
    return (alpha * T * T * soft_kl(z_s, z_t, T, log_p_t, p_t)
            + (1.0 - alpha) * F.cross_entropy(z_s, y))


def _log_softmax_np(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class _CpuHintonKD(torch.autograd.Function):
    """:func:`kd` on CPU tensors with precomputed soft targets: its value and its gradient

        ∂L/∂z_s = [α · T · (softmax(z_s/T) − p_t) + (1 − α) · (softmax(z_s) − onehot(y))] / B

    computed together in NumPy in the forward pass. The same arithmetic as torch's graph, but a
    training step of a small student is dominated by per-op costs: ~a dozen NumPy ops on
    [B, C] take ~30 µs where the torch graph's forward and backward take ~150 µs (~10 µs per
    op), which made KD epochs of a 23k-parameter MLP 1.2x CE epochs. Tests hold it equal to the
    torch graph in value and gradient."""

    @staticmethod
    def forward(ctx, z_s, y, p_t, log_p_t, T, alpha):
        z = z_s.detach().numpy()
        # scalars in the logits' dtype, as in torch's graph (a T whose T² overflows float32 makes
        # the loss non-finite there too, and training refuses it)
        real = z.dtype.type
        T, alpha, n = real(T), real(alpha), len(z)
        rows, labels = np.arange(n), y.numpy()
        log_q_t = _log_softmax_np(z / T)
        log_q = _log_softmax_np(z)
        p, log_p = p_t.numpy(), log_p_t.numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            kl = (p * (log_p - log_q_t)).sum(dtype=real) / real(n)
            ce = -log_q[rows, labels].sum(dtype=real) / real(n)
            value = alpha * T * T * kl + (real(1) - alpha) * ce
            grad = alpha * T * (np.exp(log_q_t) - p)
            soft = np.exp(log_q)
            soft[rows, labels] -= real(1)
            grad += (real(1) - alpha) * soft
            grad /= real(n)
        ctx.save_for_backward(torch.from_numpy(grad))
        return torch.tensor(value, dtype=z_s.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None, None


@LOSSES.register("mse_logits")
def mse_logits(z_s: torch.Tensor, y: torch.Tensor, *, z_t: torch.Tensor, alpha: float = 0.9,
               **_) -> torch.Tensor:
    """Logit regression.

    L = α · mean_c (z_s − z_t)² + (1 − α) · CE(z_s, y)

    Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014. Matching raw logits is
    the T → ∞ limit of KD (with zero-mean logits).
    """
    return alpha * F.mse_loss(z_s, z_t) + (1.0 - alpha) * F.cross_entropy(z_s, y)


@LOSSES.register("fitnet", features=True, temperature=True)
def fitnet(z_s: torch.Tensor, y: torch.Tensor, *, z_t: torch.Tensor, hint: torch.Tensor,
           f_t: torch.Tensor, T: float = 4.0, alpha: float = 0.9, hint_weight: float = 1.0,
           log_p_t: torch.Tensor | None = None, p_t: torch.Tensor | None = None,
           **_) -> torch.Tensor:
    """FitNets hint loss on top of KD.

    L = KD(z_s, z_t, y; T, α) + w · mean (r(h_s) − f_t)²

    where h_s is the student's penultimate activation, r a learned linear adapter to the
    teacher's feature width, f_t the cached teacher feature and w = ``hint_weight``. The paper
    trains the hint stage first; here both terms are optimised jointly, as most libraries do.
    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (arXiv:1412.6550).
    """
    return (kd(z_s, y, z_t=z_t, T=T, alpha=alpha, log_p_t=log_p_t, p_t=p_t)
            + hint_weight * F.mse_loss(hint, f_t))


@LOSSES.register("dkd", temperature=True)
def dkd(z_s: torch.Tensor, y: torch.Tensor, *, z_t: torch.Tensor, T: float = 4.0,
        dkd_alpha: float = 1.0, dkd_beta: float = 8.0, **_) -> torch.Tensor:
    """Decoupled knowledge distillation.

    L = CE(z_s, y) + a · T² · KL(b_t ‖ b_s) + b · T² · KL(p̂_t ‖ p̂_s)

    b = [p_y, 1 − p_y] is the binary target-vs-rest distribution (TCKD term) and p̂ the softmax
    over the non-target classes only (NCKD term), all at temperature T; a = ``dkd_alpha``,
    b = ``dkd_beta`` (the paper uses 1 and 8).
    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022 (arXiv:2203.08679).
    """
    gt = F.one_hot(y, z_s.shape[1]).bool()

    def log_binary(z: torch.Tensor) -> torch.Tensor:
        # log b = [log p_y, log(1 − p_y)] in log space: exact even when p_y underflows
        # (clamping p_y would change the loss and zero its gradient for confidently wrong rows).
        log_p = F.log_softmax(z / T, dim=1)
        return torch.stack([log_p[gt], torch.logsumexp(log_p.masked_fill(gt, float("-inf")), 1)], 1)

    log_b_s, log_b_t = log_binary(z_s), log_binary(z_t)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(1).mean()
    # Remove the target class from both distributions by pushing its logit to −∞ (−1000·T).
    mask = gt.float() * 1000.0
    nckd = soft_kl(z_s / T - mask, z_t / T - mask, 1.0)
    return F.cross_entropy(z_s, y) + (dkd_alpha * tckd + dkd_beta * nckd) * T * T
