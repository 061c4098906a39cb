"""The ``lm`` student (a tiny LlamaForCausalLM from a config) trained from token windows whose
targets are a tiny random causal-LM teacher's dense logits — over a padded output layer,
sliced to the tokenizer's ids — encoded per position as a token cache stores them
(pipeline.sparse): every logits mode, every token loss, padding, metrics, the student contract
and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import KdError
from pipeline.sparse import SAMPLE, TOPK, TOPK_SAMPLE, SparseLogits, draw, encode_topk, encode_topk_sample
from pipeline.students import STUDENTS, LMStudent, create_student
from pipeline.students.lm import Windows, head_only, top1

VOCAB, PADDED, T, T_C = 48, 64, 16, 1.0
QUICK = dict(layers=1, width=32, heads=2, epochs=2, batch_size=16, lr=1e-2, device="cpu")


@pytest.fixture(scope="module")
def teacher_windows() -> dict:
    """64 train and 24 val windows: ids from a tiny random Llama teacher's own samples (so there
    is structure to learn), a quarter of them right-padded (one document, pack=false), and the
    teacher's logits at every position (padded outputs set high: they must be sliced away)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=PADDED, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                           max_position_embeddings=T)).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # a peaked teacher: its samples have structure
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, VOCAB, (88, 1), generator=gen)
        for _ in range(T - 1):  # the teacher's own samples over the real ids
            z = teacher(input_ids=ids).logits[:, -1, :VOCAB]
            ids = torch.cat([ids, torch.multinomial(torch.softmax(z, -1), 1, generator=gen)], 1)
        lengths = np.full(88, T)
        lengths[::4] = np.random.default_rng(2).integers(3, T - 1, 22)
        real = torch.arange(T)[None] < torch.from_numpy(lengths)[:, None]
        ids = torch.where(real, ids, torch.zeros_like(ids))  # padding id 0
        z = teacher(input_ids=ids, attention_mask=real.long()).logits.numpy()
    z[..., VOCAB:] = 50.0
    mask = np.zeros((88, T), bool)  # position j has a target: token j + 1 is real
    mask[:, :-1] = real.numpy()[:, 1:]
    segments = np.where(real.numpy(), 0, -1).astype(np.int32)
    return {"ids": ids.numpy().astype(np.int64), "mask": mask, "segments": segments,
            "z": z[..., :VOCAB].astype(np.float32)}


def encoded(w: dict, kind: str, rows: slice) -> Windows:
    z = w["z"][rows]
    n = len(z)
    flat = z.reshape(-1, VOCAB)
    u = np.random.default_rng(3).random((len(flat), 8))
    shaped = lambda a: a.reshape(n, T, -1)  # noqa: E731
    if kind == TOPK:
        ids, values, tail = encode_topk(flat, 8, VOCAB, T_C)
        targets = SparseLogits(TOPK, shaped(ids).astype(np.int64), shaped(values), shaped(tail), VOCAB, T_C)
    elif kind == SAMPLE:
        targets = SparseLogits(SAMPLE, shaped(draw(flat, T_C, u, VOCAB)).astype(np.int64), None, None, VOCAB, T_C)
    else:
        ids, values, tail, drawn = encode_topk_sample(flat, 4, VOCAB, T_C, u)
        targets = SparseLogits(TOPK_SAMPLE, shaped(ids).astype(np.int64), shaped(values), shaped(tail), VOCAB, T_C,
                               shaped(drawn).astype(np.int64))
    return Windows(w["ids"][rows], w["mask"][rows], w["segments"][rows], targets)


def splits(w: dict, kind: str) -> tuple[Windows, Windows]:
    return encoded(w, kind, slice(0, 64)), encoded(w, kind, slice(64, 88))


def test_lm_is_a_registered_token_student():
    needs = STUDENTS.declared("lm")
    assert (needs.kind, needs.loss, needs.modality) == ("inputs", True, "tokens")
    est = create_student("lm", layers=3, width=48, heads=4)
    assert (est.layers, est.width, est.heads, est.loss) == (3, 48, 4, "kd")


@pytest.mark.parametrize("kind, loss", [(TOPK, "kd"), (SAMPLE, "kd"), (TOPK_SAMPLE, "kd"),
                                        (TOPK, "kd_renorm"), (TOPK_SAMPLE, "reverse_kl"), (TOPK, "jsd"),
                                        (TOPK, "ce")])
