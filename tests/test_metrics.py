"""The metrics every student run reports (pipeline.metrics), on hand-built cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline import metrics
from pipeline.numerics import softmax


def test_accuracy():
    assert metrics.accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == 0.75
    assert metrics.accuracy(np.array([3, 3]), np.array([3, 3])) == 1.0
    assert metrics.accuracy(np.array([0]), np.array([1])) == 0.0
    assert math.isnan(metrics.accuracy(np.array([], np.int64), np.array([], np.int64)))


def test_teacher_agreement():
    teacher = np.array([[5.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 9.0], [1.0, 0.0, 0.0]])  # argmax 0 1 2 0
    assert metrics.teacher_agreement(np.array([0, 1, 2, 0]), teacher) == 1.0
    assert metrics.teacher_agreement(np.array([0, 2, 2, 1]), teacher) == 0.5
    # Agreement is with the teacher's argmax, not with the labels.
    assert metrics.teacher_agreement(np.array([1, 1, 1, 1]), teacher) == 0.25


def test_kl_is_zero_for_identical_distributions():
    z = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [10.0, -10.0, 3.0]])
    assert metrics.kl_teacher_student(z, softmax(z)) == pytest.approx(0.0, abs=1e-9)


def test_kl_hand_value():
    # p_t = softmax(0, ln 3) = (1/4, 3/4), q = (1/2, 1/2): KL = 1/4 ln(1/2) + 3/4 ln(3/2).
    teacher = np.array([[0.0, math.log(3.0)]])
    student = np.array([[0.5, 0.5]])
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert metrics.kl_teacher_student(teacher, student) == pytest.approx(want, rel=1e-9)
    # Direction: KL(teacher ‖ student), so the reverse pair gives another number.
    reverse = metrics.kl_teacher_student(np.zeros((1, 2)), np.array([[0.25, 0.75]]))
    assert reverse == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-9)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(z_t=hnp.arrays(np.float64, (4, 5), elements=st.floats(-10, 10)),
       z_s=hnp.arrays(np.float64, (4, 5), elements=st.floats(-10, 10)))
def test_kl_positive_unless_identical(z_t, z_s):
    kl = metrics.kl_teacher_student(z_t, softmax(z_s))
    assert math.isfinite(kl) and kl >= -1e-12
    if np.abs(softmax(z_t) - softmax(z_s)).max() > 1e-3:
        assert kl > 0


def test_kl_survives_zero_student_probabilities():
    # LinearSVC-style hard probabilities: a zero is clipped, never log(0).
    kl = metrics.kl_teacher_student(np.array([[0.0, 0.0]]), np.array([[1.0, 0.0]]))
    assert math.isfinite(kl) and kl > 5


def _rows(conf: float, k: int = 3) -> list[float]:
    rest = (1.0 - conf) / (k - 1)
    return [conf] + [rest] * (k - 1)


def test_ece_hand_built():
    # Bin of confidence 0.7: 4 rows, 2 correct -> |0.5 − 0.7| = 0.2, weight 4/10.
    # Bin of confidence 0.9: 6 rows, all correct -> |1.0 − 0.9| = 0.1, weight 6/10.
    probs = np.array([_rows(0.7)] * 4 + [_rows(0.9)] * 6)  # argmax is always class 0
    labels = np.array([0, 0, 1, 2] + [0] * 6)
    assert metrics.ece(probs, labels) == pytest.approx(0.4 * 0.2 + 0.6 * 0.1, abs=1e-12)


def test_ece_perfectly_calibrated_and_extremes():
    probs = np.array([_rows(0.5)] * 4)  # confidence 0.5, half correct
    assert metrics.ece(probs, np.array([0, 0, 1, 2])) == pytest.approx(0.0, abs=1e-12)
    one_hot = np.eye(3)[[0, 1, 2, 0]]
    assert metrics.ece(one_hot, np.array([0, 1, 2, 0])) == pytest.approx(0.0, abs=1e-12)  # conf 1, right
    assert metrics.ece(one_hot, np.array([1, 2, 0, 1])) == pytest.approx(1.0, abs=1e-12)  # conf 1, wrong


def test_ece_separates_bins():
    # Two groups that would cancel in one bin (0.55 under-, 0.95 over-confident by the same
    # amount on the same accuracy) must not cancel across 15 bins.
    probs = np.array([_rows(0.55, 2)] * 2 + [_rows(0.95, 2)] * 2)
    labels = np.array([0, 0, 0, 1])  # first bin: 2/2 right; second: 1/2 right
    want = 0.5 * abs(1.0 - 0.55) + 0.5 * abs(0.5 - 0.95)
    assert metrics.ece(probs, labels) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("true_t", [0.5, 2.0, 5.0])
def test_fit_temperature_recovers_known_temperature(true_t):
    rng = np.random.default_rng(0)
    base = rng.normal(0, 2.0, (20000, 6))
    p = softmax(base)
    labels = (p.cumsum(1) > rng.random((len(p), 1))).argmax(1)  # y ~ softmax(base)
    scores = base * true_t  # so softmax(scores / true_t) is the calibrated distribution
    assert metrics.fit_temperature(scores, labels) == pytest.approx(true_t, rel=0.06)


def test_fit_temperature_improves_nll():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1.5, (5000, 4))
    labels = (softmax(base).cumsum(1) > rng.random((5000, 1))).argmax(1)
    scores = base * 8.0  # badly over-confident margins

    def nll(t):
        logp = np.log(softmax(scores / t))
        return -logp[np.arange(len(labels)), labels].mean()

    t = metrics.fit_temperature(scores, labels)
    assert nll(t) < nll(1.0)
    assert nll(t) <= min(nll(t * 0.8), nll(t * 1.25)) + 1e-9
