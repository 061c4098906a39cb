"""Token losses (pipeline.lm_losses, registered in LOSSES for token caches) against independent
dense implementations: a dense teacher's logits over a padded vocabulary, sliced to the shared
ids, encoded per position as a token cache stores them (pipeline.sparse), and every loss's value
and gradient compared with torch.nn.functional.kl_div / cross_entropy on full distributions,
over masked positions only, in chunks and in one piece."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import lm_losses
from pipeline.errors import KdError
from pipeline.losses import LOSSES, token_form, token_losses
from pipeline.sparse import DENSE, SAMPLE, TOPK, TOPK_SAMPLE, SparseLogits, draw, encode_topk, encode_topk_sample

B, T, VOCAB = 3, 7, 11  # len(tokenizer)
TEACHER_OUT, STUDENT_OUT = 16, 13  # padded output layers: ids >= VOCAB are never tokens
K, M, T_C = 4, 6, 2.0


def setting(seed: int = 0):
    """Token ids, mask (the last position and a padded tail masked), a dense teacher and a
    student, both with padded outputs whose padding is large (it must be sliced away)."""
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(0, VOCAB, (B, T)))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, -1] = False
    mask[1, 4:] = False  # window 1 padded from position 5: position 4 has no next token
    z_t = rng.normal(size=(B, T, TEACHER_OUT)) * 2
    z_t[..., VOCAB:] = 9.0
    z_s = rng.normal(size=(B, T, STUDENT_OUT))
    z_s[..., VOCAB:] = 9.0
    return ids, mask, z_t.astype(np.float32), torch.tensor(z_s, dtype=torch.float64)


def encoded(kind: str, z_t: np.ndarray, seed: int = 0, k: int = K) -> SparseLogits:
    """The teacher's logits, sliced to the shared ids, as a token cache stores them."""
    flat = z_t[..., :VOCAB].reshape(-1, VOCAB)
    u = np.random.default_rng(seed + 1).random((len(flat), M))
    shape = lambda a: a.reshape(B, T, -1).astype(np.int64)  # noqa: E731
    if kind == TOPK:
        ids, values, tail = encode_topk(flat, k, VOCAB, T_C)
        return SparseLogits(TOPK, shape(ids), values.reshape(B, T, -1), tail.reshape(B, T, 2), VOCAB, T_C)
    if kind == SAMPLE:
        return SparseLogits(SAMPLE, shape(draw(flat, T_C, u, VOCAB)), None, None, VOCAB, T_C)
    ids, values, tail, drawn = encode_topk_sample(flat, k, VOCAB, T_C, u)
    return SparseLogits(TOPK_SAMPLE, shape(ids), values.reshape(B, T, -1), tail.reshape(B, T, 2), VOCAB, T_C,
                        shape(drawn))


def as_torch(targets: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in targets.items()}


# --------------------------------------------------------------------------- dense references

