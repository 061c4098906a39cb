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

from pipeline.cache.reader import log_softmax
from pipeline.losses import LOSSES

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


def ref_ce(z_s, y, **_) -> float:
    return np_ce(z_s, y)


def ref_kd(z_s, y, *, z_t, T=4.0, alpha=0.9, **_) -> float:
    """α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α)·CE(z_s, y)  (Hinton et al. 2015)."""
    kl = np.mean(np_kl_rows(np_log_softmax(z_t / T), np_log_softmax(z_s / T)))
    return float(alpha * T * T * kl + (1 - alpha) * np_ce(z_s, y))


def ref_mse_logits(z_s, y, *, z_t, alpha=0.9, **_) -> float:
    """α·mean_c (z_s − z_t)² + (1 − α)·CE  (Ba & Caruana 2014)."""
    return float(alpha * np.mean((z_s - z_t) ** 2) + (1 - alpha) * np_ce(z_s, y))


def ref_fitnet(z_s, y, *, z_t, hint, f_t, T=4.0, alpha=0.9, hint_weight=1.0, **_) -> float:
    """KD + w·mean (hint − f_t)²  (Romero et al. 2015, joint form)."""
    return ref_kd(z_s, y, z_t=z_t, T=T, alpha=alpha) + float(hint_weight * np.mean((hint - f_t) ** 2))


def ref_dkd(z_s, y, *, z_t, T=4.0, dkd_alpha=1.0, dkd_beta=8.0, **_) -> float:
    """CE + a·T²·KL(b_t ‖ b_s) + b·T²·KL(p̂_t ‖ p̂_s)  (Zhao et al., CVPR 2022).

    b = [p_y, 1 − p_y] at temperature T; p̂ = softmax over the non-target logits only, computed
    here by deleting the target column (the torch code masks it with −1000 instead).
    """
    n, k = z_s.shape
    total = 0.0
    for i in range(n):
        ls, lt = np_log_softmax(z_s[i:i + 1] / T)[0], np_log_softmax(z_t[i:i + 1] / T)[0]
        ps_y, pt_y = math.exp(ls[y[i]]), math.exp(lt[y[i]])
        b_s, b_t = np.array([ps_y, 1 - ps_y]), np.array([pt_y, 1 - pt_y])
        tckd = float(np.sum(b_t * (np.log(b_t) - np.log(b_s))))
        rest = [c for c in range(k) if c != y[i]]
        nckd = float(np_kl_rows(np_log_softmax(z_t[i:i + 1, rest] / T),
                                np_log_softmax(z_s[i:i + 1, rest] / T))[0])
        total += (dkd_alpha * tckd + dkd_beta * nckd) * T * T
    return np_ce(z_s, y) + total / n


REFERENCES = {"ce": ref_ce, "kd": ref_kd, "mse_logits": ref_mse_logits, "fitnet": ref_fitnet,
              "dkd": ref_dkd}

# Per loss: keyword arguments used by the property tests, whether it is invariant to adding a
# constant per row to z_s and z_t, and the keyword arguments that leave only its teacher term
# (None: the loss has no teacher term).
CASES = {
    "ce": dict(kwargs={}, shift_invariant=True, teacher_only=None),
    "kd": dict(kwargs={"T": 3.0, "alpha": 0.7}, shift_invariant=True, teacher_only={"alpha": 1.0}),
    "dkd": dict(kwargs={"T": 3.0, "dkd_alpha": 1.0, "dkd_beta": 8.0}, shift_invariant=True,
                teacher_only=None),  # its teacher terms are dkd − CE (checked separately)
    "fitnet": dict(kwargs={"T": 3.0, "alpha": 0.7, "hint_weight": 0.5}, shift_invariant=True,
                   teacher_only={"alpha": 1.0}),
    # mse_logits regresses raw logits, so a per-row constant changes it: the documented exception
    # (KD is softmax-based and shift invariant; logit matching is its T → ∞ limit only for
    # zero-mean logits).
    "mse_logits": dict(kwargs={"alpha": 0.7}, shift_invariant=False, teacher_only={"alpha": 1.0}),
}
HINT_DIM = 3


def test_every_registered_loss_is_covered():
    names = set(LOSSES.names())
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


def call(name: str, t: dict, **kwargs) -> torch.Tensor:
    """Call a loss the way TorchStudent does: every keyword, unused ones ignored."""
    return LOSSES.get(name)(t["z_s"], t["y"], z_t=t["z_t"], hint=t["hint"], f_t=t["f_t"], **kwargs)


def call_ref(name: str, t: dict, **kwargs) -> float:
    a = {k: v.detach().numpy() for k, v in t.items()}
    return REFERENCES[name](a["z_s"], a["y"], z_t=a["z_t"], hint=a["hint"], f_t=a["f_t"], **kwargs)


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
    got = float(call(name, t, **kwargs))
    want = call_ref(name, t, **kwargs)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


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
    t = torch_inputs(case["z_s"], case["z_t"], case["y"], case.get("hint"), case.get("f_t"))
    got = float(call(case["loss"], t, **case["kwargs"]))
    assert got == pytest.approx(case["expected"], rel=1e-5, abs=1e-5)
    # The file still agrees with the numpy reference it was generated from.
    assert call_ref(case["loss"], t, **case["kwargs"]) == pytest.approx(case["expected"], rel=1e-12, abs=1e-12)


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


