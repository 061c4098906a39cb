"""Distillation losses over token targets: a causal LM student against a token cache's
per-position teacher distributions (pure torch functions; registered in
:data:`pipeline.losses.LOSSES` by :mod:`pipeline.losses`).

Position j of a window predicts token j + 1: the student's logits z [B, T, V] at j against the
teacher's targets at j — ``t_ids`` [B, T, L], ``t_w`` [B, T, L], ``t_tail`` [B, T], the
teacher's distribution at T over L listed ids and one tail bucket
(:meth:`pipeline.sparse.SparseLogits.targets`: topk:K, sample:K, topk:K+sample:M) — and the
true next token ``next_ids`` [B, T] (ids[:, j + 1]). ``mask`` [B, T] says which positions have
a target (the last position and padding have none); every loss is the mean over the masked
positions of the batch, never touching the others.

Each loss is α · T² · D + (1 − α) · CE(z, next) with D one of (q = softmax(z / T), the
student's distribution, aggregated like the teacher's over the listed ids and the tail bucket
q_tail = 1 − Σ q_listed; p the teacher's (t_w, t_tail)):

- ``forward_kl``  KL(p ‖ q) over the listed ids and the tail (:func:`pipeline.losses.sparse_kl`
  per position): from topk:K, KD with the tail as one class; from sample:K, the sampled-KD
  cross-entropy (Anshumann et al., ACL 2025) up to a constant; from topk:K+sample:M, the exact
  head with the unbiased tail (pipeline/sparse.py). ``loss=kd`` on a sample:K, topk:K+sample:M
  or dense token cache; ``loss=kd_tail`` on any topk cache.
- ``renormalised_kl``  KL(p̃ ‖ q̃) with both distributions renormalised over the K listed ids
  (no tail on either side; what MaxText meant to do, PR #4056, and the issue's "topk:16
  renormalised" arm). ``loss=kd`` on a topk:K token cache (measured best: bench lm), and
  ``loss=kd_renorm`` on any topk cache. topk targets only (distinct ids).
- ``reverse_kl``  KL(q ‖ p) over the K + tail support (mode seeking; MiniLLM, Gu et al.,
  ICLR 2024). topk targets only: p̂ of a sample cache is 0 where q is not.
- ``jsd``  the generalised Jensen–Shannon divergence β · KL(p ‖ m) + (1 − β) · KL(q ‖ m),
  m = β p + (1 − β) q, over the K + tail support (GKD, Agarwal et al., ICLR 2024). topk targets.
- ``next_token_ce``  CE(z, next) alone (``loss=ce`` on a token cache).

Memory: positions are processed in chunks of ``chunk`` (:func:`position_loss`), each under
activation checkpointing, so the loss's working set is a chunk × vocabulary, not B × T × V —
and when the student passes a function of positions (its LM head applied to its hidden states)
instead of logits, the full [B, T, V] logits never exist at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.errors import KdError

POSITION_CHUNK = 1024  # positions per chunk: 1,024 × a 50k vocabulary in float32 is 200 MB
LOG_FLOOR = -1e4  # log of a bucket of (numerically) zero mass: finite, so 0 · log 0 stays 0

PositionForm = Callable[..., torch.Tensor]


def _buckets(u: torch.Tensor, t_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q of the listed ids [P, L], log q_tail [P]) for softened logits ``u`` [P, V], with
    q = softmax(u) and the tail every id not listed (clamped where it holds nothing)."""
    log_z = torch.logsumexp(u, dim=1)
    log_q_ids = u.gather(1, t_ids) - log_z[:, None]
    tail = u.scatter(1, t_ids, float("-inf"))
    log_q_tail = (torch.logsumexp(tail, dim=1) - log_z).clamp(min=LOG_FLOOR)
    return log_q_ids, log_q_tail


def _log(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p.clamp(min=torch.finfo(p.dtype).tiny)).clamp(min=LOG_FLOOR)


