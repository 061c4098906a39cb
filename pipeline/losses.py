"""Distillation losses (a registry). Each is a pure function of the student's outputs and the
cached teacher targets; each docstring gives the formula and the paper. The torch code here is
the reference (and the path on GPUs); on CPU, training takes the NumPy kernels of
:mod:`pipeline.losses_cpu` where a loss has one, tested equal to it.

Common arguments, named as in the formulas: ``z_s`` student logits [B, C]; ``z_t`` raw cached
teacher logits [B, C]; ``y`` labels [B]; ``T`` the temperature; ``h_s`` the student's feature
(``hint``, [B, ...]) and ``f_t`` the cached teacher feature of the same rows ([B, ...], the
cached shape); ``w`` the weight of the method's own term (``weight``). KL(p ‖ q) =
Σ p (log p − log q), averaged over the batch. Every loss returns a scalar tensor. Extra keyword
arguments a loss does not use are ignored, so the training loop can call every loss the same
way.

Each loss declares at registration what it needs (:class:`LossNeeds`): whether it reads the
cached logits, a cached feature (and whether a spatial map), whether it softens by a
temperature, the default weight of its term, and a learned head that trains with the student.
Students, sweeps, results rows and CLI checks all derive from that one declaration.

Offline, every target is a constant of the teacher: nothing here ever back-propagates into
``z_t`` or ``f_t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import wraps
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import lm_losses, losses_cpu, plugins
from pipeline.config import Param, declared_param
from pipeline.errors import KdError
from pipeline.registry import Registry


@dataclass(frozen=True)
class LossNeeds:
    """What a loss reads from the cache and uses from the run, declared once at registration.

    - ``logits``: reads the cached teacher logits ``z_t``. False for a label-only baseline,
      whose runs read no teacher output at all.
    - ``features``: reads a cached teacher feature ``f_t`` (in its cached shape) and the
      student's feature ``hint`` at the run's ``student_layer``; the run's ``layer`` names the
      cached feature. Widths may differ (a loss that compares them directly declares a head).
    - ``temperature``: softens by ``T``. The trainer then passes ``T`` and the teacher's soft
      targets ``log_p_t = log softmax(z_t / T)`` and ``p_t = softmax(z_t / T)``, computed off
      the autograd graph; runs record the temperature (otherwise it is recorded as unused).
      Every such loss also takes ``standardize`` (logit standardisation, see
      :func:`standardize`): it then softens Z(z) instead of z, and so do the soft targets.
    - ``maps``: reads spatial feature maps ([B, C, H, W] or [B, C, L]): the cached layer must
      be unpooled (a ``pool=false`` cache) and the student's matching layer is taken unpooled.
    - ``weight``: the default weight ``w`` of the method's own term (its paper's value unless
      its docstring says why not), which runs may override with ``loss_weight=``; None: the
      loss has no such weight.
    - ``head``: ``head(student_shape, teacher_shape) -> LossHead``, a module with learned
      parameters (an adapter, projection heads) built once per run, trained with the student
      and dropped when it is deployed; the loss receives it as ``head``.
    - ``params``: the loss's own hyperparameters and their defaults, e.g. ``{"alpha": 0.9}``
      (kd's weight of the teacher term) or dkd's ``{"dkd_alpha": 1.0, "dkd_beta": 8.0}``; the
      loss receives them as keyword arguments. With ``temperature``, ``weight`` and
      ``features`` come ``temperature``, ``standardize_logits``, ``loss_weight`` and
      ``student_layer`` (:func:`loss_params`). These are the run keys the loss adds: config,
      results table and leaderboard take them from here.
    - ``sparse``: the loss has a sparse form. From a sparse-logit cache (``logits=topk:K`` /
      ``sample:K``) it then receives the teacher's distribution at T over K classes and a
      tail bucket (``t_ids``, ``t_w``, ``t_tail``: :meth:`pipeline.sparse.SparseLogits.targets`)
      instead of ``z_t``; a loss without one gets the dense stand-in
      (:meth:`pipeline.sparse.SparseLogits.dense`) as ``z_t``, and its soft targets from it.
    - ``token_form``: the loss's form on a token cache (a causal LM student's per-position
      targets, :mod:`pipeline.lm_losses`), for a loss that has one (ce: next-token
      cross-entropy), or ``{cache logits kind: form}`` for one whose form depends on what the
      cache keeps (kd: see :data:`KD_TOKEN_FORMS`). None: it has none.
    - ``tokens_only``: the loss exists only on token caches; its registered function is its
      token form (reverse KL, JSD, ...). Classification students refuse it up front.
    """

    logits: bool = True
    features: bool = False
    temperature: bool = False
    maps: bool = False
    weight: float | None = None
    head: Callable[..., "LossHead"] | None = None
    sparse: bool = False
    params: Any = ()  # {name: default} at registration; kept as sorted (name, default) pairs
    token_form: Any = None  # a form, or {kind: form} at registration; kept as sorted pairs
    tokens_only: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(sorted(dict(self.params).items())))
        if isinstance(self.token_form, dict):
            object.__setattr__(self, "token_form", tuple(sorted(self.token_form.items())))
        if self.tokens_only and (self.features or self.sparse or self.token_form):
            raise ValueError("a tokens_only loss is its own token form, over token targets only")
        if (self.maps or self.head) and not self.features:
            raise ValueError("maps and head are for losses that read features (features=True)")


class LossHead(torch.nn.Module):
    """Learned parts of a loss (see :class:`LossNeeds`.head). ``remember(f_t)`` is called by the
    trainer after every step with the batch's teacher features, for heads that keep a memory;
    the loss itself never changes the head's state, so it stays a pure function of its inputs."""

    def remember(self, f_t: torch.Tensor) -> None:
        pass


