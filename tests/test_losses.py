"""Distillation losses (pipeline.losses.LOSSES) against independent numpy references, saved
reference numbers, and properties that every registered loss must satisfy.

Three layers of checking, each catching a different kind of mistake:

1. ``ref_*``: small float64 numpy implementations written from the papers' formulas (not from
   the torch code: e.g. DKD's non-target distribution drops the target column instead of using
   the −1000 mask trick), compared with the torch losses on random inputs.
2. ``tests/data/loss_reference.json``: numbers saved once from the references for fixed small
   inputs (regenerate with ``python tests/test_losses.py --regenerate``). Two cases are checked
   by hand below, so the file is anchored to arithmetic, not only to the references.
3. Properties over random logits (hypothesis), parametrized over every registered loss.

Adding a loss to the registry without adding it to ``CASES`` and the reference file fails
``test_every_registered_loss_is_covered``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.losses import CRD_EMBED, LOSSES, classification_losses
from pipeline.numerics import log_softmax

REFERENCE_FILE = Path(__file__).parent / "data" / "loss_reference.json"


# =========================================================================== numpy references

def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_ce(z_s: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np_log_softmax(z_s)[np.arange(len(y)), y]))


def np_kl_rows(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) per row from log-probabilities."""
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=1)


def np_softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(z))


def np_standardize(z: np.ndarray) -> np.ndarray:
    """(z − mean) / (sample std + 1e-7) per row (Sun et al. 2024)."""
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, ddof=1, keepdims=True) + 1e-7)


def softened(z: np.ndarray, standardize: bool) -> np.ndarray:
    return np_standardize(z) if standardize else z


def unit(v: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """v / max(‖v‖, eps): the L2 normalisation convention (a zero vector stays zero)."""
    return v / max(float(np.linalg.norm(v)), eps)


def pearson(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b) + eps))


def huber(x: np.ndarray) -> float:
    x = np.abs(x)
    return float(np.mean(np.where(x < 1.0, 0.5 * x * x, x - 0.5)))


def head_arrays(head) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().astype(np.float64) for k, v in head.state_dict().items()}


def ref_ce(z_s, y, **_) -> float:
    return np_ce(z_s, y)


def ref_kd(z_s, y, *, z_t, T=4.0, alpha=0.9, standardize=False, **_) -> float:
    """α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α)·CE(z_s, y)  (Hinton et al. 2015);
    with standardisation the KL compares softmax(Z(z)/T)."""
    s, t = softened(z_s, standardize), softened(z_t, standardize)
    kl = np.mean(np_kl_rows(np_log_softmax(t / T), np_log_softmax(s / T)))
    return float(alpha * T * T * kl + (1 - alpha) * np_ce(z_s, y))


def ref_mse_logits(z_s, y, *, z_t, alpha=0.9, **_) -> float:
    """α·mean_c (z_s − z_t)² + (1 − α)·CE  (Ba & Caruana 2014)."""
    return float(alpha * np.mean((z_s - z_t) ** 2) + (1 - alpha) * np_ce(z_s, y))


def ref_fitnet(z_s, y, *, z_t, hint, f_t, head, T=4.0, alpha=0.9, weight=1.0, standardize=False,
               **_) -> float:
    """KD + w·mean (W·h + b − f_t)²  (Romero et al. 2015, joint form; W, b the adapter)."""
    w = head_arrays(head)
    adapted = hint.reshape(len(hint), -1) @ w["linear.weight"].T + w["linear.bias"]
    return (ref_kd(z_s, y, z_t=z_t, T=T, alpha=alpha, standardize=standardize)
            + float(weight * np.mean((adapted - f_t.reshape(len(f_t), -1)) ** 2)))


def ref_dkd(z_s, y, *, z_t, T=4.0, dkd_alpha=1.0, dkd_beta=8.0, standardize=False, **_) -> float:
    """CE + a·T²·KL(b_t ‖ b_s) + b·T²·KL(p̂_t ‖ p̂_s)  (Zhao et al., CVPR 2022).

    b = [p_y, 1 − p_y] at temperature T; p̂ = softmax over the non-target logits only, computed
    here by deleting the target column (the torch code masks it with −1000 instead).
    """
    n, k = z_s.shape
    s_all, t_all = softened(z_s, standardize), softened(z_t, standardize)
    total = 0.0
    for i in range(n):
        ls, lt = np_log_softmax(s_all[i:i + 1] / T)[0], np_log_softmax(t_all[i:i + 1] / T)[0]
        ps_y, pt_y = math.exp(ls[y[i]]), math.exp(lt[y[i]])
        b_s, b_t = np.array([ps_y, 1 - ps_y]), np.array([pt_y, 1 - pt_y])
        tckd = float(np.sum(b_t * (np.log(b_t) - np.log(b_s))))
        rest = [c for c in range(k) if c != y[i]]
        nckd = float(np_kl_rows(np_log_softmax(t_all[i:i + 1, rest] / T),
                                np_log_softmax(s_all[i:i + 1, rest] / T))[0])
        total += (dkd_alpha * tckd + dkd_beta * nckd) * T * T
    return np_ce(z_s, y) + total / n


def ref_dist(z_s, y, *, z_t, T=4.0, weight=2.0, standardize=False, **_) -> float:
    """CE + w·T²·[(1 − mean_i ρ(P_s[i], P_t[i])) + (1 − mean_c ρ(P_s[:, c], P_t[:, c]))]
    (Huang et al., NeurIPS 2022), ρ written out per row and per column."""
    p_s = np_softmax(softened(z_s, standardize) / T)
    p_t = np_softmax(softened(z_t, standardize) / T)
    n, k = p_s.shape
    inter = 1 - np.mean([pearson(p_s[i], p_t[i]) for i in range(n)])
    intra = 1 - np.mean([pearson(p_s[:, c], p_t[:, c]) for c in range(k)])
    return np_ce(z_s, y) + weight * T * T * (inter + intra)


