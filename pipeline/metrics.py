"""Metrics every student run reports. All take numpy arrays; probabilities are rows summing to 1.

- accuracy: fraction of test rows whose argmax equals the label.
- teacher_agreement: fraction of rows where the student's argmax equals the teacher's.
- kl_teacher_student: KL(p_teacher ‖ p_student) at T = 1, in nats, averaged over rows: how far
  the student's whole distribution is from the teacher's, not just its argmax.
- ece: expected calibration error with 15 equal-width confidence bins (Guo et al., 2017):
  Σ_b |B_b|/N · |accuracy(B_b) − confidence(B_b)|.
"""

from __future__ import annotations

import numpy as np

from pipeline.numerics import softmax


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(pred == labels)) if len(labels) else float("nan")


def teacher_agreement(pred: np.ndarray, teacher_logits: np.ndarray) -> float:
    return float(np.mean(pred == teacher_logits.argmax(1)))


def kl_teacher_student(teacher_logits: np.ndarray, student_probs: np.ndarray) -> float:
    p_t = softmax(teacher_logits.astype(np.float64))
    q = np.clip(student_probs.astype(np.float64), 1e-12, None)
    q /= q.sum(1, keepdims=True)
    return float(np.mean(np.sum(p_t * (np.log(np.clip(p_t, 1e-12, None)) - np.log(q)), axis=1)))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def fit_temperature(scores: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al., 2017): the T > 0 minimising validation NLL of
    softmax(scores / T). Turns margins of models without probabilities (LinearSVC) into
    calibrated probabilities for KL and ECE."""
    from scipy.optimize import minimize_scalar

    s = scores.astype(np.float64)

    def nll(log_t: float) -> float:
        z = s / np.exp(log_t)
        z -= z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]))

    return float(np.exp(minimize_scalar(nll, bounds=(-6, 6), method="bounded").x))