Loss = Callable[..., torch.Tensor]
def _plugin_loss(name: str, loss: Loss) -> Loss:
    """A plugin's loss: its exceptions (a wrong signature, a shape error) become one line."""
    @wraps(loss)
    def checked(*args, **kwargs):
        return plugins.call(f"loss {name}", loss, *args, **kwargs)

    return checked


LOSSES: Registry[Loss] = Registry("loss", LossNeeds, adapt=_plugin_loss, plugins=plugins.Plugins("loss"))


def loss_params(name: str) -> dict[str, Param]:
    """The hyperparameters a run of loss ``name`` takes, from its registration: ``temperature``
    (None: the cache's) and ``standardize_logits`` for a temperature loss, ``loss_weight`` for
    a weighted term (its declared paper value by default), ``student_layer`` for a feature
    loss (None: the student picks), and the loss's own ``params``."""
    needs = LOSSES.declared(name)
    out = {}
    if needs.temperature:
        out["temperature"] = declared_param("temperature", float | None, None)
        out["standardize_logits"] = declared_param("standardize_logits", bool, False)
    if needs.weight is not None:
        out["loss_weight"] = declared_param("loss_weight", float, float(needs.weight))
    if needs.features:
        out["student_layer"] = declared_param("student_layer", str | None, None)
    for key, default in needs.params:
        out[key] = declared_param(key, type(default), default)
    return out


# run keys -> the keyword arguments every loss function takes (see the losses' signatures)
_ARGUMENT = {"temperature": "T", "loss_weight": "weight", "standardize_logits": "standardize"}