def ref_nkd(z_s, y, *, z_t, T=4.0, weight=1.0, standardize=False, **_) -> float:
    """CE + w·[−p_t[y]·log p_s[y] − γ·T²·Σ_{i≠y} p̂_t[i] log p̂_s[i]], γ = 1.5
    (Yang et al., ICCV 2023): the non-target classes by deleting the target column."""
    n, k = z_s.shape
    s_all, t_all = softened(z_s, standardize), softened(z_t, standardize)
    total = 0.0
    for i in range(n):
        target = -np_softmax(z_t[i:i + 1])[0, y[i]] * np_log_softmax(z_s[i:i + 1])[0, y[i]]
        rest = [c for c in range(k) if c != y[i]]
        p_hat_t = np_softmax(t_all[i:i + 1, rest] / T)[0]
        log_p_hat_s = np_log_softmax(s_all[i:i + 1, rest] / T)[0]
        total += target - 1.5 * T * T * float(np.sum(p_hat_t * log_p_hat_s))
    return np_ce(z_s, y) + weight * total / n


def ref_rkd(z_s, y, *, hint, f_t, weight=1.0, **_) -> float:
    """CE + w·[25·Huber(ψ_D(s), ψ_D(t)) + 50·Huber(ψ_A(s), ψ_A(t))]  (Park et al., CVPR 2019):
    distances over pairs normalised by their mean over the pairs at a positive distance, and
    cosines of the angle at x_j for every triplet, written as loops."""
    n = len(hint)
    if n < 2:
        return np_ce(z_s, y)
    s, t = hint.reshape(n, -1), f_t.reshape(n, -1)

    def psi_d(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
        positive = d[d > 0]
        return d / max(positive.mean() if positive.size else 0.0, 1e-12)

    def direction(v):  # exact: the formula has no ε (a zero side: a degenerate angle, 0)
        norm = float(np.linalg.norm(v))
        return v / norm if norm > 0 else v

    def psi_a(e):
        return np.array([direction(e[i] - e[j]) @ direction(e[k] - e[j])
                         for j in range(n) for i in range(n) for k in range(n)])

    return np_ce(z_s, y) + weight * (25 * huber(psi_d(s) - psi_d(t)) + 50 * huber(psi_a(s) - psi_a(t)))


def ref_pkt(z_s, y, *, hint, f_t, weight=30000.0, **_) -> float:
    """CE + w·(1/B²)·Σ_ij q_j|i log((q_j|i + ε)/(p_j|i + ε)), cosine kernel (cos + 1)/2
    (Passalis & Tefas, ECCV 2018), ε = 1e-7."""
    n = len(hint)
    if n < 2:
        return np_ce(z_s, y)
    eps = 1e-7

    def conditional(e):
        e = e.reshape(n, -1)
        e = e / (np.linalg.norm(e, axis=1, keepdims=True) + eps)
        k = np.array([[(e[i] @ e[j] + 1) / 2 for j in range(n)] for i in range(n)])
        return k / k.sum(axis=1, keepdims=True)

    p, q = conditional(hint), conditional(f_t)
    return np_ce(z_s, y) + weight * float(np.sum(q * np.log((q + eps) / (p + eps)))) / (n * n)


def ref_sp(z_s, y, *, hint, f_t, weight=3000.0, **_) -> float:
    """CE + w·(1/B²)·‖G̃_t − G̃_s‖²_F with G̃ the row-normalised Gram matrix (Tung & Mori,
    ICCV 2019)."""
    n = len(hint)

    def gram(e):
        e = e.reshape(n, -1)
        return np.array([unit(row) for row in e @ e.T])

    return np_ce(z_s, y) + weight * float(np.sum((gram(f_t) - gram(hint)) ** 2)) / (n * n)


def ref_at(z_s, y, *, hint, f_t, weight=1.0, **_) -> float:
    """CE + w·(1/B)·Σ_b ‖Q_s − Q_t‖², Q = unit(vec(mean_c A_c²))  (Zagoruyko & Komodakis,
    ICLR 2017; summed over positions), for maps of one spatial size."""
    q_s = np.array([unit((a ** 2).mean(axis=0).ravel()) for a in hint])
    q_t = np.array([unit((a ** 2).mean(axis=0).ravel()) for a in f_t])
    return np_ce(z_s, y) + weight * float(np.sum((q_s - q_t) ** 2)) / len(hint)


def ref_crd(z_s, y, *, hint, f_t, head, weight=0.8, **_) -> float:
    """CE − w·(1/B)·Σ_i log softmax_k(g_s(s_i)·g_t(t_k)/τ)_i over the batch's teacher
    embeddings and the remembered ones, τ = 0.07, remembered rows whose feature row is a batch
    row left out (Tian et al., ICLR 2020, InfoNCE form), written per row."""
    w = head_arrays(head)
    n = len(hint)
    s = [unit(h.ravel() @ w["embed_s.weight"].T + w["embed_s.bias"]) for h in hint]
    t = [unit(row @ w["embed_t.weight"].T + w["embed_t.bias"]) for row in f_t.reshape(n, -1)]
    batch_keys = set(head.keys(torch.from_numpy(f_t)).tolist())
    remembered = [row for row, key in zip(head.negatives().detach().numpy().astype(np.float64),
                                          head.memory_keys[:head.filled].tolist())
                  if key not in batch_keys]  # a batch row again: already in the batch
    bank = t + remembered
    total = 0.0
    for i in range(n):
        scores = np.array([s[i] @ row / 0.07 for row in bank])
        top = scores.max()
        total += -(scores[i] - top - math.log(np.sum(np.exp(scores - top))))
    return np_ce(z_s, y) + weight * total / n


REFERENCES = {"ce": ref_ce, "kd": ref_kd, "mse_logits": ref_mse_logits, "fitnet": ref_fitnet,
              "dkd": ref_dkd, "dist": ref_dist, "nkd": ref_nkd, "rkd": ref_rkd, "pkt": ref_pkt,
              "sp": ref_sp, "at": ref_at, "crd": ref_crd}

# Per loss: keyword arguments used by the property tests, whether it is invariant to adding a
# constant per row to z_s and z_t, and how its teacher term vanishes when the student equals
# the teacher: "alpha" (with alpha=1 nothing else is left), "minus_ce" (loss − CE is the teacher
# term), "generic" (minus_ce, on rows whose probabilities vary: Pearson correlations are
# undefined on constant rows), None (no teacher term, or one that does not vanish there).
CASES = {
    "ce": dict(kwargs={}, shift_invariant=True, zero="none"),
    "kd": dict(kwargs={"T": 3.0, "alpha": 0.7}, shift_invariant=True, zero="alpha"),
    "dkd": dict(kwargs={"T": 3.0, "dkd_alpha": 1.0, "dkd_beta": 8.0}, shift_invariant=True,
                zero="minus_ce"),
    "fitnet": dict(kwargs={"T": 3.0, "alpha": 0.7, "weight": 0.5}, shift_invariant=True, zero="alpha"),
    # mse_logits regresses raw logits, so a per-row constant changes it: the documented exception
    # (KD is softmax-based and shift invariant; logit matching is its T → ∞ limit only for
    # zero-mean logits).
    "mse_logits": dict(kwargs={"alpha": 0.7}, shift_invariant=False, zero="alpha"),
    "dist": dict(kwargs={"T": 3.0, "weight": 2.0}, shift_invariant=True, zero="generic"),
    # cross-entropies to the teacher: at equality they are the teacher's entropies, not 0
    "nkd": dict(kwargs={"T": 3.0, "weight": 1.0}, shift_invariant=True, zero=None),
    "rkd": dict(kwargs={"weight": 1.0}, shift_invariant=True, zero="minus_ce"),
    # ε = 1e-7 inside PKT's log lets its KL dip below 0 by at most ~ε·ln(1/ε) per row
    "pkt": dict(kwargs={"weight": 30000.0}, shift_invariant=True, zero="minus_ce", below_zero=0.1),
    "sp": dict(kwargs={"weight": 3000.0}, shift_invariant=True, zero="minus_ce"),
    "at": dict(kwargs={"weight": 1.0}, shift_invariant=True, zero="minus_ce"),
    # contrastive: the positive must still beat the negatives, so it does not vanish
    "crd": dict(kwargs={"weight": 0.8}, shift_invariant=True, zero=None),
}
HINT_DIM = 3
FEATURE_LOSSES = [n for n in sorted(CASES) if LOSSES.declared(n).features]
TEMPERATURE_LOSSES = [n for n in sorted(CASES) if LOSSES.declared(n).temperature]


def test_every_registered_loss_is_covered():
    names = set(classification_losses())  # token losses: tests/test_lm_losses.py
    assert names == set(CASES), f"losses without property cases: {names ^ set(CASES)}"
    assert names == set(REFERENCES), f"losses without a numpy reference: {names ^ set(REFERENCES)}"
    saved = {case["loss"] for case in json.loads(REFERENCE_FILE.read_text())["cases"]}
    assert names <= saved, f"losses without saved reference values: {names - saved}"


# =========================================================================== helpers

def torch_inputs(z_s, z_t, y, hint=None, f_t=None, dtype=torch.float64):
    out = {"z_s": torch.tensor(np.asarray(z_s), dtype=dtype),
           "z_t": torch.tensor(np.asarray(z_t), dtype=dtype),
           "y": torch.tensor(np.asarray(y), dtype=torch.int64)}
    n = out["z_s"].shape[0]
    out["hint"] = torch.tensor(np.zeros((n, HINT_DIM)) if hint is None else np.asarray(hint), dtype=dtype)
    out["f_t"] = torch.tensor(np.zeros((n, HINT_DIM)) if f_t is None else np.asarray(f_t), dtype=dtype)
    return out


def as_maps(name: str, t: dict) -> dict:
    """Map losses read [B, C, L] maps: flat features [B, D] become one-channel maps [B, 1, D]."""
    if LOSSES.declared(name).maps and t["hint"].dim() == 2:
        return {**t, "hint": t["hint"][:, None, :], "f_t": t["f_t"][:, None, :]}
    return t


def make_head(name: str, t: dict, state: dict | None = None):
    """The loss's learned head for these features: seeded, or with the given parameters."""
    factory = LOSSES.declared(name).head
    if factory is None:
        return None
    torch.manual_seed(0)
    head = factory(tuple(t["hint"].shape[1:]), tuple(t["f_t"].shape[1:])).to(t["hint"].dtype)
    if state is not None:
        head.load_state_dict({k: torch.tensor(v, dtype=t["hint"].dtype) for k, v in state.items()})
    return head


def call(name: str, t: dict, head=None, **kwargs) -> torch.Tensor:
    """Call a loss the way TorchStudent does: every keyword, unused ones ignored."""
    t = as_maps(name, t)
    head = head if head is not None else make_head(name, t)
    return LOSSES.get(name)(t["z_s"], t["y"], z_t=t["z_t"], hint=t["hint"], f_t=t["f_t"],
                            head=head, **kwargs)


def call_ref(name: str, t: dict, head=None, **kwargs) -> float:
    t = as_maps(name, t)
    head = head if head is not None else make_head(name, t)
    a = {k: v.detach().numpy() for k, v in t.items()}
    return REFERENCES[name](a["z_s"], a["y"], z_t=a["z_t"], hint=a["hint"], f_t=a["f_t"],
                            head=head, **kwargs)


@st.composite
def batches(draw, max_abs: float = 20.0):
    """Random (z_s, z_t, y, hint, f_t): 1-6 rows, 2-8 classes, logits in [−max_abs, max_abs]."""
    n = draw(st.integers(1, 6))
    k = draw(st.integers(2, 8))
    floats = st.floats(-max_abs, max_abs, allow_nan=False, width=64)
    z_s = draw(hnp.arrays(np.float64, (n, k), elements=floats))
    z_t = draw(hnp.arrays(np.float64, (n, k), elements=floats))
    y = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, k - 1)))
    hint = draw(hnp.arrays(np.float64, (n, HINT_DIM), elements=st.floats(-3, 3, width=64)))
    f_t = draw(hnp.arrays(np.float64, (n, HINT_DIM), elements=st.floats(-3, 3, width=64)))
    return torch_inputs(z_s, z_t, y, hint, f_t)