# =========================================================================== properties

@pytest.mark.parametrize("name", ALL)
@PROPERTY_SETTINGS
@given(t=batches())
def test_finite_and_nonnegative(name, t):
    value = float(call(name, t, **CASES[name]["kwargs"]))
    assert math.isfinite(value)
    assert value >= -1e-9  # every term is a CE, a KL or a squared error


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
    t = {**t, "z_t": t["z_s"].clone(), "f_t": t["hint"].clone()}
    kwargs = CASES[name]["kwargs"]
    if name == "ce":  # no teacher term: the teacher's logits must not matter at all
        other = {**t, "z_t": t["z_s"] + torch.randn_like(t["z_s"])}
        assert float(call(name, t, **kwargs)) == float(call(name, other, **kwargs))
    elif name == "dkd":  # L = CE + teacher terms
        ce = float(LOSSES.get("ce")(t["z_s"], t["y"]))
        assert float(call(name, t, **kwargs)) == pytest.approx(ce, abs=1e-9)
    else:
        value = float(call(name, t, **{**kwargs, **CASES[name]["teacher_only"]}))
        assert value == pytest.approx(0.0, abs=1e-9)


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
    if name == "fitnet":
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
    if name == "fitnet":
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
    specs = [
        ("ce", "ce", {}, base),
        ("kd-T1-a0.5", "kd", {"T": 1.0, "alpha": 0.5}, base),
        ("kd-T4-a0.9", "kd", {"T": 4.0, "alpha": 0.9}, base),
        ("kd-T2-a1", "kd", {"T": 2.0, "alpha": 1.0}, base),
        ("kd-T4-a0", "kd", {"T": 4.0, "alpha": 0.0}, base),
        ("kd-identical-alpha1", "kd", {"T": 4.0, "alpha": 1.0}, {**base, "z_t": z_s}),
        ("kd-hand-two-class", "kd", {"T": 1.0, "alpha": 0.5},
         {"z_s": [[0.0, 0.0]], "z_t": [[0.0, math.log(3.0)]], "y": [1]}),
        ("mse-a0.9", "mse_logits", {"alpha": 0.9}, base),
        ("mse-a0.5", "mse_logits", {"alpha": 0.5}, base),
        ("mse-hand", "mse_logits", {"alpha": 1.0}, {"z_s": [[0.0, 0.0]], "z_t": [[1.0, -1.0]], "y": [0]}),
        ("fitnet-T4-a0.9-w1", "fitnet", {"T": 4.0, "alpha": 0.9, "hint_weight": 1.0}, base),
        ("fitnet-T2-a0.5-w0.3", "fitnet", {"T": 2.0, "alpha": 0.5, "hint_weight": 0.3}, base),
        ("dkd-T4-a1-b8", "dkd", {"T": 4.0, "dkd_alpha": 1.0, "dkd_beta": 8.0}, base),
        ("dkd-T1-a0.5-b2", "dkd", {"T": 1.0, "dkd_alpha": 0.5, "dkd_beta": 2.0}, base),
        ("dkd-identical", "dkd", {"T": 4.0, "dkd_alpha": 1.0, "dkd_beta": 8.0}, {**base, "z_t": z_s}),
    ]
    cases = []
    for case_id, loss, kwargs, inputs in specs:
        a = {k: np.asarray(v, dtype=np.int64 if k == "y" else np.float64) for k, v in inputs.items()}
        n = len(a["y"])
        a.setdefault("hint", np.zeros((n, HINT_DIM)))
        a.setdefault("f_t", np.zeros((n, HINT_DIM)))
        expected = REFERENCES[loss](a["z_s"], a["y"], z_t=a["z_t"], hint=a["hint"], f_t=a["f_t"], **kwargs)
        cases.append({"id": case_id, "loss": loss, "kwargs": kwargs, **inputs, "expected": expected})
    return {"description": "Distillation loss values for fixed inputs, from the float64 numpy "
                           "references in tests/test_losses.py; kd-identical-alpha1, "
                           "kd-hand-two-class, mse-hand and dkd-identical are checked by hand.",
            "regenerate": "python tests/test_losses.py --regenerate",
            "cases": cases}


if __name__ == "__main__" and "--regenerate" in sys.argv:
    REFERENCE_FILE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE_FILE.write_text(json.dumps(_generate(), indent=1) + "\n")
    print(f"wrote {REFERENCE_FILE}")


TEMPERATURE_LOSSES = [name for name in LOSSES if LOSSES.declared(name).temperature]


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


@pytest.mark.parametrize("name", sorted(LOSSES))
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