def test_lm_trains_from_every_mode_and_loss(teacher_windows, kind, loss):
    train, val = splits(teacher_windows, kind)
    before = LMStudent(**QUICK, loss=loss)
    before._build(VOCAB, T)
    untrained = before.evaluate(val)
    est = LMStudent(**QUICK, loss=loss).fit(train, VOCAB, val=val, cache_temperature=T_C)
    scores = est.evaluate(val)
    assert len(est.history_) == 2 and all(np.isfinite(h["train_loss"]) for h in est.history_)
    assert scores["perplexity"] < untrained["perplexity"] and scores["perplexity"] < VOCAB
    assert 0 <= scores["agreement"] <= 1
    assert (scores["kl"] is None) == (kind == SAMPLE)
    if kind != SAMPLE:
        assert scores["kl"] < untrained["kl"]


def test_metrics_against_a_direct_computation(teacher_windows):
    train, val = splits(teacher_windows, TOPK)
    est = LMStudent(**QUICK)
    est._build(VOCAB, T)
    with torch.no_grad():
        real = torch.from_numpy(val.segments >= 0).long()
        z = est.model_(input_ids=torch.from_numpy(val.ids), attention_mask=real).logits[..., :VOCAB].double()
    log_q = torch.log_softmax(z, -1)[:, :-1][torch.from_numpy(val.mask[:, :-1])]
    nxt = torch.from_numpy(val.ids[:, 1:])[torch.from_numpy(val.mask[:, :-1])]
    nll = -log_q.gather(1, nxt[:, None]).mean()
    t = head_only(val.targets).targets(1.0)
    sel = val.mask
    p = np.concatenate([t["t_w"][sel], t["t_tail"][sel][:, None]], 1).astype(np.float64)
    q_all = torch.softmax(z, -1)[torch.from_numpy(sel)].numpy()
    q_head = np.take_along_axis(q_all, t["t_ids"][sel], 1)
    q = np.concatenate([q_head, 1 - q_head.sum(1, keepdims=True)], 1)
    scores = est.evaluate(val)
    assert scores["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-4)
    assert scores["kl"] == pytest.approx(float(np.mean(np.sum(p * np.log(p / q), 1))), rel=1e-3, abs=1e-5)
    agree = (q_all.argmax(1) == top1(val.targets)[sel]).mean()
    assert scores["agreement"] == pytest.approx(agree)


def test_the_student_contract(teacher_windows):
    train, val = splits(teacher_windows, TOPK)
    est = LMStudent(**{**QUICK, "epochs": 1}).fit(train, VOCAB, val=val, cache_temperature=T_C)
    z = est.decision_function(val.ids[:4])
    assert z.shape == (4, T, VOCAB) and est.predict(val.ids[:4]).shape == (4, T)
    assert est.n_params_ == sum(p.numel() for p in est.model_.parameters())
    again = LMStudent(**QUICK).load_tensors(est.tensors(), (T,), VOCAB)
    np.testing.assert_allclose(again.decision_function(val.ids[:4]), z, rtol=1e-5, atol=1e-5)
    deployed = est.deployed_module()
    np.testing.assert_allclose(deployed(torch.from_numpy(val.ids[:4])).detach().numpy(), z, rtol=1e-5, atol=1e-5)


def test_refusals(teacher_windows):
    train, val = splits(teacher_windows, SAMPLE)
    with pytest.raises(KdError, match="loss=reverse_kl compares the student with the teacher's top K"):
        LMStudent(**QUICK, loss="reverse_kl").fit(train, VOCAB, val=val, cache_temperature=T_C)
    with pytest.raises(KdError, match="serves only that one"):
        LMStudent(**QUICK, loss_params={"temperature": 2.0}).fit(train, VOCAB, val=val, cache_temperature=T_C)
    with pytest.raises(KdError, match="width=30 is not a multiple of heads=4"):
        LMStudent(**{**QUICK, "width": 30, "heads": 4}).fit(train, VOCAB, val=val, cache_temperature=T_C)
    with pytest.raises(KdError, match="loss=jsd trains a language model from a token cache; model mlp"):
        create_student("mlp", loss="jsd")
    with pytest.raises(KdError, match="loss=dkd has no form on a token cache"):
        create_student("lm", loss="dkd")


def test_fit_cache_refuses_a_cache_of_classes(small_cache):
    from pipeline.cache import open_cache
    from pipeline.students import StudentData

    with pytest.raises(KdError, match="model lm trains from a token cache .* holds array data"):
        LMStudent(**QUICK).fit_cache(StudentData(open_cache(small_cache)))