def loss_arguments(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of loss ``name`` for a run whose loss parameters are ``values``
    (missing ones take their declared defaults; ``student_layer`` is the student's business,
    not the loss's)."""
    declared = loss_params(name)
    # every loss is called with T, weight and standardize (None / False where it declares no
    # temperature or weight), so a loss may read them without declaring them
    out = {"T": None, "weight": None, "standardize": False}
    for key, param in declared.items():
        if key == "student_layer":
            continue
        value = values.get(key, param.default)
        out[_ARGUMENT.get(key, key)] = value
    return out

STANDARDIZE_EPS = 1e-7  # as in the reference code of Sun et al.


def standardize(z: torch.Tensor) -> torch.Tensor:
    """Logit standardisation: Z(z) = (z − mean(z)) / (std(z) + ε) per row, with the sample
    (n − 1) standard deviation as in the paper's code.

    Softening Z(z)/T instead of z/T lets the student match the teacher's logit *relations*
    without matching their range (a small student cannot reach a large teacher's logit
    magnitudes). The temperature then acts as a base temperature on standardised logits.
    Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024
    (arXiv:2403.01427).
    """
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + STANDARDIZE_EPS)


def soft_targets(z_t: np.ndarray, T: float, standardize: bool = False) -> dict[str, np.ndarray]:
    """The teacher's soft targets ``log_p_t`` = log softmax(z_t / T) and ``p_t`` (of Z(z_t)
    with ``standardize``), computed in NumPy off the autograd graph: on small students each
    torch op of a step costs tens of microseconds (most of it waking the intra-op pool)."""
    z = np.asarray(z_t, np.float32)
    if standardize:
        z = losses_cpu.standardize(z, STANDARDIZE_EPS)[0]
    log_p_t = losses_cpu.log_softmax(z / np.float32(T))
    return {"log_p_t": log_p_t, "p_t": np.exp(log_p_t)}


def _soft(z: torch.Tensor, standardized: bool) -> torch.Tensor:
    """The logits a temperature loss softens: Z(z) with standardisation, else z."""
    return standardize(z) if standardized else z


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


@LOSSES.register("ce", logits=False, token_form=lm_losses.next_token_ce)
def ce(z_s: torch.Tensor, y: torch.Tensor, **_) -> torch.Tensor:
    """Cross-entropy on the labels only: L = CE(z_s, y) = −log softmax(z_s)_y.

    The baseline every distillation result is compared with; it ignores the teacher.
    """
    return F.cross_entropy(z_s, y)


def sparse_kl(z_s: torch.Tensor, T: float, t_ids: torch.Tensor, t_w: torch.Tensor,
              t_tail: torch.Tensor) -> torch.Tensor:
    """KL from the teacher's distribution over K classes and a tail bucket to the student's,
    averaged over the batch:

        Σ_k w_k · (log w_k − log q_{i_k}) + w_tail · (log w_tail − log q_tail)

    with q = softmax(z_s / T), q_tail = Σ_{j ∉ {i_k}} q_j the student's mass on the classes not
    listed, ``t_ids`` = i [B, K], ``t_w`` = w [B, K] and ``t_tail`` = w_tail [B]
    (:meth:`pipeline.sparse.SparseLogits.targets`; 0 · log 0 = 0). From top-K logits this is
    KD with the tail as one "ghost" class (Megatron-LM's sparse KD); from K sampled classes
    (w = counts / K, no tail) it is the unbiased sampled estimator of KD's cross-entropy
    (Anshumann et al., "Sparse Logit Sampling", ACL 2025), up to the constant Σ w log w.
    """
    u = z_s / T
    log_q = F.log_softmax(u, dim=1)
    log_q_ids = log_q.gather(1, t_ids)
    tail_logits = u.scatter(1, t_ids, float("-inf"))
    # clamped: with no class left in the tail (sample covering all C) the term has weight 0
    log_q_tail = (torch.logsumexp(tail_logits, dim=1) - torch.logsumexp(u, dim=1)).clamp(min=-1e4)
    listed = (torch.xlogy(t_w, t_w) - t_w * log_q_ids).sum(dim=1)
    tail = torch.xlogy(t_tail, t_tail) - t_tail * log_q_tail
    return (listed + tail).mean()


# kd on a token cache, by what the cache keeps: from topk:K the forward KL renormalised over the
# K on both sides, which beat the K + tail-class form and online KD with every logit (bench lm,
# 3 seeds: held-out perplexity 79.3 against 83.6 and 82.0; ce 97.6); from draws (sample:K,
# topk:K+sample:M) the forward KL over the listed ids and the tail, the sampled estimator; from
# dense logits (a small vocabulary) the exact forward KL
KD_TOKEN_FORMS = {"topk": lm_losses.renormalised_kl, "sample": lm_losses.forward_kl,
                  "topk+sample": lm_losses.forward_kl, "dense": lm_losses.forward_kl}


@LOSSES.register("kd", temperature=True, sparse=True, params={"alpha": 0.9}, token_form=KD_TOKEN_FORMS)
def kd(z_s: torch.Tensor, y: torch.Tensor, *, z_t: torch.Tensor | None = None, T: float = 4.0,
       alpha: float = 0.9, log_p_t: torch.Tensor | None = None, p_t: torch.Tensor | None = None,
       standardize: bool = False, t_ids: torch.Tensor | None = None,
       t_w: torch.Tensor | None = None, t_tail: torch.Tensor | None = None, **_) -> torch.Tensor:
    """Hinton knowledge distillation.

    L = α · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α) · CE(z_s, y)

    The T² keeps the soft term's gradient scale independent of T. ``log_p_t`` / ``p_t``: the
    teacher's soft targets, if precomputed (see :func:`soft_kl`). With ``standardize`` the
    soft term compares softmax(Z(z_t)/T) and softmax(Z(z_s)/T) (:func:`standardize`); the CE
    term always sees the raw logits.
    From a sparse-logit cache (``t_ids``, ``t_w``, ``t_tail`` given) the KL term is
    :func:`sparse_kl`: L = α · T² · sparse_kl + (1 − α) · CE(z_s, y). On a token cache
    (an ``lm`` student) per position, with CE on the next token, in the form
    :data:`KD_TOKEN_FORMS` gives for what the cache keeps.
    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015
    (arXiv:1503.02531).
    """
    if t_ids is not None:
        if standardize:  # Z(z) needs every logit's mean and deviation
            raise ValueError("standardize needs dense teacher logits, not sparse targets")
        if losses_cpu.usable(z_s):
            return losses_cpu.apply(losses_cpu.kd_sparse, z_s, None, y=y, t_ids=t_ids, t_w=t_w,
                                    t_tail=t_tail, T=float(T), alpha=float(alpha))
        return alpha * T * T * sparse_kl(z_s, T, t_ids, t_w, t_tail) + (1.0 - alpha) * F.cross_entropy(z_s, y)
    if p_t is not None and log_p_t is not None and losses_cpu.usable(z_s):
        return losses_cpu.apply(losses_cpu.kd, z_s, None, y=y, p_t=p_t, log_p_t=log_p_t, T=float(T),
                                alpha=float(alpha), standardize_eps=STANDARDIZE_EPS if standardize else None)
    return (alpha * T * T * soft_kl(_soft(z_s, standardize), _soft(z_t, standardize), T, log_p_t, p_t)
            + (1.0 - alpha) * F.cross_entropy(z_s, y))


# --------------------------------------------------------------------------- token losses
# On a token cache only (lm students): their functions are per-position forms over token
# targets (pipeline.lm_losses). alpha 0.5: the measured mix for LM students.
LOSSES.register("kd_renorm", temperature=True, tokens_only=True, params={"alpha": 0.5})(
    lm_losses.renormalised_kl)
LOSSES.register("kd_tail", temperature=True, tokens_only=True, params={"alpha": 0.5})(
    lm_losses.forward_kl)
LOSSES.register("reverse_kl", temperature=True, tokens_only=True, params={"alpha": 0.5})(
    lm_losses.reverse_kl)
LOSSES.register("jsd", temperature=True, tokens_only=True, params={"alpha": 0.5, "jsd_beta": 0.5})(
    lm_losses.jsd)


def token_form(name: str, kind: str | None = None) -> Callable[..., torch.Tensor]:
    """Loss ``name``'s per-position form on a token cache (:mod:`pipeline.lm_losses`) whose
    logits are of ``kind`` (dense, topk, sample, topk+sample; a form that does not depend on it
    needs none); a loss with none is refused in one line naming those that have one."""
    needs = LOSSES.declared(name)
    if needs.tokens_only:
        return LOSSES.get(name)
    if isinstance(needs.token_form, tuple):
        return dict(needs.token_form)[kind or "dense"]
    if needs.token_form is not None:
        return needs.token_form
    raise KdError(f"loss={name} has no form on a token cache (a language model's per-position "
                  f"targets); use one of {', '.join(token_losses()[:-1])} or {token_losses()[-1]}")


def token_losses() -> list[str]:
    """The losses that train an LM student from a token cache."""
    return [n for n in LOSSES.names() if LOSSES.declared(n).tokens_only or LOSSES.declared(n).token_form]


def classification_losses() -> list[str]:
    """The losses of classification caches (every one but the token-only ones)."""
    return [n for n in LOSSES.names() if not LOSSES.declared(n).tokens_only]


@LOSSES.register("mse_logits", params={"alpha": 0.9})
def mse_logits(z_s: torch.Tensor, y: torch.Tensor, *, z_t: torch.Tensor, alpha: float = 0.9,
               **_) -> torch.Tensor:
    """Logit regression.

    L = α · mean_c (z_s − z_t)² + (1 − α) · CE(z_s, y)

    Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014. Matching raw logits is
    the T → ∞ limit of KD (with zero-mean logits).
    """
    return alpha * F.mse_loss(z_s, z_t) + (1.0 - alpha) * F.cross_entropy(z_s, y)


class Adapter(LossHead):
    """A learned linear map r from the student's (flattened) feature to the teacher's width."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        self.linear = torch.nn.Linear(int(np.prod(student_shape)), int(np.prod(teacher_shape)))

    def forward(self, h_s: torch.Tensor) -> torch.Tensor:
        return self.linear(h_s.flatten(1))


@LOSSES.register("fitnet", features=True, temperature=True, weight=1.0, head=Adapter,
                 params={"alpha": 0.9})
def fitnet(z_s: torch.Tensor, y: torch.Tensor, *, z_t: torch.Tensor, hint: torch.Tensor,
           f_t: torch.Tensor, head: Adapter, T: float = 4.0, alpha: float = 0.9,
           weight: float = 1.0, log_p_t: torch.Tensor | None = None,
           p_t: torch.Tensor | None = None, standardize: bool = False, **_) -> torch.Tensor:
    """FitNets hint loss on top of KD.

    L = KD(z_s, z_t, y; T, α) + w · mean (r(h_s) − f_t)²

    where h_s is the student's feature at the run's ``student_layer``, r a learned linear
    adapter to the teacher's feature width (the head), f_t the cached teacher feature,
    flattened. The paper trains the hint stage first; here both terms are optimised jointly,
    as most libraries do.
    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (arXiv:1412.6550).
    """
    if p_t is not None and log_p_t is not None and losses_cpu.usable(z_s, hint):
        return losses_cpu.apply(losses_cpu.fitnet, z_s, hint, (head.linear.weight, head.linear.bias),
                                y=y, p_t=p_t, log_p_t=log_p_t, f_t=f_t, T=float(T), alpha=float(alpha),
                                weight=float(weight), standardize_eps=STANDARDIZE_EPS if standardize else None)
    return (kd(z_s, y, z_t=z_t, T=T, alpha=alpha, log_p_t=log_p_t, p_t=p_t, standardize=standardize)
            + weight * F.mse_loss(head(hint), f_t.flatten(1)))


@LOSSES.register("dkd", temperature=True, params={"dkd_alpha": 1.0, "dkd_beta": 8.0})
def dkd(z_s: torch.Tensor, y: torch.Tensor, *, z_t: torch.Tensor, T: float = 4.0,
        dkd_alpha: float = 1.0, dkd_beta: float = 8.0, standardize: bool = False,
        **_) -> torch.Tensor:
    """Decoupled knowledge distillation.

    L = CE(z_s, y) + a · T² · KL(b_t ‖ b_s) + b · T² · KL(p̂_t ‖ p̂_s)

    b = [p_y, 1 − p_y] is the binary target-vs-rest distribution (TCKD term) and p̂ the softmax
    over the non-target classes only (NCKD term), all at temperature T (of Z(z) with
    ``standardize``); a = ``dkd_alpha``, b = ``dkd_beta`` (the paper uses 1 and 8).
    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022 (arXiv:2203.08679).
    """
    if losses_cpu.usable(z_s):
        return losses_cpu.apply(losses_cpu.dkd, z_s, None, y=y, z_t=z_t, T=float(T), a=float(dkd_alpha),
                                b=float(dkd_beta), standardize_eps=STANDARDIZE_EPS if standardize else None)
    gt = F.one_hot(y, z_s.shape[1]).bool()

    def log_binary(z: torch.Tensor) -> torch.Tensor:
        # log b = [log p_y, log(1 − p_y)] in log space: exact even when p_y underflows
        # (clamping p_y would change the loss and zero its gradient for confidently wrong rows).
        log_p = F.log_softmax(z / T, dim=1)
        return torch.stack([log_p[gt], torch.logsumexp(log_p.masked_fill(gt, float("-inf")), 1)], 1)

    soft_s, soft_t = _soft(z_s, standardize), _soft(z_t, standardize)
    log_b_s, log_b_t = log_binary(soft_s), log_binary(soft_t)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(1).mean()
    # Remove the target class from both distributions by pushing its logit to −∞ (−1000·T).
    mask = gt.float() * 1000.0
    nckd = soft_kl(soft_s / T - mask, soft_t / T - mask, 1.0)
    return F.cross_entropy(z_s, y) + (dkd_alpha * tckd + dkd_beta * nckd) * T * T


PEARSON_EPS = 1e-8  # as in the paper's code


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = PEARSON_EPS) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@LOSSES.register("dist", temperature=True, weight=2.0)
def dist(z_s: torch.Tensor, y: torch.Tensor, *, z_t: torch.Tensor, T: float = 4.0,
         weight: float = 2.0, p_t: torch.Tensor | None = None, standardize: bool = False,
         **_) -> torch.Tensor:
    """DIST: distillation from a stronger teacher by matching relations, not values.

    L = CE(z_s, y) + w · T² · [(1 − (1/B) Σ_i ρ(P_s[i, :], P_t[i, :]))
                               + (1 − (1/C) Σ_c ρ(P_s[:, c], P_t[:, c]))]

    P = softmax(z/T) row by row ([B, C]), ρ the Pearson correlation: the first term matches
    each sample's class ranking (inter-class relation), the second how the batch's samples
    rank for each class (intra-class relation). Pearson's invariance to scale and shift lets
    a weak student match a strong teacher's relations without its exact probabilities.
    β = γ = w (the paper's CIFAR setting: β = γ = 2 at τ = 4). The intra-class term is a
    batch statistic: it depends on which rows share a batch.
    Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022
    (arXiv:2205.10536).
    """
    if p_t is None:
        p_t = F.softmax(_soft(z_t, standardize) / T, dim=1)
    if losses_cpu.usable(z_s):
        return losses_cpu.apply(losses_cpu.dist, z_s, None, y=y, p_t=p_t, T=float(T), weight=float(weight),
                                eps=PEARSON_EPS, standardize_eps=STANDARDIZE_EPS if standardize else None)
    p_s = F.softmax(_soft(z_s, standardize) / T, dim=1)
    inter = 1.0 - _pearson_rows(p_s, p_t).mean()
    intra = 1.0 - _pearson_rows(p_s.T, p_t.T).mean()
    return F.cross_entropy(z_s, y) + weight * T * T * (inter + intra)


NKD_GAMMA = 1.5  # the paper's weight of the non-target term


@LOSSES.register("nkd", temperature=True, weight=1.0)
def nkd(z_s: torch.Tensor, y: torch.Tensor, *, z_t: torch.Tensor, T: float = 4.0,
        weight: float = 1.0, standardize: bool = False, z_t1: torch.Tensor | None = None,
        **_) -> torch.Tensor:
    """Normalized KD: KD split into a target and a normalised non-target cross-entropy.

    L = CE(z_s, y) + w · [−p_t[y] · log p_s[y] − γ · T² · Σ_{i≠y} p̂_t[i] · log p̂_s[i]]

    p = softmax(z) (T = 1) and p̂ = softmax over the non-target logits only, at T (of Z(z)
    with ``standardize``); γ = 1.5 (the paper's). Both terms are cross-entropies, so L is not
    zero when the student equals the teacher (its minimum over the student is not there
    either: the target term keeps pushing p_s[y] up, weighted by the teacher's confidence).
    ``z_t1``: logits to read p_t[y] (T = 1) from instead of ``z_t`` (a sparse cache's stand-in
    made for T = 1, where ``z_t`` is made for T).
    Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
    Approach with Normalized Loss and Customized Soft Labels", ICCV 2023 (arXiv:2303.13005).
    """
    if losses_cpu.usable(z_s):
        return losses_cpu.apply(losses_cpu.nkd, z_s, None, y=y, z_t=z_t, T=float(T), weight=float(weight),
                                gamma=NKD_GAMMA, standardize_eps=STANDARDIZE_EPS if standardize else None,
                                z_t1=z_t1)
    n, c = z_s.shape
    gt = F.one_hot(y, c).bool()
    log_p_s_y = F.log_softmax(z_s, dim=1)[gt]
    p_t_y = F.softmax(z_t if z_t1 is None else z_t1, dim=1)[gt]
    target = -(p_t_y * log_p_s_y).mean()
    rest_s = _soft(z_s, standardize)[~gt].view(n, c - 1)
    rest_t = _soft(z_t, standardize)[~gt].view(n, c - 1)
    non_target = -(F.softmax(rest_t / T, dim=1) * F.log_softmax(rest_s / T, dim=1)).sum(1).mean()
    return F.cross_entropy(z_s, y) + weight * (target + NKD_GAMMA * T * T * non_target)


# --------------------------------------------------------------------------- feature losses
# The student's feature h_s and the teacher's f_t are compared through relations among the
# batch's rows (rkd, pkt, sp), attention maps (at) or a contrastive embedding (crd), so their
# widths may differ. A batch of one row has no relations: those terms are 0 there.

RKD_DISTANCE, RKD_ANGLE = 25.0, 50.0  # the paper's λ_D and λ_A
RKD_EPS = 1e-12


def _differences(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairwise differences ``diff[j, i] = e_i − e_j`` [B, B, D] of the rows of ``e``
    [B, D] and their squared norms ‖e_i − e_j‖² [B, B]. From the differences themselves:
    exactly 0 between equal rows, and no cancellation (‖a‖² + ‖b‖² − 2a·b, the reference
    code's way, loses the small distances). One computation serves both of RKD's terms, the
    distances and the angles' unit vectors: a second, float64 copy of the differences for the
    distances once made kdcache's rkd 1.5x as slow as the reference code's (bench/FINDINGS.md)."""
    diff = e[None, :, :] - e[:, None, :]
    return diff, diff.pow(2).sum(2)


def _distances(sq: torch.Tensor) -> torch.Tensor:
    """Square roots of ``sq``, with 0 where it is 0 (the root's infinite slope at 0 is kept
    out of the gradient)."""
    return torch.where(sq > 0, sq.clamp(min=torch.finfo(sq.dtype).tiny).sqrt(), torch.zeros_like(sq))


def _mean_normalised(d: torch.Tensor) -> torch.Tensor:
    """``d`` divided by the mean of its positive entries (RKD's distance normaliser μ)."""
    positive = d > 0
    mean = d.sum() / positive.sum().clamp(min=1)
    return d / mean.clamp(min=RKD_EPS)


def _angles(diff: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """cos ∠(e_i, e_j, e_k) for every triplet [j, i, k], flattened: the cosine between
    e_i − e_j and e_k − e_j (0 where a side is 0: a degenerate angle), from the differences
    ``diff`` and their norms ``dist`` (:func:`_differences`, :func:`_distances`). From the
    normalised differences (B³·D products): the law of cosines would need only B³, but
    cancels to nonsense where two rows nearly coincide."""
    unit = diff / torch.where(dist > 0, dist, torch.ones_like(dist))[:, :, None]
    return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)


def _relations(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RKD's two views of a batch of flattened features: the mean-normalised distances ψ_D
    [B, B] and the angles ψ_A [B³]."""
    diff, sq = _differences(e)
    dist = _distances(sq)
    return _mean_normalised(dist), _angles(diff, dist)


@LOSSES.register("rkd", logits=False, features=True, weight=1.0)
def rkd(z_s: torch.Tensor, y: torch.Tensor, *, hint: torch.Tensor, f_t: torch.Tensor,
        weight: float = 1.0, **_) -> torch.Tensor:
    """Relational KD: match the batch's distance and angle structure.

    L = CE(z_s, y) + w · [λ_D · Σ_{i,j} ℓ(ψ_D(s_i, s_j), ψ_D(t_i, t_j)) / B²
                          + λ_A · Σ_{i,j,k} ℓ(ψ_A(s_i, s_j, s_k), ψ_A(t_i, t_j, t_k)) / B³]

    ψ_D = ‖x_i − x_j‖ / μ with μ the mean distance of the batch's pairs, ψ_A = the cosine of
    the angle at x_j, ℓ the Huber (smooth L1) loss; λ_D = 25, λ_A = 50 (the paper's); s, t
    the flattened student and teacher features.
    Park et al., "Relational Knowledge Distillation", CVPR 2019 (arXiv:1904.05068).
    """
    ce_term = F.cross_entropy(z_s, y)
    if len(hint) < 2:
        return ce_term
    d_s, a_s = _relations(hint.flatten(1))
    d_t, a_t = _relations(f_t.flatten(1))
    loss_d = F.smooth_l1_loss(d_s, d_t)
    loss_a = F.smooth_l1_loss(a_s, a_t)
    return ce_term + weight * (RKD_DISTANCE * loss_d + RKD_ANGLE * loss_a)


PKT_EPS = 1e-7


def _cosine_affinities(e: torch.Tensor) -> torch.Tensor:
    """Row-stochastic affinities: the cosine similarities of ``e``'s rows mapped to [0, 1],
    each row normalised to sum to 1."""
    e = e / (e.norm(dim=1, keepdim=True) + PKT_EPS)
    k = (e @ e.T + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


@LOSSES.register("pkt", logits=False, features=True, weight=3000.0)
def pkt(z_s: torch.Tensor, y: torch.Tensor, *, hint: torch.Tensor, f_t: torch.Tensor,
        weight: float = 3000.0, **_) -> torch.Tensor:
    """Probabilistic knowledge transfer: match the conditional probability distributions of
    the batch's samples in feature space.

    L = CE(z_s, y) + w · (1/B²) Σ_{i,j} q_{j|i} · log((q_{j|i} + ε) / (p_{j|i} + ε))

    p_{j|i} = K(s_i, s_j) / Σ_j K(s_i, s_j) with the cosine kernel K = (cos + 1)/2 (q from the
    teacher's features likewise), ε = 1e-7. The 1/B² mean is the reference implementation's
    (RepDistiller); its weight 3·10⁴, set for CIFAR, dominates CE on kdcache's small students
    (digits validation accuracy 0.935 against 0.970 at 3·10³). The default w = 3·10³ was
    picked from {3·10², 3·10³, 3·10⁴} by the mean validation accuracy on digits (cnn_small) and
    MNIST-1D (mlp); pass loss_weight=30000 for the reference's.
    Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
    ECCV 2018 (arXiv:1803.10837).
    """
    if losses_cpu.usable(z_s, hint):
        return losses_cpu.apply(losses_cpu.pkt, z_s, hint, y=y, f_t=f_t, weight=float(weight), eps=PKT_EPS)
    ce_term = F.cross_entropy(z_s, y)
    if len(hint) < 2:
        return ce_term
    p = _cosine_affinities(hint.flatten(1))
    q = _cosine_affinities(f_t.flatten(1))
    return ce_term + weight * (q * torch.log((q + PKT_EPS) / (p + PKT_EPS))).mean()


def _similarity(e: torch.Tensor) -> torch.Tensor:
    """G̃ = row-L2-normalised Gram matrix of ``e``'s rows."""
    return F.normalize(e @ e.T, p=2, dim=1)


@LOSSES.register("sp", logits=False, features=True, weight=30.0)
def sp(z_s: torch.Tensor, y: torch.Tensor, *, hint: torch.Tensor, f_t: torch.Tensor,
       weight: float = 30.0, **_) -> torch.Tensor:
    """Similarity-preserving KD: inputs the teacher finds similar should look similar to the
    student.

    L = CE(z_s, y) + w · (1/B²) ‖G̃_t − G̃_s‖²_F,    G̃ = rownorm(F · Fᵀ)

    with F the batch's flattened features. The reference implementations' w = 3000, set for
    CIFAR, dominates CE on kdcache's small students (digits validation accuracy 0.935 against
    0.982 at 30); the default w = 30 was picked from {30, 300, 3000} by the mean validation
    accuracy on digits (cnn_small) and MNIST-1D (mlp); pass loss_weight=3000 for the
    reference's.
    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019 (arXiv:1907.09682).
    """
    if losses_cpu.usable(z_s, hint):
        return losses_cpu.apply(losses_cpu.sp, z_s, hint, y=y, f_t=f_t, weight=float(weight))
    ce_term = F.cross_entropy(z_s, y)
    b = len(hint)
    diff = _similarity(f_t.flatten(1)) - _similarity(hint.flatten(1))
    return ce_term + weight * diff.pow(2).sum() / (b * b)


def _attention_map(f: torch.Tensor) -> torch.Tensor:
    """Q = vec(Σ_c A_c²) / ‖vec(Σ_c A_c²)‖₂ (channel mean, as the reference code: the same
    direction) for feature maps [B, C, *spatial]."""
    return F.normalize(f.pow(2).mean(1).flatten(1), p=2, dim=1)


def _common_size(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two maps to the other's spatial size."""
    if a.shape[2:] == b.shape[2:]:
        return a, b
    pool = F.adaptive_avg_pool2d if a.dim() == 4 else F.adaptive_avg_pool1d
    small = tuple(min(x, z) for x, z in zip(a.shape[2:], b.shape[2:]))
    return pool(a, small), pool(b, small)


@LOSSES.register("at", logits=False, features=True, maps=True, weight=1.0)
def at(z_s: torch.Tensor, y: torch.Tensor, *, hint: torch.Tensor, f_t: torch.Tensor,
       weight: float = 1.0, **_) -> torch.Tensor:
    """Attention transfer: match where the networks' activations concentrate.

    L = CE(z_s, y) + w · (1/B) Σ_b ‖Q_s − Q_t‖²,    Q = vec(Σ_c A_c²) / ‖vec(Σ_c A_c²)‖₂

    A the spatial feature map [C, H, W] (or [C, L]) of the student's layer and the cached
    teacher's layer of the same name; channel counts may differ, and a larger map is average
    pooled to the smaller's size. The reference code averages (Q_s − Q_t)² over the P
    positions too, with β = 10³ set for CIFAR's 32×32 maps; a mean over positions makes the
    term's strength fall as 1/P (on digits' 4×4 maps β = 10³ is 64 times stronger than on
    32×32 ones, and costs 6 points of accuracy). kdcache sums over positions instead:
    w = 1 is β = 10³ at 32×32 (10³/1024) and keeps that strength on any map size. Needs an
    unpooled cache (pool=false).
    Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017 (arXiv:1612.03928).
    """
    s, t = _common_size(hint, f_t)
    if s is hint and losses_cpu.usable(z_s, hint):  # (maps of one size: no pooling to undo)
        return losses_cpu.apply(losses_cpu.at, z_s, hint, y=y, f_t=t, weight=float(weight))
    diff = _attention_map(s) - _attention_map(t)
    return F.cross_entropy(z_s, y) + weight * diff.pow(2).sum(1).mean()


CRD_EMBED = 128  # embedding width (the paper's)
CRD_TEMPERATURE = 0.07  # softmax temperature of the critic (the paper's τ)
CRD_MEMORY = 512  # embeddings kept as negatives (the paper: 16384, from all N rows)


class ContrastHead(LossHead):
    """CRD's learned embeddings g_s, g_t (linear, then L2-normalised) and its memory: the
    teacher embeddings g_t(f_t) of the last ``memory`` cached rows, as they were when their
    batch passed (the paper's memory bank, replaced rather than momentum-averaged), each with
    an exact fingerprint of its feature row."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...],
                 embed: int = CRD_EMBED, memory: int = CRD_MEMORY):
        super().__init__()
        width = int(np.prod(teacher_shape))
        self.embed_s = torch.nn.Linear(int(np.prod(student_shape)), embed)
        self.embed_t = torch.nn.Linear(width, embed)
        # training-time state, not saved with the student
        self.register_buffer("memory", torch.zeros(memory, embed), persistent=False)
        # an exact fingerprint per row (integer arithmetic on the float's bits: the same for a
        # row whatever batch it arrives in, unlike a float projection)
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("key_multipliers", torch.randint(-2**62, 2**62, (width,), generator=gen) | 1,
                             persistent=False)
        self.register_buffer("memory_keys", torch.zeros(memory, dtype=torch.int64), persistent=False)
        self.filled, self.next = 0, 0

    def keys(self, f: torch.Tensor) -> torch.Tensor:
        """Row fingerprints: equal rows have equal keys; distinct rows collide with odds ~2⁻⁶⁴."""
        bits = f.detach().flatten(1).to(torch.float64).contiguous().view(torch.int64)
        return (bits * self.key_multipliers).sum(1)

    def embed_teacher(self, f_t: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed_t(f_t.flatten(1)), dim=1)

    def negatives(self) -> torch.Tensor:
        """The remembered teacher embeddings [filled, embed] (no gradient flows into them)."""
        return self.memory[:self.filled]

    def remember(self, f_t: torch.Tensor) -> None:
        rows = f_t.detach()[-len(self.memory):]
        with torch.no_grad():
            embedded = self.embed_teacher(rows.to(self.embed_t.weight.dtype))
        at = (self.next + torch.arange(len(rows), device=rows.device)) % len(self.memory)
        self.memory[at] = embedded.to(self.memory.dtype)
        self.memory_keys[at] = self.keys(rows)
        self.next = (self.next + len(rows)) % len(self.memory)
        self.filled = min(len(self.memory), self.filled + len(rows))


@LOSSES.register("crd", logits=False, features=True, weight=0.8, head=ContrastHead)
def crd(z_s: torch.Tensor, y: torch.Tensor, *, hint: torch.Tensor, f_t: torch.Tensor,
        head: ContrastHead, weight: float = 0.8, **_) -> torch.Tensor:
    """Contrastive representation distillation: the student's embedding of a sample should
    pick out the teacher's embedding of the same sample among many others.

    L = CE(z_s, y) − w · (1/B) Σ_i log [exp(g_s(s_i)·g_t(t_i)/τ) / Σ_{k ∈ batch ∪ memory} exp(g_s(s_i)·g_t(t_k)/τ)]

    g_s, g_t learned linear maps to 128 dimensions, L2-normalised; τ = 0.07; w = 0.8 (the
    paper's). The negatives are the batch's other teacher embeddings and a memory of the
    teacher embeddings of the last 512 cached rows, kept from when their batch passed (no
    gradient flows into them, as in the paper's memory bank). The offline setting changes the
    method: the memory holds teacher embeddings only, so only the student-anchored half of the
    paper's symmetric objective remains (the student's embeddings of other rows are not at
    hand); and the critic is the softmax (InfoNCE) form of the contrastive bound rather than
    the paper's NCE with its constant Z. A memory row whose feature row is a batch row (the
    same sample, seen again) is left out: it would be that row's positive posing as a
    negative, and a second copy of a negative for the others. 512 negatives, not the paper's
    16384: the contrast against M negatives costs B·M·128 multiply-adds a step, which on the
    small students kdcache trains would dominate the step (bench/loss_zoo.py).
    Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020
    (arXiv:1910.10699).
    """
    # a memory row whose feature row is a batch row: a positive, or a negative counted already
    seen = torch.from_numpy(np.isin(head.memory_keys[:head.filled].cpu().numpy(), head.keys(f_t).cpu().numpy()))
    if losses_cpu.usable(z_s, hint):
        return losses_cpu.apply(losses_cpu.crd, z_s, hint, (head.embed_s.weight, head.embed_s.bias,
                                                            head.embed_t.weight, head.embed_t.bias),
                                y=y, f_t=f_t, memory=head.negatives(), seen=seen.numpy(),
                                temperature=CRD_TEMPERATURE, weight=float(weight))
    s = F.normalize(head.embed_s(hint.flatten(1)), dim=1)
    t = head.embed_teacher(f_t)
    scores = s @ torch.cat([t, head.negatives().to(t.dtype)]).T / CRD_TEMPERATURE
    if head.filled:
        mask = torch.cat([torch.zeros(len(t), dtype=torch.bool, device=t.device), seen.to(t.device)])
        scores = scores.masked_fill(mask[None, :], float("-inf"))
    contrast = F.cross_entropy(scores, torch.arange(len(s), device=s.device))
    return F.cross_entropy(z_s, y) + weight * contrast
