"""Reference implementations of kdcache's losses: the yardstick of the loss zoo's step-time floor.

Each function computes the same loss as its namesake in :mod:`pipeline.losses`, written the way
the methods' public reference code writes it, independently of kdcache: plain torch graphs and
autograd, the teacher's softmax computed inside the loss from the raw logits ``z_t`` (nothing
precomputed), no NumPy kernels. Formulas follow

- RepDistiller (Tian et al., github.com/HobbitLong/RepDistiller, ``distiller_zoo/``): KD
  (``DistillKL``), FitNets (``HintLoss``), AT (``Attention``), SP (``Similarity``), RKD
  (``RKDLoss``), PKT (``PKT``), CRD (``Embed`` + contrast);
- mdistiller (github.com/megvii-research/mdistiller): DKD (``dkd_loss``);
- the papers' own code: DIST (github.com/hunto/DIST_KD), NKD (github.com/yzd-v/cls_KD,
  ``NKDLoss``), logit standardisation (github.com/sunshangquan/logit-standardization-KD).

Where kdcache deliberately differs from the reference code, the function here is the reference
*adjusted for that difference*, so that the two compute one value (tests/test_loss_zoo.py holds
them equal in value and gradient on random inputs); each adjustment is named in its docstring:

- weights: kdcache's declared defaults (pkt 3·10³, sp 30, at 1: see their docstrings in
  :mod:`pipeline.losses`) instead of the repositories' CIFAR settings; DKD without mdistiller's
  linear warm-up of its term over the first epochs (kdcache has no epoch-dependent weights).
- at: kdcache sums (Q_s − Q_t)² over the map's positions where RepDistiller averages, so the
  reference's mean is multiplied by the number of positions.
- crd: the offline form kdcache documents (InfoNCE over the batch's teacher embeddings and a
  memory of the last rows' teacher embeddings, student-anchored half only) in place of the
  paper's NCE against a memory bank of both networks' embeddings; the memory here is the
  reference's way of keeping one: embeddings with their dataset row indices
  (:class:`Memory`), not kdcache's fingerprints of the rows.

Every function takes the keyword arguments kdcache's trainer passes (and ignores the rest), so
the loss zoo's reference arms call them exactly as kdcache's arms call kdcache's losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses import CRD_MEMORY, CRD_TEMPERATURE, NKD_GAMMA, PEARSON_EPS, PKT_EPS, RKD_ANGLE, RKD_DISTANCE


def ce(z_s, y, **_):
    """Cross-entropy on the labels."""
    return F.cross_entropy(z_s, y)


def _kl_div_kd(z_s, z_t, T):
    """RepDistiller's ``DistillKL``: KL(softmax(z_t/T) ‖ softmax(z_s/T)) · T², summed over
    the batch and divided by its size."""
    log_p_s = F.log_softmax(z_s / T, dim=1)
    p_t = F.softmax(z_t / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="sum") * T ** 2 / z_s.shape[0]


def _standardize(z):
    """Logit standardisation as in the paper's code: (z − mean) / (1e-7 + std), sample std."""
    return (z - z.mean(dim=-1, keepdim=True)) / (1e-7 + z.std(dim=-1, keepdim=True))


def kd(z_s, y, *, z_t, T=4.0, alpha=0.9, standardize=False, **_):
    """Hinton KD as RepDistiller trains it (``-r 0.1 -a 0.9``): (1 − α)·CE + α·DistillKL; with
    ``standardize`` the KL term compares standardised logits (logit-standardization-KD)."""
    soft_s, soft_t = (_standardize(z_s), _standardize(z_t)) if standardize else (z_s, z_t)
    return (1.0 - alpha) * F.cross_entropy(z_s, y) + alpha * _kl_div_kd(soft_s, soft_t, T)


def mse_logits(z_s, y, *, z_t, alpha=0.9, **_):
    """Logit regression (Ba & Caruana): α·MSE(z_s, z_t) + (1 − α)·CE."""
    return alpha * F.mse_loss(z_s, z_t) + (1.0 - alpha) * F.cross_entropy(z_s, y)


def fitnet(z_s, y, *, z_t, hint, f_t, head, T=4.0, alpha=0.9, weight=1.0, standardize=False, **_):
    """KD plus RepDistiller's ``HintLoss`` (MSE of the regressed student feature and the
    teacher's); the regressor is the run's linear adapter (``head.linear``)."""
    regressed = head.linear(hint.view(hint.shape[0], -1))
    return (kd(z_s, y, z_t=z_t, T=T, alpha=alpha, standardize=standardize)
            + weight * F.mse_loss(regressed, f_t.view(f_t.shape[0], -1)))


def _gt_mask(logits, target):
    return torch.zeros_like(logits).scatter_(1, target.reshape(-1, 1), 1).bool()


