"""NumPy kernels of the losses for CPU training: each computes a loss's value and its gradients
together, in one pass of array arithmetic, inside one autograd node.

Why: the students kdcache trains are small, and a training step of one is dominated by per-op
costs: each torch op of a loss costs ~5 µs forward and ~10-25 µs in the backward pass, so a
loss of thirty ops (DKD, DIST) added ~0.5-1 ms to a 23k-parameter MLP's ~0.7 ms step. A dozen
NumPy expressions on [B, C] arrays take tens of microseconds. The arithmetic is that of the
torch graphs in :mod:`pipeline.losses`, which stay the reference (and the path on GPUs and
in inference); tests hold every kernel equal to its graph in value and gradient.

Each kernel takes NumPy arrays (the student's logits ``z`` [B, C], its feature ``h`` [B, ...]
or None, then any head parameters) and the teacher's constants, and returns ``(value, grad_z,
grad_h, *grad_params)`` (None for an input it does not read), in the inputs' dtype.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from pipeline.numerics import log_softmax

ENABLED = True  # tests switch the kernels off to compare with the torch graphs


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether a kernel can stand in for the graph: CPU tensors, gradients wanted."""
    present = [t for t in tensors if t is not None]
    return (ENABLED and torch.is_grad_enabled() and all(t.device.type == "cpu" for t in present)
            and any(t.requires_grad for t in present))


class _Kernel(torch.autograd.Function):
    """One autograd node around a NumPy kernel: forward computes the value and the gradients,
    backward scales the saved gradients by the incoming one. The differentiable inputs are
    the student's logits, its feature and any parameters of the loss's head."""

    @staticmethod
    def forward(ctx, kernel, constants, *inputs):
        arrays = [None if x is None else x.detach().numpy() for x in inputs]
        value, *grads = kernel(*arrays, **constants)
        ctx.grads = [None if g is None else torch.from_numpy(np.ascontiguousarray(g)) for g in grads]
        ref = next(x for x in inputs if x is not None)
        return torch.tensor(value, dtype=ref.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, *[None if g is None else g * grad_output for g in ctx.grads])


def apply(kernel: Callable, z: torch.Tensor | None, h: torch.Tensor | None,
          params: tuple[torch.Tensor, ...] = (), **constants) -> torch.Tensor:
    """The loss value as a tensor whose gradients (to ``z``, ``h`` and ``params``) are the
    kernel's. Floating constants are converted to NumPy arrays of the inputs' dtype."""
    dtype = (z if z is not None else h).detach().numpy().dtype

    def array(v: torch.Tensor) -> np.ndarray:
        v = v.detach().numpy()
        return v.astype(dtype, copy=False) if np.issubdtype(v.dtype, np.floating) else v

    consts = {k: array(v) if isinstance(v, torch.Tensor) else v for k, v in constants.items()}
    return _Kernel.apply(kernel, consts, z, h, *params)


# --------------------------------------------------------------------------- helpers

def _onehot(y: np.ndarray, like: np.ndarray) -> np.ndarray:
    out = np.zeros_like(like)
    out[np.arange(len(y)), y] = 1
    return out