ALL = sorted(CASES)
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)


# =========================================================================== against references

@pytest.mark.parametrize("name", ALL)
@PROPERTY_SETTINGS
@given(t=batches(), T=st.sampled_from([1.0, 2.0, 4.0, 7.5]), alpha=st.sampled_from([0.0, 0.3, 0.9, 1.0]))
def test_matches_numpy_reference(name, t, T, alpha):
    kwargs = {**CASES[name]["kwargs"]}
    if "T" in kwargs:
        kwargs["T"] = T
    if "alpha" in kwargs:
        kwargs["alpha"] = alpha
    got = float(call(name, t, **kwargs).detach())
    want = call_ref(name, t, **kwargs)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("name", TEMPERATURE_LOSSES)
@PROPERTY_SETTINGS
@given(t=batches(), T=st.sampled_from([1.0, 2.0, 4.0]))
def test_standardized_matches_numpy_reference(name, t, T):
    """Logit standardisation (Sun et al. 2024) is an option of every temperature loss."""
    kwargs = {**CASES[name]["kwargs"], "T": T, "standardize": True}
    assert float(call(name, t, **kwargs)) == pytest.approx(call_ref(name, t, **kwargs), rel=1e-6, abs=1e-6)


# (nkd's target term reads the raw teacher probability p_t[y], as in the paper: not included)
@pytest.mark.parametrize("name", [n for n in TEMPERATURE_LOSSES if n != "nkd"])
def test_standardized_soft_terms_ignore_the_logits_scale(name):
    """Z(a·z + c) = Z(z) for a > 0: with standardisation the soft terms see the teacher's logit
    relations, not their range: rescaling the teacher's logits changes nothing."""
    rng = np.random.default_rng(7)
    t = torch_inputs(rng.normal(0, 2, (6, 5)), rng.normal(0, 2, (6, 5)), rng.integers(0, 5, 6))
    scaled = {**t, "z_t": t["z_t"] * 7.0 - 3.0}
    kwargs = {**CASES[name]["kwargs"], "standardize": True}
    assert float(call(name, scaled, **kwargs)) == pytest.approx(float(call(name, t, **kwargs)), rel=1e-6)
    assert float(call(name, scaled, **CASES[name]["kwargs"])) != pytest.approx(
        float(call(name, t, **CASES[name]["kwargs"])), rel=1e-6)