def _other_mask(logits, target):
    return torch.ones_like(logits).scatter_(1, target.reshape(-1, 1), 0).bool()


def _cat_mask(t, mask1, mask2):
    return torch.cat([(t * mask1).sum(dim=1, keepdim=True), (t * mask2).sum(1, keepdim=True)], dim=1)


def dkd(z_s, y, *, z_t, T=4.0, dkd_alpha=1.0, dkd_beta=8.0, standardize=False, **_):
    """CE + mdistiller's ``dkd_loss`` (binary and non-target KL terms at T, the target pushed
    away by −1000 for the latter), without mdistiller's warm-up."""
    if standardize:
        z_s_soft, z_t_soft = _standardize(z_s), _standardize(z_t)
    else:
        z_s_soft, z_t_soft = z_s, z_t
    gt, other = _gt_mask(z_s, y), _other_mask(z_s, y)
    pred_s = _cat_mask(F.softmax(z_s_soft / T, dim=1), gt, other)
    pred_t = _cat_mask(F.softmax(z_t_soft / T, dim=1), gt, other)
    tckd = F.kl_div(torch.log(pred_s), pred_t, reduction="sum") * T ** 2 / y.shape[0]
    pred_t2 = F.softmax(z_t_soft / T - 1000.0 * gt, dim=1)
    log_pred_s2 = F.log_softmax(z_s_soft / T - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_pred_s2, pred_t2, reduction="sum") * T ** 2 / y.shape[0]
    return F.cross_entropy(z_s, y) + dkd_alpha * tckd + dkd_beta * nckd


def _pearson(a, b, eps=PEARSON_EPS):
    a = a - a.mean(1).unsqueeze(1)
    b = b - b.mean(1).unsqueeze(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist(z_s, y, *, z_t, T=4.0, weight=2.0, standardize=False, **_):
    """CE + DIST (τ² · [β·inter-class + γ·intra-class relation]) with β = γ = ``weight``."""
    if standardize:
        z_s_soft, z_t_soft = _standardize(z_s), _standardize(z_t)
    else:
        z_s_soft, z_t_soft = z_s, z_t
    p_s, p_t = (z_s_soft / T).softmax(dim=1), (z_t_soft / T).softmax(dim=1)
    inter = T ** 2 * (1 - _pearson(p_s, p_t).mean())
    intra = T ** 2 * (1 - _pearson(p_s.transpose(0, 1), p_t.transpose(0, 1)).mean())
    return F.cross_entropy(z_s, y) + weight * inter + weight * intra


def nkd(z_s, y, *, z_t, T=4.0, weight=1.0, standardize=False, **_):
    """CE + w · cls_KD's ``NKDLoss`` (target term at T = 1, normalised non-target term at T,
    γ = 1.5)."""
    n, _c = z_s.shape
    label = y.view(n, 1)
    s_t = torch.gather(F.log_softmax(z_s, dim=1), 1, label)
    t_t = torch.gather(F.softmax(z_t, dim=1), 1, label).detach()
    loss_t = -(t_t * s_t).mean()
    if standardize:
        z_s_soft, z_t_soft = _standardize(z_s), _standardize(z_t)
    else:
        z_s_soft, z_t_soft = z_s, z_t
    mask = torch.ones_like(z_s).scatter_(1, label, 0).bool()
    rest_s, rest_t = z_s_soft[mask].reshape(n, -1), z_t_soft[mask].reshape(n, -1)
    loss_non = -NKD_GAMMA * T ** 2 * (F.softmax(rest_t / T, dim=1) * F.log_softmax(rest_s / T, dim=1)).sum(1).mean()
    return F.cross_entropy(z_s, y) + weight * (loss_t + loss_non)


def _pdist(e, eps=1e-12):
    """RepDistiller's ``RKDLoss.pdist``: distances from ‖a‖² + ‖b‖² − 2a·b, clamped, 0 on
    the diagonal."""
    e_square = e.pow(2).sum(dim=1)
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def rkd(z_s, y, *, hint, f_t, weight=1.0, **_):
    """CE + w · RepDistiller's ``RKDLoss`` (λ_D = 25, λ_A = 50): the teacher's side under
    ``no_grad``, the angle term from the normalised pairwise differences (B³·D)."""
    student, teacher = hint.view(hint.shape[0], -1), f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = _pdist(teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    d = _pdist(student)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        norm_td = F.normalize(teacher.unsqueeze(0) - teacher.unsqueeze(1), p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    norm_sd = F.normalize(student.unsqueeze(0) - student.unsqueeze(1), p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    loss_a = F.smooth_l1_loss(s_angle, t_angle)
    return F.cross_entropy(z_s, y) + weight * (RKD_DISTANCE * loss_d + RKD_ANGLE * loss_a)


def _pkt_conditionals(x, eps):
    norm = torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True))
    x = x / (norm + eps)
    x[x != x] = 0
    k = (torch.mm(x, x.transpose(0, 1)) + 1.0) / 2.0
    return k / torch.sum(k, dim=1, keepdim=True)


def pkt(z_s, y, *, hint, f_t, weight=3000.0, **_):
    """CE + w · RepDistiller's ``PKT.cosine_similarity_loss`` (mean over the B² pairs)."""
    p = _pkt_conditionals(hint.view(hint.shape[0], -1), PKT_EPS)
    q = _pkt_conditionals(f_t.view(f_t.shape[0], -1), PKT_EPS)
    return F.cross_entropy(z_s, y) + weight * torch.mean(q * torch.log((q + PKT_EPS) / (p + PKT_EPS)))


def sp(z_s, y, *, hint, f_t, weight=30.0, **_):
    """CE + w · RepDistiller's ``Similarity.similarity_loss``."""
    bsz = hint.shape[0]
    f_s, f_t = hint.view(bsz, -1), f_t.view(bsz, -1)
    g_s = F.normalize(torch.mm(f_s, torch.t(f_s)))
    g_t = F.normalize(torch.mm(f_t, torch.t(f_t)))
    diff = g_t - g_s
    return F.cross_entropy(z_s, y) + weight * (diff * diff).view(-1, 1).sum(0)[0] / (bsz * bsz)


def _attention(f):
    return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))