def _mix(divergence: torch.Tensor, z: torch.Tensor, next_ids: torch.Tensor, T: float,
         alpha: float) -> torch.Tensor:
    """α · T² · divergence + (1 − α) · CE(z, next), per position [P]."""
    ce = F.cross_entropy(z, next_ids, reduction="none")
    return alpha * T * T * divergence + (1.0 - alpha) * ce


def forward_kl(z: torch.Tensor, next_ids: torch.Tensor, *, t_ids: torch.Tensor, t_w: torch.Tensor,
               t_tail: torch.Tensor, T: float = 1.0, alpha: float = 0.5, **_) -> torch.Tensor:
    """Per position [P]: α · T² · KL(p ‖ q) over the listed ids and the tail bucket
    + (1 − α) · CE(z, next), with q = softmax(z / T) (see the module docstring); value and
    gradient by :class:`_HeadTailKL`."""
    return _HeadTailKL.apply(z, next_ids, t_ids, t_w.to(z.dtype), t_tail.to(z.dtype), float(T), float(alpha))


def _head_tail_kl(z: torch.Tensor, next_ids: torch.Tensor, t_ids: torch.Tensor, t_w: torch.Tensor,
                  t_tail: torch.Tensor, T: float, alpha: float,
                  want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`forward_kl`'s value per position [P] and, with ``want_grad``, its gradient with
    respect to the logits ``z`` [P, V], computed together in a few passes over [P, V].

    Why: through autograd the same loss took ~20 passes over [P, V] (z / T, two logsumexps, a
    scattered copy, a separate log-softmax for the CE, and each of their backwards): with a
    49,152-token vocabulary the loss was 85% of a small student's step. With q = softmax(u),
    u = z / T, R the ids not listed and q_R = Σ_R q_j (t_w and the tail mass t sum to 1):

        ∂KL/∂u_j = q_j − w_j (listed),   q_j · (1 − t / q_R) (j ∈ R)
        ∂CE/∂z_j = softmax(z)_j − [j = next]

    so ∂L/∂z = α T (q − Σ w e_listed − (t / q_R) q·1_R) + (1 − α) (softmax(z) − e_next). A
    student whose tail underflows in float32 (q_R < 1e-30) gets log q_R and the tail's share of
    the gradient from its tail's own logsumexp (exact), as the graph did."""
    u = z / T if T != 1.0 else z
    log_zu = torch.logsumexp(u, dim=1)
    q = (u - log_zu[:, None]).exp_()
    rest = q.scatter(1, t_ids, 0.0)  # q on the tail, 0 on the listed ids
    q_rest = rest.sum(1)
    log_q_rest = torch.log(q_rest)
    tiny = q_rest < 1e-30
    within = None  # rows whose tail underflowed: the student's distribution within its tail
    if bool(tiny.any()):  # exact where float32's q underflowed
        tail_u = u[tiny].scatter(1, t_ids[tiny], float("-inf"))
        log_tail = torch.logsumexp(tail_u, 1)
        log_q_rest[tiny] = log_tail - log_zu[tiny]
        within = (tail_u - log_tail[:, None]).exp_()
    log_q_rest = log_q_rest.clamp(min=LOG_FLOOR)
    log_q_ids = u.gather(1, t_ids) - log_zu[:, None]
    kl = (torch.xlogy(t_w, t_w) - t_w * log_q_ids).sum(1) + torch.xlogy(t_tail, t_tail) - t_tail * log_q_rest
    log_z = log_zu if T == 1.0 else torch.logsumexp(z, dim=1)
    ce = log_z - z.gather(1, next_ids[:, None])[:, 0]
    value = alpha * T * T * kl + (1.0 - alpha) * ce
    if not want_grad:
        return value, None
    share = torch.where(q_rest > 0, t_tail / q_rest, torch.zeros_like(q_rest))
    grad = rest.mul_(-share[:, None]).add_(q)  # q − (t / q_R) q·1_R
    if within is not None:  # (t / q_R) q·1_R is t times the tail's own softmax
        grad[tiny] = q[tiny] - t_tail[tiny, None] * within
    grad.scatter_add_(1, t_ids, -t_w).mul_(alpha * T)
    grad.add_(q if T == 1.0 else (z - log_z[:, None]).exp_(), alpha=1.0 - alpha)
    grad.scatter_add_(1, next_ids[:, None], torch.full_like(ce[:, None], alpha - 1.0))
    return value, grad


def _renormalised_kl(z: torch.Tensor, next_ids: torch.Tensor, t_ids: torch.Tensor, t_w: torch.Tensor,
                     t_tail: torch.Tensor, T: float, alpha: float,
                     want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`renormalised_kl`'s value per position [P] and, with ``want_grad``, its gradient
    with respect to ``z`` [P, V]: with q̃ = softmax(z_listed / T) and p̃ = w / Σ w over the K
    listed ids, ∂L/∂z = α T (q̃ − p̃) on the listed ids + (1 − α) (softmax(z) − e_next): the KL
    touches K logits, the CE the whole row (``t_tail`` unused: there is no tail)."""
    listed = z.gather(1, t_ids) / T
    log_q = torch.log_softmax(listed, dim=1)
    p = t_w / t_w.sum(1, keepdim=True).clamp(min=torch.finfo(t_w.dtype).tiny)
    kl = (torch.xlogy(p, p) - p * log_q).sum(1)
    log_z = torch.logsumexp(z, dim=1)
    ce = log_z - z.gather(1, next_ids[:, None])[:, 0]
    value = alpha * T * T * kl + (1.0 - alpha) * ce
    if not want_grad:
        return value, None
    grad = (z - log_z[:, None]).exp_().mul_(1.0 - alpha)
    grad.scatter_add_(1, next_ids[:, None], torch.full_like(ce[:, None], alpha - 1.0))
    grad.scatter_add_(1, t_ids, (log_q.exp() - p) * (alpha * T))
    return value, grad


class _HeadTailKL(torch.autograd.Function):
    """:func:`forward_kl` on logits [P, V], its gradient from :func:`_head_tail_kl`."""

    @staticmethod
    def forward(ctx, z, next_ids, t_ids, t_w, t_tail, T, alpha):
        value, grad = _head_tail_kl(z, next_ids, t_ids, t_w, t_tail, T, alpha, ctx.needs_input_grad[0])
        if grad is not None:
            ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None], None, None, None, None, None, None


class _OutputLayerLoss(torch.autograd.Function):
    """The sum over P positions of a loss ``kernel`` (:data:`FUSED`) of the logits
    ``hidden @ weight.T`` (hidden [P, H], weight [V, H]), with the gradients of ``hidden`` and
    ``weight`` computed in the forward pass and kept ([P, H] and [V, H]: small), the [P, V]
    logits and their gradient dropped at once: nothing to recompute in backward, so no
    checkpointing."""

    @staticmethod
    def forward(ctx, hidden, weight, kernel, next_ids, t_ids, t_w, t_tail, T, alpha):
        wide = (torch.float32, torch.float64)  # half-precision states are widened (autocast outputs)
        h = hidden if hidden.dtype in wide else hidden.float()
        w = weight.to(h.dtype)
        z = h @ w.T
        want = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        value, grad = kernel(z, next_ids, t_ids, t_w.to(z.dtype), t_tail.to(z.dtype), T, alpha, want)
        if grad is not None:
            ctx.save_for_backward((grad @ w).to(hidden.dtype), (grad.T @ h).to(weight.dtype))
        return value.sum()

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, grad_weight * grad_out, None, None, None, None, None, None, None


@dataclass(frozen=True)
class OutputLayer:
    """A student's last hidden states ``hidden`` [N, H] and its output layer's ``weight``
    [V, H] (no bias): the logits of flat positions ``at`` are ``hidden[at] @ weight.T``. Passed
    to :func:`position_loss` in place of logits, so that the forms with a kernel in
    :data:`FUSED` run fused with the output layer (:class:`_OutputLayerLoss`)."""

    hidden: torch.Tensor
    weight: torch.Tensor

    def __call__(self, at: torch.Tensor) -> torch.Tensor:
        return self.hidden[at] @ self.weight.T


def renormalised_kl(z: torch.Tensor, next_ids: torch.Tensor, *, t_ids: torch.Tensor, t_w: torch.Tensor,
                    T: float = 1.0, alpha: float = 0.5, **_) -> torch.Tensor:
    """Per position [P]: α · T² · KL(p̃ ‖ q̃) + (1 − α) · CE(z, next), p̃ and q̃ the teacher's and
    the student's distributions at T renormalised over the K listed (distinct) ids."""
    log_q = torch.log_softmax((z / T).gather(1, t_ids), dim=1)
    p = t_w / t_w.sum(1, keepdim=True).clamp(min=torch.finfo(t_w.dtype).tiny)
    kl = (torch.xlogy(p, p) - p * log_q).sum(1)
    return _mix(kl, z, next_ids, T, alpha)


# the forms whose value and gradient have a kernel, run fused with a student's output layer
FUSED = {forward_kl: _head_tail_kl, renormalised_kl: _renormalised_kl}


def _student_buckets(z: torch.Tensor, t_ids: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's (q over the listed ids [P, L], log of it) and tail, as [P, L + 1]."""
    log_q_ids, log_q_tail = _buckets(z / T, t_ids)
    log_q = torch.cat([log_q_ids, log_q_tail[:, None]], dim=1)
    return log_q.exp(), log_q


def reverse_kl(z: torch.Tensor, next_ids: torch.Tensor, *, t_ids: torch.Tensor, t_w: torch.Tensor,
               t_tail: torch.Tensor, T: float = 1.0, alpha: float = 0.5, **_) -> torch.Tensor:
    """Per position [P]: α · T² · KL(q ‖ p) over the K listed ids and the tail bucket
    + (1 − α) · CE(z, next). A teacher bucket of zero mass is read as the float's tiniest."""
    q, log_q = _student_buckets(z, t_ids, T)
    p = torch.cat([t_w, t_tail[:, None]], dim=1).to(q.dtype)
    kl = (q * (log_q - _log(p))).sum(1)
    return _mix(kl, z, next_ids, T, alpha)


def jsd(z: torch.Tensor, next_ids: torch.Tensor, *, t_ids: torch.Tensor, t_w: torch.Tensor,
        t_tail: torch.Tensor, T: float = 1.0, alpha: float = 0.5, jsd_beta: float = 0.5,
        **_) -> torch.Tensor:
    """Per position [P]: α · T² · JSD_β + (1 − α) · CE(z, next), JSD_β = β · KL(p ‖ m)
    + (1 − β) · KL(q ‖ m), m = β p + (1 − β) q, over the K listed ids and the tail bucket."""
    q, log_q = _student_buckets(z, t_ids, T)
    p = torch.cat([t_w, t_tail[:, None]], dim=1).to(q.dtype)
    log_m = _log(jsd_beta * p + (1.0 - jsd_beta) * q)
    divergence = (jsd_beta * (torch.xlogy(p, p) - p * log_m).sum(1)
                  + (1.0 - jsd_beta) * (q * (log_q - log_m)).sum(1))
    return _mix(divergence, z, next_ids, T, alpha)


def next_token_ce(z: torch.Tensor, next_ids: torch.Tensor, **_) -> torch.Tensor:
    """Per position [P]: CE(z, next), the next-token cross-entropy (no teacher)."""
    return F.cross_entropy(z, next_ids, reduction="none")


def next_ids_of(ids: torch.Tensor) -> torch.Tensor:
    """Each position's true next token [B, T]: ids[:, j + 1] (the last position, which has no
    target, gets 0; its mask is false)."""
    out = torch.zeros_like(ids)
    out[:, :-1] = ids[:, 1:]
    return out


def position_loss(form: PositionForm, z_s: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                  mask: torch.Tensor, next_ids: torch.Tensor, targets: dict[str, torch.Tensor] | None = None,
                  *, vocab: int | None = None, chunk: int = POSITION_CHUNK, **params) -> torch.Tensor:
    """The mean over the masked positions of ``form`` (one of this module's per-position
    losses), computed ``chunk`` positions at a time under activation checkpointing.

    ``z_s``: the student's logits [B, T, V], or a function of flat position indices [P] (into
    B × T) giving their logits [P, V] (the LM head on the hidden states: the [B, T, V] logits are
    then never held), or an :class:`OutputLayer` (hidden states and output weight: with
    a form of :data:`FUSED` the output layer and the loss run fused, without checkpointing). ``vocab``: the shared ids 0..vocab − 1 (outputs beyond, padded
    vocabularies, are sliced away: :func:`shared_vocabulary`). ``targets``: per-position
    tensors [B, T, ...] (``t_ids``, ``t_w``, ``t_tail``); ``params``: the loss's own (T,
    alpha, ...). 0 (with a gradient of 0) where no position is masked."""
    rows = mask.reshape(-1).nonzero().squeeze(1)
    targets = {k: v.reshape(-1, *v.shape[2:])[rows] for k, v in (targets or {}).items()}
    nexts = next_ids.reshape(-1)[rows]
    if callable(z_s) and not isinstance(z_s, torch.Tensor):
        logits_of = z_s
    else:
        flat = z_s.reshape(-1, z_s.shape[-1])
        logits_of = flat.__getitem__
    total = None
    for a in range(0, len(rows), chunk):
        names = sorted(targets)

        def part(at, nxt, *values, names=names):
            z = logits_of(at)
            z = z if vocab is None else z[:, :vocab]
            z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z  # (autocast outputs)
            return form(z, nxt, **dict(zip(names, values)), **params).sum()

        if form in FUSED and isinstance(z_s, OutputLayer):  # fused with the output layer
            weight = z_s.weight if vocab is None else z_s.weight[:vocab]
            value = _OutputLayerLoss.apply(z_s.hidden[rows[a:a + chunk]], weight, FUSED[form], nexts[a:a + chunk],
                                           targets["t_ids"][a:a + chunk], targets["t_w"][a:a + chunk],
                                           targets["t_tail"][a:a + chunk], float(params.get("T", 1.0)),
                                           float(params.get("alpha", 0.5)))
        else:  # recomputed in backward: only the chunk's indices and targets are kept, not its logits
            value = checkpoint(part, rows[a:a + chunk], nexts[a:a + chunk],
                               *(targets[n][a:a + chunk] for n in names), use_reentrant=False)
        total = value if total is None else total + value
    if total is None:  # no target in the batch: 0, still connected to the student's graph
        return logits_of(rows[:0]).sum() * 0.0
    return total / len(rows)


def shared_vocabulary(student_outputs: int, teacher_outputs: int, tokenizer_size: int) -> int:
    """The ids a student and a teacher share: 0..len(tokenizer) − 1, when both output layers
    hold at least that many (outputs beyond are padding of the embedding matrix, never real
    tokens, and are sliced away); anything else is refused in one line naming both sizes."""
    if min(student_outputs, teacher_outputs) >= tokenizer_size:
        return tokenizer_size
    raise KdError(f"the student has {student_outputs:,} outputs and the teacher {teacher_outputs:,} "
                  f"for a tokenizer of {tokenizer_size:,} tokens; both must cover every token id "
                  "(an output layer padded beyond the tokenizer is sliced to it): build the "
                  "student with the cache's vocabulary")