def test_dkd_reference_with_other_weights():
    rng = np.random.default_rng(3)
    t = torch_inputs(rng.normal(0, 3, (5, 6)), rng.normal(0, 3, (5, 6)), rng.integers(0, 6, 5))
    for T, a, b in [(1.0, 0.0, 1.0), (2.0, 1.0, 0.0), (4.0, 0.5, 8.0)]:
        kw = dict(T=T, dkd_alpha=a, dkd_beta=b)
        assert float(call("dkd", t, **kw)) == pytest.approx(call_ref("dkd", t, **kw), rel=1e-6, abs=1e-8)


def test_dkd_confidently_wrong_student():
    """Regression: the binary (TCKD) term used to clamp p_y at 1e-12, which changed the loss and
    zeroed its gradient when the student gives the target class almost no mass."""
    t = torch_inputs([[-17.0, 9.0, 9.0, 9.0]], [[0.0, 0.0, 0.0, 0.0]], [0])
    kw = dict(T=1.0, dkd_alpha=1.0, dkd_beta=0.0)
    assert float(call("dkd", t, **kw)) == pytest.approx(call_ref("dkd", t, **kw), rel=1e-9)
    z_s = t["z_s"].clone().requires_grad_(True)
    tckd = call("dkd", {**t, "z_s": z_s}, **kw) - LOSSES.get("ce")(z_s, t["y"])
    tckd.backward()
    assert z_s.grad[0, 0] < -0.1  # raising the target logit lowers the TCKD term


def test_float32_matches_float64():
    rng = np.random.default_rng(4)
    z_s, z_t, y = rng.normal(0, 2, (8, 5)), rng.normal(0, 2, (8, 5)), rng.integers(0, 5, 8)
    hint, f_t = rng.normal(size=(8, HINT_DIM)), rng.normal(size=(8, HINT_DIM))
    for name in ALL:
        t64 = torch_inputs(z_s, z_t, y, hint, f_t, torch.float64)
        t32 = torch_inputs(z_s, z_t, y, hint, f_t, torch.float32)
        kw = CASES[name]["kwargs"]
        assert float(call(name, t32, **kw)) == pytest.approx(float(call(name, t64, **kw)), rel=1e-5, abs=1e-5)


# =========================================================================== saved references

def reference_cases() -> list[dict]:
    # A missing file yields no cases here (so --regenerate can import this module); the
    # coverage test above still fails on it.
    return json.loads(REFERENCE_FILE.read_text())["cases"] if REFERENCE_FILE.is_file() else []


@pytest.mark.parametrize("case", reference_cases(), ids=lambda c: c["id"])
def test_saved_reference_values(case):
    t = as_maps(case["loss"], torch_inputs(case["z_s"], case["z_t"], case["y"], case.get("hint"),
                                           case.get("f_t")))
    head = make_head(case["loss"], t, case.get("head"))
    if case.get("memory") is not None:
        head.remember(torch.tensor(case["memory"], dtype=torch.float64))
    got = float(call(case["loss"], t, head=head, **case["kwargs"]))
    assert got == pytest.approx(case["expected"], rel=1e-5, abs=1e-5)
    # The file still agrees with the numpy reference it was generated from.
    assert call_ref(case["loss"], t, head=head, **case["kwargs"]) == pytest.approx(
        case["expected"], rel=1e-12, abs=1e-12)