def at(z_s, y, *, hint, f_t, weight=1.0, **_):
    """CE + w · RepDistiller's ``Attention.at_loss`` × the map's positions (kdcache sums over
    positions where the reference averages); the larger map average-pooled to the smaller's
    size, as the reference does (here for 1-D maps too)."""
    if hint.shape[2:] != f_t.shape[2:]:
        pool = F.adaptive_avg_pool2d if hint.dim() == 4 else F.adaptive_avg_pool1d
        size = tuple(min(a, b) for a, b in zip(hint.shape[2:], f_t.shape[2:]))
        hint, f_t = pool(hint, size), pool(f_t, size)
    positions = hint[0, 0].numel()
    return F.cross_entropy(z_s, y) + weight * positions * (_attention(hint) - _attention(f_t)).pow(2).mean()


class Memory:
    """The last ``size`` teacher embeddings and their dataset row indices, in a ring (the
    reference's memory bank holds an embedding per dataset index; this one, adjusted to
    kdcache's, only the latest rows)."""

    def __init__(self, size: int = CRD_MEMORY, embed: int = 128):
        self.embeddings = torch.zeros(size, embed)
        self.indices = torch.full((size,), -1, dtype=torch.int64)
        self.filled, self.next = 0, 0

    def remember(self, embeddings: torch.Tensor, idx: torch.Tensor) -> None:
        rows = embeddings.detach()[-len(self.embeddings):]
        at = (self.next + torch.arange(len(rows))) % len(self.embeddings)
        self.embeddings[at] = rows
        self.indices[at] = idx[-len(rows):]
        self.next = (self.next + len(rows)) % len(self.embeddings)
        self.filled = min(len(self.embeddings), self.filled + len(rows))


def _l2(x):
    """RepDistiller's ``Normalize``: x / ‖x‖₂ per row."""
    return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


def crd(z_s, y, *, hint, f_t, head, memory: Memory, idx, weight=0.8, **_):
    """CE + w · InfoNCE of the student's embedding against the batch's teacher embeddings and
    the memory (RepDistiller's ``Embed``: linear then L2-normalised; τ = 0.07); memory rows of
    the batch's own dataset rows are left out by index. Updates ``memory`` with the batch's
    teacher embeddings after computing the loss (as kdcache's head does)."""
    s = _l2(head.embed_s(hint.view(hint.shape[0], -1)))
    t = _l2(head.embed_t(f_t.view(f_t.shape[0], -1)))
    bank = torch.cat([t, memory.embeddings[:memory.filled]])
    logits = torch.mm(s, bank.t()) / CRD_TEMPERATURE
    seen = torch.isin(memory.indices[:memory.filled], idx)
    if seen.any():
        logits = logits.masked_fill(torch.cat([torch.zeros(len(t), dtype=torch.bool), seen])[None, :], float("-inf"))
    contrast = F.cross_entropy(logits, torch.arange(len(s)))
    memory.remember(t.detach(), idx)
    return F.cross_entropy(z_s, y) + weight * contrast


REFERENCES = {"ce": ce, "kd": kd, "mse_logits": mse_logits, "fitnet": fitnet, "dkd": dkd, "dist": dist,
              "nkd": nkd, "rkd": rkd, "pkt": pkt, "sp": sp, "at": at, "crd": crd}