def dense(z: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(z[..., :VOCAB].to(torch.float64) / temperature, dim=-1)


def bucketed(p: torch.Tensor, listed: torch.Tensor) -> torch.Tensor:
    """A full distribution [B, T, V] as its listed ids [B, T, K] and one tail bucket."""
    head = p.gather(-1, listed)
    return torch.cat([head, (1 - head.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)


def masked_mean(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return per_position[mask].mean()


def reference(name: str, z_s, ids, mask, z_t, sparse: SparseLogits, temperature: float, alpha: float,
              beta: float = 0.5) -> torch.Tensor:
    """Each loss from the dense teacher (or, for draws, the distribution the draws define),
    with F.kl_div on whole distributions."""
    nxt = lm_losses.next_ids_of(ids)
    ce = F.cross_entropy(z_s[..., :VOCAB].reshape(-1, VOCAB), nxt.reshape(-1), reduction="none").reshape(B, T)
    if name == "ce":
        return masked_mean(ce, mask)
    q = dense(z_s, temperature)
    p = dense(torch.from_numpy(z_t), temperature)
    kl = lambda target, log_input: F.kl_div(log_input, target, reduction="none").sum(-1)  # noqa: E731
    listed = torch.from_numpy(sparse.classes)
    if name == "kd_tail" or (name == "kd" and sparse.kind == DENSE):
        d = kl(bucketed(p, listed), bucketed(q, listed).log())
    elif name == "kd_renorm" or (name == "kd" and sparse.kind == TOPK):
        p_k, q_k = p.gather(-1, listed), q.gather(-1, listed)
        d = kl(p_k / p_k.sum(-1, keepdim=True), (q_k / q_k.sum(-1, keepdim=True)).log())
    elif name == "kd":  # draws: the distribution they define (p̂; topk+sample: exact head, S · p̂)
        target = torch.zeros_like(p)
        drawn = torch.from_numpy(sparse.classes if sparse.kind == SAMPLE else sparse.draws)
        target.scatter_add_(-1, drawn, torch.full(drawn.shape, 1.0 / drawn.shape[-1], dtype=p.dtype))
        if sparse.kind == TOPK_SAMPLE:
            head = p.gather(-1, listed)
            target = target * (1 - head.sum(-1, keepdim=True))
            target.scatter_(-1, listed, head)
        d = kl(target, q.log())
    elif name == "reverse_kl":
        d = kl(bucketed(q, listed), bucketed(p, listed).log())
    elif name == "jsd":
        p_b, q_b = bucketed(p, listed), bucketed(q, listed)
        m = beta * p_b + (1 - beta) * q_b
        d = beta * kl(p_b, m.log()) + (1 - beta) * kl(q_b, m.log())
    return masked_mean(alpha * temperature ** 2 * d + (1 - alpha) * ce, mask)


CASES = [("kd", TOPK), ("kd", SAMPLE), ("kd", TOPK_SAMPLE), ("kd_tail", TOPK), ("kd_renorm", TOPK),
         ("reverse_kl", TOPK), ("jsd", TOPK), ("ce", TOPK)]


@pytest.mark.parametrize("name, kind", CASES)
@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_every_token_loss_matches_a_dense_reference(name, kind, chunk):
    """Value and gradient, at the cache's T (exact there), the student's padded outputs
    sliced to the shared ids, positions in chunks of 1, 5 and all."""
    ids, mask, z_t, z_s = setting(1)
    sparse = encoded(kind, z_t)
    alpha = 0.7
    got_z = z_s.clone().requires_grad_()
    want_z = z_s.clone().requires_grad_()
    got = lm_losses.position_loss(token_form(name, kind), got_z, mask, lm_losses.next_ids_of(ids),
                                  as_torch(sparse.targets(T_C)), vocab=VOCAB, chunk=chunk, T=T_C, alpha=alpha)
    want = reference(name, want_z, ids, mask, z_t, sparse, T_C, alpha)
    got.backward()
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(got_z.grad, want_z.grad, rtol=1e-4, atol=1e-6)
    assert not got_z.grad[..., VOCAB:].any() and not got_z.grad[~mask].any()


def test_jsd_beta_and_the_limits_of_its_mix():
    ids, mask, z_t, z_s = setting(2)
    sparse = encoded(TOPK, z_t)
    t = as_torch(sparse.targets(T_C))
    nxt = lm_losses.next_ids_of(ids)
    for beta in (0.1, 0.9):
        got = lm_losses.position_loss(lm_losses.jsd, z_s, mask, nxt, t, vocab=VOCAB, T=T_C, alpha=1.0,
                                      jsd_beta=beta)
        want = reference("jsd", z_s, ids, mask, z_t, sparse, T_C, 1.0, beta)
        assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert "jsd_beta" in dict(LOSSES.declared("jsd").params)


def test_forward_kl_over_every_id_but_one_is_the_dense_kl():
    """topk:V−1: the tail is one id, so the K + tail KL is the whole KL, at T = 1 and T_c."""
    ids, mask, z_t, z_s = setting(3)
    sparse = encoded(TOPK, z_t, k=VOCAB - 1)
    for temperature in (1.0, T_C):
        got = lm_losses.position_loss(lm_losses.forward_kl, z_s, mask, lm_losses.next_ids_of(ids),
                                      as_torch(sparse.targets(temperature)), vocab=VOCAB, T=temperature, alpha=1.0)
        p, q = dense(torch.from_numpy(z_t), temperature), dense(z_s, temperature)
        want = masked_mean(F.kl_div(q.log(), p, reduction="none").sum(-1), mask) * temperature ** 2
        assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_masked_positions_are_never_read():
    ids, mask, z_t, z_s = setting(4)
    t = as_torch(encoded(TOPK, z_t).targets(T_C))
    nxt = lm_losses.next_ids_of(ids)
    value = lm_losses.position_loss(lm_losses.forward_kl, z_s, mask, nxt, t, vocab=VOCAB, T=T_C, alpha=0.5)
    garbage = {k: v.clone() for k, v in t.items()}
    garbage["t_w"][~mask] = 7.0
    garbage["t_ids"][~mask] = 0
    z_bad, nxt_bad = z_s.clone(), nxt.clone()
    z_bad[~mask] = 1e6
    nxt_bad[~mask] = VOCAB - 1
    again = lm_losses.position_loss(lm_losses.forward_kl, z_bad, mask, nxt_bad, garbage, vocab=VOCAB, T=T_C,
                                    alpha=0.5)
    assert float(again) == float(value)
    none = torch.zeros_like(mask)
    z = z_s.clone().requires_grad_()
    zero = lm_losses.position_loss(lm_losses.forward_kl, z, none, nxt, t, vocab=VOCAB, T=T_C, alpha=0.5)
    zero.backward()
    assert float(zero.detach()) == 0.0 and not z.grad.any()


def test_positions_from_hidden_states_never_build_the_whole_logits():
    """The student's head as a function of positions: the same value and gradients as from the
    [B, T, V] logits, and no [B · T, V] tensor is ever made (chunks of 4 positions)."""
    ids, mask, z_t, _ = setting(5)
    t = as_torch(encoded(TOPK_SAMPLE, z_t).targets(T_C))
    nxt = lm_losses.next_ids_of(ids)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, STUDENT_OUT, bias=False).double()
    whole = lm_losses.position_loss(lm_losses.forward_kl, head(hidden), mask, nxt, t, vocab=VOCAB, T=T_C,
                                    alpha=0.5)
    whole.backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    shapes = []

    def logits_of(at):
        out = head(hidden.reshape(-1, 8)[at])
        shapes.append(out.shape[0])
        return out

    chunked = lm_losses.position_loss(lm_losses.forward_kl, logits_of, mask, nxt, t, vocab=VOCAB, T=T_C,
                                      alpha=0.5, chunk=4)
    chunked.backward()
    assert float(chunked.detach()) == pytest.approx(float(whole.detach()), rel=1e-12)
    torch.testing.assert_close(hidden.grad, grads[0])
    torch.testing.assert_close(head.weight.grad, grads[1])
    assert max(shapes) == 4
    # hidden states and output layer fused with the loss (gradients made in the forward pass):
    # the same, for every form with a kernel
    for form in lm_losses.FUSED:
        hidden.grad, head.weight.grad = None, None
        whole = lm_losses.position_loss(form, head(hidden), mask, nxt, t, vocab=VOCAB, T=T_C, alpha=0.5)
        whole.backward()
        grads = hidden.grad.clone(), head.weight.grad.clone()
        hidden.grad, head.weight.grad = None, None
        fused = lm_losses.position_loss(form, lm_losses.OutputLayer(hidden.reshape(-1, 8), head.weight),
                                        mask, nxt, t, vocab=VOCAB, T=T_C, alpha=0.5, chunk=4)
        fused.backward()
        # (the kernels widen the float32 targets before normalising them: not bit for bit)
        assert float(fused.detach()) == pytest.approx(float(whole.detach()), rel=1e-6), form
        torch.testing.assert_close(hidden.grad, grads[0], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(head.weight.grad, grads[1], rtol=1e-6, atol=1e-9)


def test_kd_keeps_the_tail_when_the_students_tail_underflows():
    """A student with all of its float32 mass on the listed ids (its tail's probabilities
    underflow to 0): the value and gradient are the float64 graph's, the tail's pull included."""
    V = 50
    z = torch.randn(6, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    z[:3, :4] += 200.0
    t_ids, t_w, t_tail = torch.arange(4).repeat(6, 1), torch.full((6, 4), 0.2), torch.full((6,), 0.2)
    nxt = torch.arange(6) * 7

    def graph(u):
        log_z = torch.logsumexp(u, 1)
        log_q_tail = torch.logsumexp(u.scatter(1, t_ids, float("-inf")), 1) - log_z
        kl = ((torch.xlogy(t_w, t_w) - t_w * (u.gather(1, t_ids) - log_z[:, None])).sum(1)
              + torch.xlogy(t_tail, t_tail) - t_tail * log_q_tail)
        return 0.5 * kl + 0.5 * F.cross_entropy(u, nxt, reduction="none")

    got_z, want_z = z.float().requires_grad_(), z.clone().requires_grad_()
    got = lm_losses.forward_kl(got_z, nxt, t_ids=t_ids, t_w=t_w, t_tail=t_tail, T=1.0, alpha=0.5)
    want = graph(want_z)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_z.grad.double(), want_z.grad, rtol=1e-5, atol=1e-5)


def test_vocabulary_rules():
    assert lm_losses.shared_vocabulary(49_152, 49_152, 49_152) == 49_152
    assert lm_losses.shared_vocabulary(151_936, 152_064, 151_665) == 151_665  # padded both sides
    with pytest.raises(KdError, match="the student has 32,000 outputs and the teacher 49,152 for a "
                                      "tokenizer of 49,152 tokens"):
        lm_losses.shared_vocabulary(32_000, 49_152, 49_152)


def test_token_losses_are_declared_and_refused_where_they_have_no_form():
    assert set(token_losses()) == {"ce", "kd", "kd_renorm", "kd_tail", "reverse_kl", "jsd"}
    # kd by what the cache keeps: renormalised over the top K; the sampled estimator from draws
    assert token_form("kd", TOPK) is lm_losses.renormalised_kl
    assert token_form("kd", SAMPLE) is token_form("kd", TOPK_SAMPLE) is lm_losses.forward_kl
    for name in ("kd_renorm", "kd_tail", "reverse_kl", "jsd"):
        needs = LOSSES.declared(name)
        assert needs.tokens_only and needs.temperature and dict(needs.params)["alpha"] == 0.5
    with pytest.raises(KdError, match="loss=dkd has no form on a token cache"):
        token_form("dkd")