def test_saved_references_checked_by_hand():
    cases = {c["id"]: c for c in reference_cases()}
    # Identical logits: KL(p ‖ p) = 0, so KD with α = 1 is exactly 0.
    assert cases["kd-identical-alpha1"]["expected"] == 0.0
    # Two classes, T = 1: p_s = (1/2, 1/2), p_t = softmax(0, ln 3) = (1/4, 3/4), CE = ln 2.
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert cases["kd-hand-two-class"]["expected"] == pytest.approx(0.5 * kl + 0.5 * math.log(2), abs=1e-12)
    # MSE of (0, 0) against (1, −1) is 1; with α = 1 nothing else is added.
    assert cases["mse-hand"]["expected"] == pytest.approx(1.0, abs=1e-12)
    # DKD with z_s == z_t: both KL terms vanish and only CE = −log softmax(z)_y remains.
    c = cases["dkd-identical"]
    assert c["expected"] == pytest.approx(np_ce(np.array(c["z_s"]), np.array(c["y"])), abs=1e-12)
    # FitNets through an identity adapter: KD + w·mean (h − f_t)², by hand for one row.
    c = cases["fitnet-hand-identity"]
    kd_part = ref_kd(np.array(c["z_s"]), np.array(c["y"]), z_t=np.array(c["z_t"]), **{
        k: v for k, v in c["kwargs"].items() if k in ("T", "alpha")})
    assert c["expected"] == pytest.approx(kd_part + 0.5 * (1 + 4 + 0) / 3, abs=1e-12)
    # RKD of three collinear points 0, 1, 3 against 0, 2, 6: the same shape scaled, so 0 + CE.
    c = cases["rkd-scaled-copy"]
    assert c["expected"] == pytest.approx(np_ce(np.array(c["z_s"]), np.array(c["y"])), abs=1e-12)
    # AT of maps whose squared activations are proportional: the same attention, so only CE.
    c = cases["at-proportional"]
    assert c["expected"] == pytest.approx(np_ce(np.array(c["z_s"]), np.array(c["y"])), abs=1e-12)


# =========================================================================== properties

@pytest.mark.parametrize("name", ALL)
@PROPERTY_SETTINGS
@given(t=batches())
def test_finite_and_nonnegative(name, t):
    value = float(call(name, t, **CASES[name]["kwargs"]))
    assert math.isfinite(value)
    assert value >= -CASES[name].get("below_zero", 1e-9)  # every term is a CE, a KL, a squared error


@pytest.mark.parametrize("name", ALL)
def test_finite_on_extreme_logits(name):
    rng = np.random.default_rng(0)
    t = torch_inputs(rng.uniform(-1e3, 1e3, (4, 6)), rng.uniform(-1e3, 1e3, (4, 6)),
                     rng.integers(0, 6, 4), dtype=torch.float32)
    assert torch.isfinite(call(name, t, **CASES[name]["kwargs"]))


@pytest.mark.parametrize("name", ALL)
@PROPERTY_SETTINGS
@given(t=batches())
def test_teacher_term_is_zero_when_student_equals_teacher(name, t):
    t = as_maps(name, {**t, "z_t": t["z_s"].clone(), "f_t": t["hint"].clone()})
    kwargs = CASES[name]["kwargs"]
    head = make_head(name, t)
    if name == "fitnet":  # equal means: the adapted student feature is the teacher's
        t["f_t"] = head(t["hint"]).detach()
    ce = float(LOSSES.get("ce")(t["z_s"], t["y"]))
    zero = CASES[name]["zero"]
    if zero == "none":  # no teacher term: the teacher's outputs must not matter at all
        other = {**t, "z_t": t["z_s"] + torch.randn_like(t["z_s"]), "f_t": t["f_t"] + 1.0}
        assert float(call(name, t, **kwargs)) == float(call(name, other, **kwargs))
    elif zero == "alpha":
        assert float(call(name, t, head=head, **{**kwargs, "alpha": 1.0})) == pytest.approx(0.0, abs=1e-9)
    elif zero == "minus_ce":
        assert float(call(name, t, head=head, **kwargs)) == pytest.approx(ce, abs=1e-9)
    elif zero == "generic":
        p = torch.softmax(t["z_s"] / kwargs["T"], 1)
        if len(p) > 1 and (p.std(0) > 0.05).all() and (p.std(1) > 0.05).all():
            # (ρ's ε = 1e-8 in its denominator leaves w·T²·ε/‖p − p̄‖² of the term)
            assert float(call(name, t, **kwargs)) == pytest.approx(ce, abs=1e-4)


def test_dist_is_zero_at_the_teacher_on_generic_rows():
    rng = np.random.default_rng(11)
    z = rng.normal(0, 2, (6, 5))
    t = torch_inputs(z, z, rng.integers(0, 5, 6))
    assert float(call("dist", t, T=2.0)) == pytest.approx(ref_ce(z, t["y"].numpy()), abs=1e-5)


@pytest.mark.parametrize("name", ALL)
@PROPERTY_SETTINGS
@given(t=batches(), data=st.data())
def test_shift_invariance(name, t, data):
    n = t["z_s"].shape[0]
    shifts = st.floats(-50, 50, allow_nan=False, width=64)
    c_s = torch.tensor(data.draw(hnp.arrays(np.float64, (n, 1), elements=shifts)))
    c_t = torch.tensor(data.draw(hnp.arrays(np.float64, (n, 1), elements=shifts)))
    shifted = {**t, "z_s": t["z_s"] + c_s, "z_t": t["z_t"] + c_t}
    kwargs = CASES[name]["kwargs"]
    before, after = float(call(name, t, **kwargs)), float(call(name, shifted, **kwargs))
    if CASES[name]["shift_invariant"]:
        assert after == pytest.approx(before, rel=1e-7, abs=1e-7)