def ce_value_grad(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """CE(z, y) averaged over the batch, and its gradient (softmax(z) − onehot(y)) / B."""
    log_p = log_softmax(z)
    rows = np.arange(len(y))
    grad = np.exp(log_p)
    grad[rows, y] -= 1
    return -log_p[rows, y].mean(dtype=z.dtype), grad / z.dtype.type(len(z))


def standardize(z: np.ndarray, eps: float) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """u = (z − mean) / (std + ε) per row (sample std), and the map from ∂L/∂u to ∂L/∂z:
    (g − mean g) / s − c · Σ(g·c) / (s² · σ · (n − 1)), with c = z − mean, s = σ + ε."""
    n = z.shape[1]
    c = z - z.mean(axis=1, keepdims=True)
    sigma = np.sqrt((c * c).sum(axis=1, keepdims=True) / z.dtype.type(n - 1))
    s = sigma + z.dtype.type(eps)
    u = c / s

    def back(g: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            second = np.where(sigma > 0, (g * c).sum(axis=1, keepdims=True) / (s * s * sigma * (n - 1)), 0)
        return (g - g.mean(axis=1, keepdims=True)) / s - c * second.astype(z.dtype)

    return u, back


def _softened(z: np.ndarray, standardized: bool, eps: float):
    if standardized:
        return standardize(z, eps)
    return z, (lambda g: g)


# --------------------------------------------------------------------------- logit losses

def kd(z, _h, *, y, p_t, log_p_t, T, alpha, standardize_eps=None):
    """α·T²·KL(p_t ‖ softmax(u/T)) + (1 − α)·CE(z, y), u = z or Z(z); ∂/∂u of the soft
    term = α·T·(softmax(u/T) − p_t) / B."""
    real = z.dtype.type
    T, alpha, n = real(T), real(alpha), real(len(z))
    u, back = _softened(z, standardize_eps is not None, standardize_eps or 0.0)
    log_q = log_softmax(u / T)
    with np.errstate(over="ignore", invalid="ignore"):
        kl = (p_t * (log_p_t - log_q)).sum(dtype=z.dtype) / n
        ce, g_ce = ce_value_grad(z, y)
        value = alpha * T * T * kl + (real(1) - alpha) * ce
        grad = back(alpha * T * (np.exp(log_q) - p_t) / n) + (real(1) - alpha) * g_ce
    return value, grad, None


def kd_sparse(z, _h, *, y, t_ids, t_w, t_tail, T, alpha):
    """α·T²·sparse_kl + (1 − α)·CE(z, y) (:func:`pipeline.losses.sparse_kl`). With
    q = softmax(z/T), ∂/∂(z/T) of the KL term is q − target: target = w scattered onto the
    listed classes plus w_tail · q_j / q_tail on each class j of the tail."""
    real = z.dtype.type
    T, alpha, n = real(T), real(alpha), real(len(z))
    rows = np.arange(len(z))[:, None]
    log_q = log_softmax(z / T)
    q = np.exp(log_q)
    in_tail = np.ones(z.shape, bool)
    in_tail[rows, t_ids] = False
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        tail_lse = np.where(in_tail, log_q, -np.inf)
        top = tail_lse.max(axis=1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0)
        log_q_tail_exact = np.log(np.exp(tail_lse - top).sum(axis=1)) + top[:, 0]
        log_q_tail = np.maximum(log_q_tail_exact, real(-1e4))
        xlogx = lambda w: np.where(w > 0, w * np.log(np.where(w > 0, w, 1)), 0)  # noqa: E731
        listed = (xlogx(t_w) - t_w * log_q[rows, t_ids]).sum(axis=1)
        kl = (listed + xlogx(t_tail) - t_tail * log_q_tail).sum(dtype=z.dtype) / n
        # a bincount adds repeated ids (sample:K) where fancy assignment would overwrite
        target = np.bincount((rows * z.shape[1] + t_ids).ravel(), t_w.ravel(),
                             minlength=z.size).reshape(z.shape).astype(z.dtype)
        # q_j / q_tail in log space: q_tail underflows when the student is sure of a listed class
        target += np.where(in_tail, t_tail[:, None] * np.exp(log_q - log_q_tail_exact[:, None]), 0)
        ce, g_ce = ce_value_grad(z, y)
        value = alpha * T * T * kl + (real(1) - alpha) * ce
        grad = alpha * T * (q - target) / n + (real(1) - alpha) * g_ce
    return value, grad.astype(z.dtype), None


def _non_target(log_p: np.ndarray, gt: np.ndarray):
    """log(1 − p_y) = logsumexp of the non-target log-probabilities, and the non-target
    distribution p̂ (0 at the target)."""
    masked = np.where(gt, -np.inf, log_p)
    top = masked.max(axis=1, keepdims=True)
    log_rest = top + np.log(np.exp(masked - top).sum(axis=1, keepdims=True))
    return log_rest, np.where(gt, 0, np.exp(masked - log_rest))


def dkd(z, _h, *, y, z_t, T, a, b, standardize_eps=None):
    """CE + a·T²·KL(b_t ‖ b_s) + b·T²·KL(p̂_t ‖ p̂_s) (see :func:`pipeline.losses.dkd`).

    ∂/∂u: a·T·[−b_t0·(e_y − p) + b_t1·p_y·(e_y − p̂)] / B (the binary term, with
    p_y/(1 − p_y)·p_j = p_y·p̂_j kept finite) + b·T·(p̂_s − p̂_t) / B (the non-target term)."""
    real = z.dtype.type
    T, n = real(T), real(len(z))
    gt = _onehot(y, z).astype(bool)
    u, back = _softened(z, standardize_eps is not None, standardize_eps or 0.0)
    u_t = _softened(z_t, standardize_eps is not None, standardize_eps or 0.0)[0]
    log_p_s, log_p_t = log_softmax(u / T), log_softmax(u_t / T)
    rows = np.arange(len(y))
    ls_y, lt_y = log_p_s[rows, y][:, None], log_p_t[rows, y][:, None]
    ls_rest, hat_s = _non_target(log_p_s, gt)
    lt_rest, hat_t = _non_target(log_p_t, gt)
    bt0, bt1 = np.exp(lt_y), np.exp(lt_rest)
    with np.errstate(invalid="ignore", over="ignore"):
        tckd = (bt0 * (lt_y - ls_y) + bt1 * (lt_rest - ls_rest)).sum(dtype=z.dtype) / n
        # KL(p̂_t ‖ p̂_s) over the non-target classes, from log p̂ = log p − log(1 − p_y)
        log_hat_s, log_hat_t = log_p_s - ls_rest, log_p_t - lt_rest
        nckd = np.where(gt, 0, hat_t * (log_hat_t - log_hat_s)).sum(dtype=z.dtype) / n
    ce, g_ce = ce_value_grad(z, y)
    value = ce + (real(a) * tckd + real(b) * nckd) * T * T
    p_s, onehot, p_y = np.exp(log_p_s), gt.astype(z.dtype), np.exp(ls_y)
    g_u = (real(a) * T * (-bt0 * (onehot - p_s) + bt1 * p_y * (onehot - hat_s))
           + real(b) * T * (hat_s - hat_t)) / n
    return value, back(g_u) + g_ce, None


def nkd(z, _h, *, y, z_t, T, weight, gamma, standardize_eps=None, z_t1=None):
    """CE + w·[−p_t[y]·log p_s[y] − γ·T²·Σ_{i≠y} p̂_t log p̂_s] (see :func:`pipeline.losses.nkd`).

    ∂/∂z of the target term: −w·p_t[y]·(e_y − p_s) / B; ∂/∂u of the non-target term:
    w·γ·T·(p̂_s − p̂_t) / B on the non-target classes."""
    real = z.dtype.type
    T, n, w = real(T), real(len(z)), real(weight)
    rows = np.arange(len(y))
    gt = _onehot(y, z).astype(bool)
    log_p1 = log_softmax(z)
    p_t_y = np.exp(log_softmax(z_t if z_t1 is None else z_t1)[rows, y])[:, None]
    target = -(p_t_y[:, 0] * log_p1[rows, y]).mean(dtype=z.dtype)
    u, back = _softened(z, standardize_eps is not None, standardize_eps or 0.0)
    u_t = _softened(z_t, standardize_eps is not None, standardize_eps or 0.0)[0]
    # softmax over the non-target entries at T: the target pushed to −∞
    log_hat_s = log_softmax(np.where(gt, -np.inf, u / T))
    log_hat_t = log_softmax(np.where(gt, -np.inf, u_t / T))
    hat_s, hat_t = np.exp(log_hat_s), np.exp(log_hat_t)
    with np.errstate(invalid="ignore"):  # (0 · −∞ at the target, masked)
        non_target = -np.where(gt, 0, hat_t * log_hat_s).sum(dtype=z.dtype) / n
    ce, g_ce = ce_value_grad(z, y)
    value = ce + w * (target + real(gamma) * T * T * non_target)
    g_target = -w * p_t_y * (gt.astype(z.dtype) - np.exp(log_p1)) / n
    g_u = w * real(gamma) * T * (hat_s - hat_t) / n
    return value, g_ce + g_target + back(g_u), None


def _pearson_rows(a: np.ndarray, b: np.ndarray, eps: float):
    """ρ of each row of ``a`` with the same row of ``b`` (b a constant), and ∂ρ/∂a:
    b̄ / D − N·‖b̄‖·ā / (‖ā‖·D²), with N = ā·b̄, D = ‖ā‖·‖b̄‖ + ε (0 where ‖ā‖ = 0)."""
    ac = a - a.mean(axis=1, keepdims=True)
    bc = b - b.mean(axis=1, keepdims=True)
    na = np.sqrt((ac * ac).sum(axis=1, keepdims=True))
    nb = np.sqrt((bc * bc).sum(axis=1, keepdims=True))
    num = (ac * bc).sum(axis=1, keepdims=True)
    den = na * nb + a.dtype.type(eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        second = np.where(na > 0, num * nb / (na * den * den), 0).astype(a.dtype)
    return (num / den)[:, 0], bc / den - ac * second


def dist(z, _h, *, y, p_t, T, weight, eps, standardize_eps=None):
    """CE + w·T²·[(1 − mean_i ρ(P_s[i], P_t[i])) + (1 − mean_c ρ(P_s[:, c], P_t[:, c]))]
    (see :func:`pipeline.losses.dist`); ∂/∂u through the softmax:
    (1/T)·P_s ⊙ (g − Σ_j g_j·P_s,j)."""
    real = z.dtype.type
    T, w = real(T), real(weight)
    u, back = _softened(z, standardize_eps is not None, standardize_eps or 0.0)
    p_s = np.exp(log_softmax(u / T))
    rho_rows, d_rows = _pearson_rows(p_s, p_t, eps)
    rho_cols, d_cols = _pearson_rows(p_s.T, p_t.T, eps)
    ce, g_ce = ce_value_grad(z, y)
    value = ce + w * T * T * ((real(1) - rho_rows.mean(dtype=z.dtype)) + (real(1) - rho_cols.mean(dtype=z.dtype)))
    g_p = -w * T * T * (d_rows / real(len(z)) + d_cols.T / real(z.shape[1]))
    g_u = p_s * (g_p - (g_p * p_s).sum(axis=1, keepdims=True)) / T
    return value, back(g_u) + g_ce, None


# --------------------------------------------------------------------------- feature losses

def _rownorm(g: np.ndarray, eps: float):
    """g / max(‖g‖, ε) per row (F.normalize), and its backward."""
    norm = np.sqrt((g * g).sum(axis=1, keepdims=True))
    safe = np.maximum(norm, g.dtype.type(eps))
    out = g / safe

    def back(grad: np.ndarray) -> np.ndarray:
        radial = np.where(norm > eps, (grad * out).sum(axis=1, keepdims=True), 0).astype(g.dtype)
        return (grad - radial * out) / safe

    return out, back


def sp(z, h, *, y, f_t, weight):
    """CE + w·(1/B²)·‖rownorm(T·Tᵀ) − rownorm(S·Sᵀ)‖²_F (see :func:`pipeline.losses.sp`);
    ∂/∂S = (M + Mᵀ)·S with M = ∂L/∂(S·Sᵀ)."""
    real = h.dtype.type
    b = len(h)
    s = h.reshape(b, -1)
    t = f_t.reshape(b, -1)
    g_s, back = _rownorm(s @ s.T, 1e-12)
    g_t, _ = _rownorm(t @ t.T, 1e-12)
    diff = g_t - g_s
    ce, g_ce = ce_value_grad(z, y)
    scale = real(weight) / real(b * b)
    m = back(-2 * scale * diff)
    return ce + scale * (diff * diff).sum(dtype=h.dtype), g_ce, ((m + m.T) @ s).reshape(h.shape)


def pkt(z, h, *, y, f_t, weight, eps):
    """CE + w·(1/B²)·Σ q·log((q + ε)/(p + ε)) over the cosine-kernel conditionals (see
    :func:`pipeline.losses.pkt`), back through the row normalisation, the kernel and the
    feature normalisation e = s / (‖s‖ + ε)."""
    real = h.dtype.type
    b = len(h)
    ce, g_ce = ce_value_grad(z, y)
    if b < 2:
        return ce, g_ce, np.zeros_like(h)
    eps = real(eps)

    def conditionals(x):
        norm = np.sqrt((x * x).sum(axis=1, keepdims=True))
        e = x / (norm + eps)
        k = (e @ e.T + 1) / 2
        rowsum = k.sum(axis=1, keepdims=True)
        return k / rowsum, (e, k, rowsum, norm)

    s = h.reshape(b, -1)
    p, (e, k, rowsum, norm) = conditionals(s)
    q, _ = conditionals(f_t.reshape(b, -1))
    scale = real(weight) / real(b * b)
    value = ce + scale * (q * (np.log(q + eps) - np.log(p + eps))).sum(dtype=h.dtype)
    g_p = -scale * q / (p + eps)
    g_k = g_p / rowsum - (g_p * k).sum(axis=1, keepdims=True) / (rowsum * rowsum)
    g_e = (g_k + g_k.T) @ e / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        radial = np.where(norm > 0, (s * g_e).sum(axis=1, keepdims=True) / (norm * (norm + eps) ** 2), 0)
    g_s = g_e / (norm + eps) - s * radial.astype(h.dtype)
    return value, g_ce, g_s.reshape(h.shape)


def at(z, h, *, y, f_t, weight):
    """CE + w·(1/B)·Σ_b ‖Q_s − Q_t‖², Q = rownorm(mean_c A²) (see :func:`pipeline.losses.at`),
    for maps of one spatial size; ∂/∂A = ∂L/∂(mean_c A²)·2A/C."""
    real = h.dtype.type
    b, c = h.shape[:2]
    a = (h * h).mean(axis=1).reshape(b, -1)
    q_s, back = _rownorm(a, 1e-12)
    q_t, _ = _rownorm((f_t * f_t).mean(axis=1).reshape(b, -1), 1e-12)
    diff = q_s - q_t
    ce, g_ce = ce_value_grad(z, y)
    scale = real(weight) / real(b)
    g_a = back(2 * scale * diff).reshape(b, 1, *h.shape[2:])
    return ce + scale * (diff * diff).sum(dtype=h.dtype), g_ce, g_a * 2 * h / real(c)


def fitnet(z, h, weight_matrix, bias, *, y, p_t, log_p_t, f_t, T, alpha, weight, standardize_eps=None):
    """KD + w·mean (h·Wᵀ + b − f_t)² with the adapter's W, b (see :func:`pipeline.losses.fitnet`);
    with r = h·Wᵀ + b and G = 2w·(r − f_t)/(B·D): ∂/∂h = G·W, ∂/∂W = Gᵀ·h, ∂/∂b = Σ_rows G."""
    value, g_z, _ = kd(z, None, y=y, p_t=p_t, log_p_t=log_p_t, T=T, alpha=alpha,
                       standardize_eps=standardize_eps)
    flat = h.reshape(len(h), -1)
    residual = flat @ weight_matrix.T + bias - f_t.reshape(len(f_t), -1)
    real = h.dtype.type
    value = value + real(weight) * (residual * residual).mean(dtype=h.dtype)
    g = real(2 * weight) * residual / real(residual.size)
    return value, g_z, (g @ weight_matrix).reshape(h.shape), g.T @ flat, g.sum(axis=0)


def crd(z, h, w_s, b_s, w_t, b_t, *, y, f_t, memory, seen, temperature, weight):
    """CE + w·InfoNCE(ŝ, [t̂; memory]) with ŝ = rownorm(h·W_sᵀ + b_s), t̂ = rownorm(f_t·W_tᵀ + b_t)
    (see :func:`pipeline.losses.crd`); ``seen`` marks the memory rows left out. With
    G = w·(softmax(S) − I)/B for the scores S = ŝ·bankᵀ/τ: ∂/∂ŝ = G·bank/τ and
    ∂/∂t̂ = G[:, :B]ᵀ·ŝ/τ, then back through the normalisations and the linear maps (the
    memory is a constant)."""
    real = h.dtype.type
    b = len(h)
    flat, teacher = h.reshape(b, -1), f_t.reshape(b, -1)
    s_hat, s_back = _rownorm(flat @ w_s.T + b_s, 1e-12)
    t_hat, t_back = _rownorm(teacher @ w_t.T + b_t, 1e-12)
    bank = np.concatenate([t_hat, memory])
    scores = s_hat @ bank.T / real(temperature)
    if seen.any():
        scores[:, b + np.flatnonzero(seen)] = -np.inf
    log_p = log_softmax(scores)
    rows = np.arange(b)
    contrast = -log_p[rows, rows].mean(dtype=h.dtype)
    ce, g_ce = ce_value_grad(z, y)
    g = np.exp(log_p)
    g[rows, rows] -= 1
    g *= real(weight) / real(b)
    g_s = s_back(g @ bank / real(temperature))
    g_t = t_back(g[:, :b].T @ s_hat / real(temperature))
    return (ce + real(weight) * contrast, g_ce, (g_s @ w_s).reshape(h.shape), g_s.T @ flat,
            g_s.sum(axis=0), g_t.T @ teacher, g_t.sum(axis=0))