def test_mse_logits_is_not_shift_invariant():
    """The documented exception: raw-logit regression sees a per-row constant."""
    t = torch_inputs([[1.0, 0.0, -1.0]], [[1.0, 0.0, -1.0]], [0])
    shifted = {**t, "z_s": t["z_s"] + 2.0}
    assert float(call("mse_logits", t, alpha=1.0)) == 0.0
    assert float(call("mse_logits", shifted, alpha=1.0)) == pytest.approx(4.0)
    assert float(call("kd", shifted, alpha=1.0)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", ALL)
@PROPERTY_SETTINGS
@given(t=batches(max_abs=5.0))
def test_gradients_flow_to_student_logits(name, t):
    z_s = t["z_s"].clone().requires_grad_(True)
    hint = t["hint"].clone().requires_grad_(True)
    loss = call(name, {**t, "z_s": z_s, "hint": hint}, **CASES[name]["kwargs"])
    loss.backward()
    assert z_s.grad is not None and torch.isfinite(z_s.grad).all()
    if name in FEATURE_LOSSES and len(hint) > 1:  # (one row has no relations to learn from)
        assert hint.grad is not None and torch.isfinite(hint.grad).all()


@pytest.mark.parametrize("name", ALL)
def test_gradients_are_nonzero_on_generic_inputs(name):
    rng = np.random.default_rng(1)
    t = torch_inputs(rng.normal(size=(4, 5)), rng.normal(size=(4, 5)), rng.integers(0, 5, 4),
                     rng.normal(size=(4, HINT_DIM)), rng.normal(size=(4, HINT_DIM)))
    z_s = t["z_s"].clone().requires_grad_(True)
    hint = t["hint"].clone().requires_grad_(True)
    call(name, {**t, "z_s": z_s, "hint": hint}, **CASES[name]["kwargs"]).backward()
    assert z_s.grad.abs().sum() > 0
    if name in FEATURE_LOSSES:
        assert hint.grad.abs().sum() > 0
    # The teacher is a constant target: no gradient is asked of it.
    assert not t["z_t"].requires_grad


def test_kd_direction_is_teacher_to_student():
    """KL(p_t ‖ p_s), not KL(p_s ‖ p_t): swapping student and teacher changes the value."""
    t = torch_inputs([[3.0, 0.0, 0.0]], [[0.0, 1.0, 2.0]], [0])
    swapped = {**t, "z_s": t["z_t"], "z_t": t["z_s"]}
    forward = float(call("kd", t, T=1.0, alpha=1.0))
    assert forward == pytest.approx(ref_kd(np.array([[3.0, 0, 0]]), np.array([0]),
                                           z_t=np.array([[0.0, 1, 2]]), T=1.0, alpha=1.0))
    assert forward != pytest.approx(float(call("kd", swapped, T=1.0, alpha=1.0)))


# =========================================================================== regeneration

def _generate() -> dict:
    z_s = [[1.0, -0.5, 0.25, 2.0], [0.0, 0.0, 0.0, 0.0], [-1.5, 3.0, 0.5, -0.25]]
    z_t = [[2.0, -1.0, 0.0, 1.0], [0.5, -0.5, 1.5, 0.0], [-1.0, 2.5, 1.0, 0.0]]
    y = [3, 2, 1]
    hint = [[0.1, -0.2, 0.3], [0.0, 0.5, -0.5], [1.0, 0.0, 0.25]]
    f_t = [[0.0, 0.0, 0.5], [0.25, 0.5, -1.0], [0.5, 0.5, 0.0]]
    base = {"z_s": z_s, "z_t": z_t, "y": y, "hint": hint, "f_t": f_t}
    identity = {"linear.weight": np.eye(HINT_DIM).tolist(), "linear.bias": [0.0] * HINT_DIM}
    rng = np.random.default_rng(2024)
    adapter = {"linear.weight": rng.normal(0, 0.5, (HINT_DIM, HINT_DIM)).round(3).tolist(),
               "linear.bias": rng.normal(0, 0.1, HINT_DIM).round(3).tolist()}
    contrast = {"embed_s.weight": rng.normal(0, 0.5, (CRD_EMBED, HINT_DIM)).round(3).tolist(),
                "embed_s.bias": rng.normal(0, 0.1, CRD_EMBED).round(3).tolist(),
                "embed_t.weight": rng.normal(0, 0.5, (CRD_EMBED, HINT_DIM)).round(3).tolist(),
                "embed_t.bias": rng.normal(0, 0.1, CRD_EMBED).round(3).tolist()}
    memory = [[1.0, -1.0, 0.5], [0.0, 0.0, 0.5], [-0.5, 2.0, 0.0]]  # row 2 equals f_t's row 0
    # one-channel maps [B, 1, 2, 2] for attention transfer, and a proportional copy
    maps_s = [[[[0.5, -1.0], [0.0, 2.0]]], [[[1.0, 1.0], [0.5, 0.0]]], [[[0.0, 0.3], [-0.7, 1.0]]]]
    maps_t = [[[[1.0, 0.0], [0.5, 1.5]]], [[[0.0, 1.0], [2.0, 0.25]]], [[[0.2, 0.2], [0.2, 0.9]]]]
    specs = [
        ("ce", "ce", {}, base, None),
        ("kd-T1-a0.5", "kd", {"T": 1.0, "alpha": 0.5}, base, None),
        ("kd-T4-a0.9", "kd", {"T": 4.0, "alpha": 0.9}, base, None),
        ("kd-T2-a1", "kd", {"T": 2.0, "alpha": 1.0}, base, None),
        ("kd-T4-a0", "kd", {"T": 4.0, "alpha": 0.0}, base, None),
        ("kd-identical-alpha1", "kd", {"T": 4.0, "alpha": 1.0}, {**base, "z_t": z_s}, None),
        ("kd-hand-two-class", "kd", {"T": 1.0, "alpha": 0.5},
         {"z_s": [[0.0, 0.0]], "z_t": [[0.0, math.log(3.0)]], "y": [1]}, None),
        ("kd-standardized-T2", "kd", {"T": 2.0, "alpha": 0.9, "standardize": True}, base, None),
        ("mse-a0.9", "mse_logits", {"alpha": 0.9}, base, None),
        ("mse-a0.5", "mse_logits", {"alpha": 0.5}, base, None),
        ("mse-hand", "mse_logits", {"alpha": 1.0}, {"z_s": [[0.0, 0.0]], "z_t": [[1.0, -1.0]], "y": [0]}, None),
        # through an identity adapter: the values of FitNets' plain hint loss
        ("fitnet-T4-a0.9-w1", "fitnet", {"T": 4.0, "alpha": 0.9, "weight": 1.0}, base, identity),
        ("fitnet-T2-a0.5-w0.3", "fitnet", {"T": 2.0, "alpha": 0.5, "weight": 0.3}, base, identity),
        ("fitnet-T4-a0.9-adapter", "fitnet", {"T": 4.0, "alpha": 0.9, "weight": 1.0}, base, adapter),
        ("fitnet-hand-identity", "fitnet", {"T": 1.0, "alpha": 0.5, "weight": 0.5},
         {"z_s": [[0.0, 1.0]], "z_t": [[1.0, 0.0]], "y": [0], "hint": [[1.0, 2.0, 0.0]],
          "f_t": [[0.0, 0.0, 0.0]]}, identity),
        ("dkd-T4-a1-b8", "dkd", {"T": 4.0, "dkd_alpha": 1.0, "dkd_beta": 8.0}, base, None),
        ("dkd-T1-a0.5-b2", "dkd", {"T": 1.0, "dkd_alpha": 0.5, "dkd_beta": 2.0}, base, None),
        ("dkd-identical", "dkd", {"T": 4.0, "dkd_alpha": 1.0, "dkd_beta": 8.0}, {**base, "z_t": z_s}, None),
        ("dkd-standardized-T2", "dkd", {"T": 2.0, "standardize": True}, base, None),
        ("dist-T4-w2", "dist", {"T": 4.0, "weight": 2.0}, base, None),
        ("dist-T1-w1", "dist", {"T": 1.0, "weight": 1.0}, base, None),
        ("dist-standardized-T2", "dist", {"T": 2.0, "weight": 2.0, "standardize": True}, base, None),
        ("nkd-T1-w1", "nkd", {"T": 1.0, "weight": 1.0}, base, None),
        ("nkd-T4-w1", "nkd", {"T": 4.0, "weight": 1.0}, base, None),
        ("nkd-standardized-T2", "nkd", {"T": 2.0, "weight": 1.0, "standardize": True}, base, None),
        ("rkd-w1", "rkd", {"weight": 1.0}, base, None),
        ("rkd-scaled-copy", "rkd", {"weight": 1.0},
         {**base, "hint": [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [3.0, 0.0, 0.0]],
          "f_t": [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [6.0, 0.0, 0.0]]}, None),
        ("pkt-w30000", "pkt", {"weight": 30000.0}, base, None),
        ("sp-w3000", "sp", {"weight": 3000.0}, base, None),
        ("at-w1", "at", {"weight": 1.0}, {**base, "hint": maps_s, "f_t": maps_t}, None),
        ("at-proportional", "at", {"weight": 1.0},
         {**base, "hint": maps_s, "f_t": (np.asarray(maps_s) * -3.0).tolist()}, None),
        ("crd-w0.8", "crd", {"weight": 0.8}, base, contrast),
        ("crd-w0.8-memory", "crd", {"weight": 0.8}, {**base, "memory": memory}, contrast),
    ]
    cases = []
    for case_id, loss, kwargs, inputs, head_state in specs:
        inputs = dict(inputs)
        memory_rows = inputs.pop("memory", None)
        t = as_maps(loss, torch_inputs(inputs["z_s"], inputs["z_t"], inputs["y"], inputs.get("hint"),
                                       inputs.get("f_t")))
        head = make_head(loss, t, head_state)
        if memory_rows is not None:
            head.remember(torch.tensor(memory_rows, dtype=torch.float64))
        expected = call_ref(loss, t, head=head, **kwargs)
        cases.append({"id": case_id, "loss": loss, "kwargs": kwargs, **inputs, "head": head_state,
                      "memory": memory_rows, "expected": expected})
    return {"description": "Distillation loss values for fixed inputs, from the float64 numpy "
                           "references in tests/test_losses.py; kd-identical-alpha1, "
                           "kd-hand-two-class, mse-hand, dkd-identical, fitnet-hand-identity, "
                           "rkd-scaled-copy and at-proportional are checked by hand. head: the "
                           "parameters of the loss's learned head; memory: rows put in CRD's memory.",
            "regenerate": "python tests/test_losses.py --regenerate",
            "cases": cases}


if __name__ == "__main__" and "--regenerate" in sys.argv:
    REFERENCE_FILE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE_FILE.write_text(json.dumps(_generate(), indent=1) + "\n")
    print(f"wrote {REFERENCE_FILE}")


TEMPERATURE_LOSSES = [name for name in classification_losses() if LOSSES.declared(name).temperature]


@pytest.mark.parametrize("name", TEMPERATURE_LOSSES)
@PROPERTY_SETTINGS
@given(t=batches())
def test_precomputed_soft_targets_give_the_same_loss_and_gradient(name, t):
    """The trainer hands every loss that declares a temperature the teacher's soft targets
    computed in NumPy; the value and the student's gradient must be those of the loss computing
    them itself (or ignoring them)."""
    kwargs = CASES[name]["kwargs"]
    log_p_t = log_softmax(t["z_t"].numpy() / kwargs["T"], axis=1)
    soft = {"log_p_t": torch.from_numpy(log_p_t), "p_t": torch.from_numpy(np.exp(log_p_t))}
    values, grads = [], []
    for extra in ({}, soft):
        z_s = t["z_s"].clone().requires_grad_(True)
        loss = call(name, {**t, "z_s": z_s}, **kwargs, **extra)
        loss.backward()
        values.append(loss.detach())
        grads.append(z_s.grad)
    torch.testing.assert_close(values[1], values[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(classification_losses()))
@PROPERTY_SETTINGS
@given(t=batches(), data=st.data())
def test_declarations_are_honest(name, t, data):
    """What a loss declares it does not read must not change its value: a loss that declares
    ``logits=False`` ignores ``z_t``, ``features=False`` ignores ``f_t`` and the hint, and
    ``temperature=False`` ignores ``T``. (Students skip reading what is not declared, so an
    undeclared dependency would silently train on missing targets.)"""
    needs = LOSSES.declared(name)
    kwargs = {k: v for k, v in CASES[name]["kwargs"].items() if k != "T"}
    value = float(call(name, t, T=3.0, **kwargs))
    noise = data.draw(st.floats(0.5, 3.0))
    if not needs.logits:
        assert float(call(name, {**t, "z_t": t["z_t"] * -noise}, T=3.0, **kwargs)) == value
    if not needs.features:
        assert float(call(name, {**t, "f_t": t["f_t"] + noise, "hint": t["hint"] - noise},
                          T=3.0, **kwargs)) == value
    if not needs.temperature:
        assert float(call(name, t, T=3.0 + noise, **kwargs)) == value


# =========================================================================== feature losses

def feature_batch(seed: int, n: int = 6, d_s: int = 5, d_t: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    return torch_inputs(rng.normal(size=(n, 4)), rng.normal(size=(n, 4)), rng.integers(0, 4, n),
                        rng.normal(size=(n, d_s)), rng.normal(size=(n, d_t)))


def teacher_term(name: str, t: dict, **kwargs) -> float:
    return float(call(name, t, **CASES[name]["kwargs"], **kwargs)) - ref_ce(t["z_s"].numpy(), t["y"].numpy())


@pytest.mark.parametrize("name", ["rkd", "pkt", "sp", "crd"])
def test_relational_losses_compare_features_of_different_widths(name):
    """Student and teacher features need not share a width (no adapter for relations)."""
    t = feature_batch(0, d_s=5, d_t=7)
    assert float(call(name, t, **CASES[name]["kwargs"])) == pytest.approx(
        call_ref(name, t, **CASES[name]["kwargs"]), rel=1e-6)


@pytest.mark.parametrize("name", ["rkd", "pkt", "sp"])
def test_relational_losses_are_zero_on_a_batch_of_one(name):
    """One row has no relations: the last, short batch of an epoch trains on CE alone."""
    t = feature_batch(1, n=1)
    assert teacher_term(name, t) == pytest.approx(0.0, abs=1e-12)


def test_rkd_is_invariant_to_scaling_rotating_and_moving_the_student_features():
    """Distances are normalised by their mean and angles ignore scale and position: only the
    batch's shape matters (the paper's point)."""
    t = feature_batch(2, d_s=4, d_t=4)
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(4, 4)))
    moved = {**t, "hint": t["hint"] @ torch.tensor(q) * 3.5 + 2.0}
    assert teacher_term("rkd", moved) == pytest.approx(teacher_term("rkd", t), rel=1e-9)


@pytest.mark.parametrize("name", ["pkt", "sp"])
def test_similarity_losses_ignore_the_features_scale(name):
    t = feature_batch(4)
    scaled = {**t, "hint": t["hint"] * 9.0, "f_t": t["f_t"] * 0.1}
    assert teacher_term(name, scaled) == pytest.approx(teacher_term(name, t), rel=1e-5)


def test_at_ignores_channel_count_and_order_and_pools_a_larger_map():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(3, 4))
    y = rng.integers(0, 4, 3)
    f_t = torch.tensor(rng.normal(size=(3, 6, 2, 2)))
    student = torch.tensor(rng.normal(size=(3, 2, 4, 4)))

    def term(hint, f):
        return float(LOSSES.get("at")(torch.tensor(z), torch.tensor(y), hint=hint, f_t=f)) - ref_ce(z, y)

    pooled = torch.nn.functional.adaptive_avg_pool2d(student, (2, 2))
    assert term(student, f_t) == pytest.approx(term(pooled, f_t), rel=1e-12)
    assert term(pooled, f_t) == pytest.approx(ref_at(z, y, hint=pooled.numpy(), f_t=f_t.numpy()) - ref_ce(z, y), rel=1e-9)
    assert term(pooled, f_t[:, [3, 1, 0, 5, 4, 2]]) == pytest.approx(term(pooled, f_t), rel=1e-12)


def test_crd_memory_adds_negatives_and_never_its_own_positive():
    t = feature_batch(6)
    head = make_head("crd", t)
    empty = float(call("crd", t, head=head))
    head.remember(t["f_t"])  # the batch itself, seen again: not negatives of itself
    assert float(call("crd", t, head=head)) == pytest.approx(empty, rel=1e-12)
    others = feature_batch(7)["f_t"]
    head.remember(others)
    with_memory = float(call("crd", t, head=head))
    assert with_memory > empty  # more negatives: a harder contrast
    assert with_memory == pytest.approx(call_ref("crd", t, head=head), rel=1e-9)


def test_crd_memory_is_a_ring_of_the_latest_rows():
    head = LOSSES.declared("crd").head((2,), (3,), memory=5)
    rows = torch.arange(27, dtype=torch.float32).reshape(9, 3)
    for start in (0, 3, 6):
        head.remember(rows[start:start + 3])
    assert head.filled == 5
    assert sorted(head.memory_keys.tolist()) == sorted(head.keys(rows[4:]).tolist())  # rows 4..8
    with torch.no_grad():
        expected = head.embed_teacher(rows[4:])
    got = {k: v for k, v in zip(head.memory_keys.tolist(), head.negatives())}
    for key, row in zip(head.keys(rows[4:]).tolist(), expected):
        torch.testing.assert_close(got[key], row)



# =========================================================================== CPU kernels

@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("name", ALL)
@PROPERTY_SETTINGS
@given(t=batches(max_abs=8.0))
def test_cpu_kernels_equal_the_torch_graphs(name, standardize, t):
    """Training on CPU takes a loss's NumPy kernel (pipeline.losses_cpu) where it has one: its
    value and its gradients (student logits, feature, the head's parameters) must be the torch
    graph's."""
    from pipeline import losses_cpu

    needs = LOSSES.declared(name)
    if standardize and not needs.temperature:
        return
    kwargs = {**CASES[name]["kwargs"], "standardize": standardize} if standardize else dict(CASES[name]["kwargs"])
    if needs.temperature:  # the trainer hands temperature losses the teacher's soft targets
        log_p_t = np_log_softmax(softened(t["z_t"].numpy(), standardize) / kwargs["T"])  # (float64)
        kwargs.update(log_p_t=torch.from_numpy(log_p_t), p_t=torch.from_numpy(np.exp(log_p_t)))
    t = as_maps(name, t)
    if standardize and (t["z_s"].std(1) < 1e-3).any():  # Z(z) of a constant row: 0/0
        return
    head = make_head(name, t)
    values, grads = [], []
    for enabled in (True, False):
        z_s = t["z_s"].clone().requires_grad_(True)
        hint = t["hint"].clone().requires_grad_(True)
        losses_cpu.ENABLED = enabled
        if head is not None:
            head.zero_grad(set_to_none=True)
        try:
            loss = LOSSES.get(name)(z_s, t["y"], z_t=t["z_t"], hint=hint, f_t=t["f_t"], head=head, **kwargs)
        finally:
            losses_cpu.ENABLED = True
        loss.backward()
        values.append(float(loss))
        head_grads = [] if head is None else [p.grad for p in head.parameters()]
        grads.append((z_s.grad, hint.grad, *head_grads))
    assert values[0] == pytest.approx(values[1], rel=1e-7, abs=1e-9)
    for kernel, graph in zip(*grads):
        if graph is None or kernel is None:  # an input the loss does not differentiate
            assert kernel is None or float(kernel.abs().max()) == 0.0
            assert graph is None or float(graph.abs().max()) == 0.0
        else:
            torch.testing.assert_close(kernel, graph, rtol=1e-6, atol=1e-8)
