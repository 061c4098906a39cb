"""Sparse logits (``logits=topk:K`` / ``sample:K`` / ``topk:K+sample:M``): encoding against independent
implementations, the targets students read (exact where the docs say exact), the KD loss on
them (kernel equal to the torch graph, the sampled estimator unbiased), caches round-tripping
the teacher's outputs, and every student training from them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import logsumexp, softmax

from pipeline import losses_cpu
from pipeline.cache import format as fmt
from pipeline.cache import open_cache
from pipeline.errors import KdError
from pipeline.losses import LOSSES, classification_losses, kd, sparse_kl
from pipeline.sparse import (SAMPLE, TOPK, TOPK_SAMPLE, SparseLogits, check_mode, classes_dtype, draw,
                             draw_tail, encode_topk, encode_topk_sample, parse_mode, sample_uniforms)
from pipeline.students import STUDENTS, StudentData, create_student, student_config, student_params
from pipeline.students.features import expand_soft_targets
from stages.cli import main as cli

C = 12


def logits(seed: int, n: int = 16, c: int = C, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, c)) * scale).astype(np.float32)


def topk_of(z: np.ndarray, k: int, T_c: float = 4.0) -> SparseLogits:
    ids, values, tail = encode_topk(z, k, z.shape[1], T_c)
    return SparseLogits(TOPK, ids.astype(np.int64), values, tail, z.shape[1], T_c)


# =========================================================================== modes

@pytest.mark.parametrize("text, kind, k, m", [("dense", "dense", 0, 0), ("topk:1", TOPK, 1, 0),
                                              ("topk:16", TOPK, 16, 0), ("sample:64", SAMPLE, 64, 0),
                                              ("topk:16+sample:8", TOPK_SAMPLE, 16, 8)])
def test_modes_parse(text, kind, k, m):
    mode = parse_mode(text)
    assert (mode.kind, mode.k, mode.m, mode.spec) == (kind, k, m, text)
    assert mode.draws == {SAMPLE: k, TOPK_SAMPLE: m}.get(kind, 0)


@pytest.mark.parametrize("text", ["topk:0", "sample:x", "topk", "top:5", "sample:-1", "Dense", "topk:5 ",
                                  "topk:0+sample:4", "topk:4+sample:0", "sample:4+topk:4", "topk:4+topk:4"])
def test_bad_modes_are_refused_in_one_line(text):
    with pytest.raises(KdError, match="is not a logits mode; use dense, topk:K, sample:K or topk:K"):
        parse_mode(text)


def test_topk_must_leave_a_tail():
    check_mode(parse_mode("topk:9"), 10)
    check_mode(parse_mode("sample:64"), 10)  # draws with replacement: any K
    with pytest.raises(KdError, match="keeps every one of the 10 classes"):
        check_mode(parse_mode("topk:10"), 10)
    check_mode(parse_mode("topk:9+sample:64"), 10)
    with pytest.raises(KdError, match="topk:10\\+sample:2 keeps every one of the 10 classes"):
        check_mode(parse_mode("topk:10+sample:2"), 10)


@pytest.mark.parametrize("c, dtype", [(2, "uint8"), (256, "uint8"), (257, "uint16"),
                                      (65536, "uint16"), (65537, "uint32")])
def test_class_ids_take_the_smallest_type(c, dtype):
    assert classes_dtype(c) == dtype


# =========================================================================== encoding

@given(st.integers(0, 2**31 - 1), st.integers(1, C - 1), st.booleans())
def test_topk_matches_a_sorted_reference(seed, k, ties):
    """The head is a stable sort's, ties across the cut and within the head included (whole
    logits tie often; the encoder's top-k breaks them arbitrarily and must repair that)."""
    z = np.round(logits(seed)) if ties else logits(seed)
    ids, values, tail = encode_topk(z, k, C, 4.0)
    for row, ids_row, values_row, tail_row in zip(z, ids, values, tail):
        reference = sorted(range(C), key=lambda c: (-row[c], c))  # largest first, ties by id
        assert ids_row.tolist() == reference[:k]
        np.testing.assert_array_equal(values_row, row[reference[:k]])
        rest = row[reference[k:]].astype(np.float64)
        np.testing.assert_allclose(tail_row, [logsumexp(rest), logsumexp(rest / 4.0)], rtol=1e-6, atol=1e-6)


@given(st.integers(0, 2**31 - 1), st.integers(1, C - 1), st.sampled_from([1.0, 4.0]),
       st.sampled_from([0.5, 2.0, 4.0]))
def test_topk_targets_are_exact_at_t1_and_the_caches_t(seed, k, T, T_c):
    """At T = 1 and T = T_c the K probabilities and the tail's mass are the teacher's own, and
    the dense stand-in made for T, softened at T, says the same."""
    z = logits(seed)
    sparse = topk_of(z, k, T_c if T == 4.0 else 4.0)
    T = T_c if T == 4.0 else 1.0
    t = sparse.targets(T)
    p = softmax(z.astype(np.float64) / T, axis=1)
    listed = np.take_along_axis(p, sparse.classes, axis=1)
    np.testing.assert_allclose(t["t_w"], listed, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(t["t_tail"], 1 - listed.sum(axis=1), rtol=1e-4, atol=1e-6)
    stand_in = softmax(sparse.dense(T).astype(np.float64) / T, axis=1)
    np.testing.assert_allclose(np.take_along_axis(stand_in, sparse.classes, axis=1), listed, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("T", [0.5, 2.0, 8.0])
def test_topk_targets_at_other_temperatures(T):
    """Exact ratios among the top K at any T; with one class in the tail, exact throughout;
    with several, log S is convex in 1/T: between the known points 1/T = 0, 1/4 and 1 (T > 1)
    the tail's mass is over-estimated, beyond them (T < 1) under-estimated."""
    z = logits(3)
    p = softmax(z.astype(np.float64) / T, axis=1)
    exact = topk_of(z, C - 1).targets(T)
    np.testing.assert_allclose(exact["t_tail"], 1 - np.take_along_axis(
        p, topk_of(z, C - 1).classes, axis=1).sum(1), rtol=1e-4, atol=1e-6)
    sparse = topk_of(z, 4)
    t = sparse.targets(T)
    listed = np.take_along_axis(p, sparse.classes, axis=1)
    np.testing.assert_allclose(t["t_w"] / t["t_w"][:, :1], listed / listed[:, :1], rtol=1e-5)
    true_tail = 1 - listed.sum(1)
    if T > 1:
        assert (t["t_tail"] >= true_tail - 1e-6).all()
    else:
        assert (t["t_tail"] <= true_tail + 1e-6).all()


def test_draws_follow_the_teachers_distribution():
    z = logits(5, n=1, c=6, scale=1.0)
    uniforms = np.random.default_rng(0).random((1, 200_000))
    ids = draw(np.repeat(z, 1, 0), 2.0, uniforms, 6)[0]
    freq = np.bincount(ids, minlength=6) / len(ids)
    np.testing.assert_allclose(freq, softmax(z[0] / 2.0), atol=4e-3)
    assert ids.dtype == np.uint8 and (np.diff(ids.astype(int)) >= 0).all()  # sorted


@given(st.integers(0, 2**31 - 1), st.integers(1, 64))
def test_draws_depend_only_on_the_key(seed, k):
    ids = np.array([5, 17, 99, 4000], np.int64)
    u = sample_uniforms(seed, "train", ids, 2, k)
    assert u.shape == (4, k) and ((0 <= u) & (u < 1)).all()
    np.testing.assert_array_equal(u[2:], sample_uniforms(seed, "train", ids[2:], 2, k))  # any batching
    assert not np.array_equal(u, sample_uniforms(seed, "train", ids, 3, k))  # another view
    assert not np.array_equal(u, sample_uniforms(seed, "val", ids, 2, k))


def test_sample_targets_are_the_empirical_distribution():
    ids = np.array([[1, 1, 1, 4], [0, 2, 3, 3]])
    sparse = SparseLogits(SAMPLE, ids, None, None, 5, 4.0)
    t = sparse.targets(4.0)
    np.testing.assert_array_equal(t["t_w"], [[0.75, 0, 0, 0.25], [0.25, 0.25, 0.5, 0]])
    assert not t["t_tail"].any()
    p = softmax(sparse.dense() / 4.0, axis=1)
    np.testing.assert_allclose(p, [[0, 0.75, 0, 0, 0.25], [0.25, 0, 0.25, 0.5, 0]], atol=1e-4)
    np.testing.assert_array_equal(sparse.top1(), [1, 3])
    with pytest.raises(KdError, match="serves only that one; train with temperature=4"):
        sparse.targets(2.0)


# =========================================================================== topk:K+sample:M

def head_and_tail(z: np.ndarray, k: int, uniforms: np.ndarray, T_c: float = 4.0) -> SparseLogits:
    ids, values, tail, draws = encode_topk_sample(z, k, z.shape[1], T_c, uniforms)
    return SparseLogits(TOPK_SAMPLE, ids.astype(np.int64), values, tail, z.shape[1], T_c,
                        draws.astype(np.int64))


@given(st.integers(0, 2**31 - 1), st.integers(1, C - 1), st.integers(1, 24), st.sampled_from([1.0, 4.0]))
def test_head_and_tail_encoding_round_trips(seed, k, m, T_c):
    """The head is topk:K's to the bit; the draws are an independent inverse-CDF sampler's over
    the tail classes alone (never a head class), sorted; stored ids read back the same, and
    the targets are topk's K probabilities and the draws sharing the tail's mass."""
    z = logits(seed)
    u = np.random.default_rng(seed).random((len(z), m))
    ids, values, tail, draws = encode_topk_sample(z, k, C, T_c, u)
    for got, want in zip((ids, values, tail), encode_topk(z, k, C, T_c)):
        np.testing.assert_array_equal(got, want)
    assert draws.dtype == np.dtype(classes_dtype(C)) and draws.shape == (len(z), m)
    for r in range(len(z)):
        rest = np.setdiff1d(np.arange(C), ids[r])
        cdf = np.cumsum(softmax(z[r, rest].astype(np.float64) / T_c))
        want = np.sort(rest[np.minimum(np.searchsorted(cdf / cdf[-1], u[r], side="right"), len(rest) - 1)])
        np.testing.assert_array_equal(draws[r], want)
    stored = SparseLogits(TOPK_SAMPLE, ids.astype(np.int64), values, tail, C, T_c, draws.astype(np.int64))
    t, head = stored.targets(T_c), topk_of(z, k, T_c).targets(T_c)
    assert t["t_ids"].shape == (len(z), k + m) and not t["t_tail"].any()
    np.testing.assert_array_equal(t["t_ids"][:, :k], ids)
    np.testing.assert_allclose(t["t_w"][:, :k], head["t_w"], rtol=1e-6)
    np.testing.assert_allclose(t["t_w"][:, k:].sum(1), head["t_tail"], rtol=1e-5, atol=1e-7)
    assert stored.top1().tolist() == ids[:, 0].tolist()
    with pytest.raises(KdError, match="serves only that one"):
        stored.targets(T_c * 2)


def test_head_and_tail_stand_in_is_exact_on_the_head():
    z, T_c = logits(51), 4.0
    sparse = head_and_tail(z, 3, np.random.default_rng(0).random((len(z), 6)), T_c)
    p = softmax(sparse.dense(T_c) / T_c, axis=1)
    exact = softmax(z.astype(np.float64) / T_c, axis=1)
    np.testing.assert_allclose(np.take_along_axis(p, sparse.classes, 1),
                               np.take_along_axis(exact, sparse.classes, 1), rtol=1e-3)
    assert (sparse.dense().argmax(1) == sparse.classes[:, 0]).all()


def test_head_and_tail_estimator_is_unbiased_by_exact_enumeration():
    """Every multiset of M draws from the tail, weighted by its probability (C = 6, K = 2,
    M = 3: 4³ ordered draws per row): the expected gradient of kd on topk:K+sample:M targets
    is the dense KD gradient, and the expected loss is the dense KD loss plus
    S · (H(p_R / S) − E H(p̂)), a constant of the teacher (the same for any student)."""
    import itertools

    c, k, m, T = 6, 2, 3, 2.0
    z_t = logits(61, n=2, c=c)
    gaps = []
    for seed in (62, 63):  # two students: the gap must not depend on the student
        z_s = logits(seed, n=2, c=c).astype(np.float64)
        for r in range(len(z_t)):
            ids, values, tail = encode_topk(z_t[r:r + 1], k, c, T)
            rest = np.setdiff1d(np.arange(c), ids[0])
            p = softmax(z_t[r].astype(np.float64) / T)
            mass = p[rest].sum()
            expected_value, expected_grad, expected_entropy = 0.0, np.zeros(c), 0.0
            for drawn in itertools.product(range(len(rest)), repeat=m):
                prob = np.prod(p[rest][list(drawn)] / mass)
                draws = np.sort(rest[list(drawn)])[None]
                t = SparseLogits(TOPK_SAMPLE, ids.astype(np.int64), values, tail, c, T, draws).targets(T)
                student = torch.tensor(z_s[r:r + 1], requires_grad=True)
                value = sparse_kl(student, T, *(torch.from_numpy(t[n]) for n in ("t_ids", "t_w", "t_tail")))
                value.backward()
                expected_value += prob * float(value.detach())
                expected_grad += prob * student.grad.numpy()[0]
                counts = np.bincount(drawn, minlength=len(rest)) / m
                expected_entropy -= prob * float(np.sum(counts[counts > 0] * np.log(counts[counts > 0])))
            student = torch.tensor(z_s[r:r + 1], requires_grad=True)
            dense = torch.nn.functional.kl_div(torch.log_softmax(student / T, 1), torch.from_numpy(p[None]),
                                               reduction="batchmean")
            dense.backward()
            np.testing.assert_allclose(expected_grad, student.grad.numpy()[0], rtol=1e-5, atol=1e-7)
            entropy_tail = -np.sum(p[rest] / mass * np.log(p[rest] / mass))
            gap = expected_value - float(dense)
            assert gap == pytest.approx(mass * (entropy_tail - expected_entropy), rel=1e-4, abs=1e-7)
            gaps.append(gap)
    assert gaps[:2] == pytest.approx(gaps[2:], rel=1e-4, abs=1e-7)


def test_tail_draws_never_take_a_head_class():
    z = np.zeros((3, 4), np.float32)
    u = np.full((3, 5), 1 - 2.0**-53)  # the largest uniform: the last class of the cdf
    drawn = draw_tail(z, np.array([[3], [0], [1]]), 1.0, u, 4)
    assert drawn.tolist() == [[2] * 5, [3] * 5, [3] * 5]
    assert draw_tail(z, np.array([[0], [1], [2]]), 1.0, np.zeros((3, 2)), 4).tolist() == [[1, 1], [0, 0], [0, 0]]


# =========================================================================== the loss

def sparse_targets(kind: str, seed: int, k: int) -> dict[str, torch.Tensor]:
    z = logits(seed)
    if kind == TOPK:
        sparse = topk_of(z, k)
    elif kind == TOPK_SAMPLE:  # k + 5 draws from the tail
        sparse = head_and_tail(z, k, np.random.default_rng(seed).random((len(z), 5)))
    else:
        u = np.random.default_rng(seed).random((len(z), k))
        sparse = SparseLogits(SAMPLE, draw(z, 4.0, u, C).astype(np.int64), None, None, C, 4.0)
    return {name: torch.from_numpy(v) for name, v in sparse.targets(4.0).items()}


@pytest.mark.parametrize("kind, k", [(TOPK, 1), (TOPK, 5), (TOPK, C - 1), (SAMPLE, 3), (SAMPLE, 40),
                                     (TOPK_SAMPLE, 1), (TOPK_SAMPLE, 4), (TOPK_SAMPLE, C - 1)])
def test_sparse_kernel_matches_the_torch_graph(kind, k, monkeypatch):
    targets = sparse_targets(kind, 11, k)
    y = torch.from_numpy(np.random.default_rng(1).integers(0, C, 16))
    values, grads = [], []
    for enabled in (True, False):
        monkeypatch.setattr(losses_cpu, "ENABLED", enabled)
        z_s = torch.from_numpy(logits(12)).requires_grad_()
        loss = kd(z_s, y, T=4.0, alpha=0.9, **targets)
        loss.backward()
        values.append(float(loss.detach()))
        grads.append(z_s.grad.numpy().copy())
    assert values[0] == pytest.approx(values[1], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_topk_kl_is_the_kl_of_the_buckets():
    """An independent form: aggregate both distributions into the K listed classes and one
    tail bucket, then take the KL of those (K + 1)-class distributions, in float64."""
    z_t, z_s, T = logits(21), logits(22), 2.0
    sparse = topk_of(z_t, 3)
    t = sparse.targets(T)
    q = softmax(z_s.astype(np.float64) / T, axis=1)
    q_listed = np.take_along_axis(q, sparse.classes, axis=1)
    teacher = np.concatenate([t["t_w"], t["t_tail"][:, None]], axis=1).astype(np.float64)
    student = np.concatenate([q_listed, 1 - q_listed.sum(1, keepdims=True)], axis=1)
    reference = np.mean(np.sum(teacher * np.log(teacher / student), axis=1))
    value = sparse_kl(torch.from_numpy(z_s), T, *(torch.from_numpy(t[k]) for k in ("t_ids", "t_w", "t_tail")))
    assert float(value) == pytest.approx(reference, rel=1e-5)


def test_sampled_gradient_is_unbiased():
    """Averaged over many independent draws, the gradient of KD from sampled classes is KD's
    gradient from the dense logits."""
    z_t, y = logits(31, n=4), torch.tensor([0, 1, 2, 3])
    dense = torch.from_numpy(logits(32, n=4)).requires_grad_()
    kd(dense, y, z_t=torch.from_numpy(z_t), T=4.0, alpha=1.0).backward()
    total, trials = np.zeros_like(z_t), 1000
    rng = np.random.default_rng(0)
    for _ in range(trials):
        ids = draw(z_t, 4.0, rng.random((4, 8)), C).astype(np.int64)
        t = SparseLogits(SAMPLE, ids, None, None, C, 4.0).targets(4.0)
        z_s = torch.from_numpy(logits(32, n=4)).requires_grad_()
        kd(z_s, y, T=4.0, alpha=1.0, **{k: torch.from_numpy(v) for k, v in t.items()}).backward()
        total += z_s.grad.numpy()
    # each gradient entry is T · (q − p̂) / B: p̂ a mean of K · trials Bernoulli(p) draws
    p = softmax(z_t.astype(np.float64) / 4.0, axis=1)
    sigma = 4.0 / 4 * np.sqrt(p * (1 - p) / (8 * trials))
    assert (np.abs(total / trials - dense.grad.numpy()) <= 5 * sigma + 1e-6).all()


def test_only_kd_declares_a_sparse_form():
    assert [name for name in LOSSES.names() if LOSSES.declared(name).sparse] == ["kd"]


# =========================================================================== caches

MODES = ("topk:1", "topk:2", "sample:4", "topk:1+sample:2")
# every student trains from these; topk+sample reads as topk (stand-in) or as its targets (kd,
# logreg_soft), which test_head_and_tail_caches_train_students covers
STUDENT_MODES = MODES[:3]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, builder) -> dict[str, object]:
    """A float32 dense cache and one cache per sparse mode, of the same teacher and rows."""
    work = tmp_path_factory.mktemp("sparse")
    out = {}
    for mode in ("dense",) + MODES:
        root = work / mode.replace(":", "-")
        builder(root, work, dtype="float32", logits=mode)
        out[mode] = open_cache(root)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_caches_store_what_the_mode_keeps(caches, mode):
    dense, cache = caches["dense"], caches[mode]
    m = cache.manifest
    parsed = parse_mode(mode)
    kind, k = parsed.kind, parsed.k
    assert m["format_version"] == 3 and m["logits"]["mode"] == kind and m["logits"]["k"] == int(k)
    assert not (cache.root / fmt.ARRAYS / "train" / "logits").exists()
    for split in cache.splits:
        z = dense.raw_logits(split)
        sparse = cache.sparse_logits(split)
        assert cache._array(fmt.sparse_key(split, kind.partition("+")[0], "classes")).dtype == np.uint8
        if kind == TOPK_SAMPLE:  # both kinds' arrays; the draws keyed as sample:M's
            assert m["logits"]["m"] == parsed.m and m["logits"]["tail_temperatures"] == [1.0, 4.0]
            assert cache._array(fmt.sparse_key(split, SAMPLE, "classes")).shape[1:] == (1, parsed.m)
            u = sample_uniforms(m["logits"]["seed"], split, cache.sample_ids(split), 0, parsed.m)
            ids, values, tail, draws = encode_topk_sample(z, k, cache.num_classes, cache.temperature, u)
            for got, want in zip((sparse.classes, sparse.values, sparse.tail, sparse.draws),
                                 (ids, values, tail, draws)):
                np.testing.assert_array_equal(got, want)
        elif kind == TOPK:
            ids, values, tail = encode_topk(z, int(k), cache.num_classes, cache.temperature)
            np.testing.assert_array_equal(sparse.classes, ids)
            np.testing.assert_array_equal(sparse.values, values)
            np.testing.assert_array_equal(sparse.tail, tail)
        else:
            u = sample_uniforms(m["logits"]["seed"], split, cache.sample_ids(split), 0, int(k))
            np.testing.assert_array_equal(sparse.classes, draw(z, cache.temperature, u, cache.num_classes))
        # the index is the teacher's, whatever the cache keeps of its logits
        assert cache.index(split).select(["teacher_pred", "correct"]).equals(
            dense.index(split).select(["teacher_pred", "correct"]))
        np.testing.assert_allclose(cache.index(split).column("entropy").to_numpy(),
                                   dense.index(split).column("entropy").to_numpy(), rtol=1e-6)


def test_streams_carry_sparse_logits_joined_to_their_sample(caches):
    cache = caches["topk:2"]
    whole = cache.sparse_logits("train")
    row_of = {sid: r for r, sid in enumerate(cache.sample_ids("train"))}
    for batch in cache.stream("train", batch_size=50, seed=3):
        assert batch.logits is None
        rows = [row_of[s] for s in batch.sample_id]
        np.testing.assert_array_equal(batch.sparse.classes, whole.classes[rows])
        np.testing.assert_array_equal(batch.sparse.values, whole.values[rows])
        np.testing.assert_array_equal(batch.sparse.tail, whole.tail[rows])


def test_a_sparse_cache_is_another_cache(caches, builder):
    """Building topk at the path of a dense cache is refused (other logits), not mixed in."""
    root = caches["dense"].root
    with pytest.raises(KdError, match=r"other logits \(logits=dense, this one is topk:2\)"):
        builder(root, root.parent, dtype="float32", logits="topk:2")


def test_sparse_caches_with_views(builder, tmp_path):
    root = tmp_path / "cache"
    builder(root, tmp_path, logits="topk:2", views=3, augment="shift:1")
    cache = open_cache(root)
    assert cache.views("train") == 3 and cache.manifest["format_version"] == 3
    assert cache._array(fmt.sparse_key("train", TOPK, "tail")).shape == (240, 3, 2)
    assert not np.array_equal(cache.sparse_logits("train", view=0).values,
                              cache.sparse_logits("train", view=2).values)
    data = StudentData(cache)
    assert data.teacher_logits("train").shape == (720, 3)
    assert data.sparse_targets("train", 4.0)["t_ids"].shape == (720, 2)
    every = cache.sparse_logits_every_view("train", 3)  # one read, rows r · 3 + v
    for v in range(3):
        one = cache.sparse_logits("train", view=v)
        np.testing.assert_array_equal(every.classes[v::3], one.classes)
        np.testing.assert_array_equal(every.values[v::3], one.values)
        np.testing.assert_array_equal(every.tail[v::3], one.tail)


@pytest.mark.parametrize("mode", MODES)
def test_verify_passes_and_catches_a_changed_teacher_output(caches, mode, tmp_path, capsys):
    import shutil

    root = caches[mode].root
    assert cli(["verify", f"cache={root}", "rows=40", "--json"]) == 0
    checks = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checks"]
    assert checks["teacher fidelity"].startswith("ok (40 rows")
    # Rewrite one row's stored classes (and the checksums, so only fidelity can tell)
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    import zarr

    from pipeline.cache.format import read_manifest, write_manifest

    drawn = parse_mode(mode).draws  # topk+sample: its draws are what is changed
    key = fmt.sparse_key("val", SAMPLE if drawn else TOPK, "classes")
    arr = zarr.open_array(bad / fmt.ARRAYS / key, mode="r+")
    block = arr[:]
    block[:, 0] = (block[:, 0] + 1) % 3 if not drawn else np.sort((block[:, 0] + 1) % 3, axis=-1)
    arr[:] = block
    manifest = read_manifest(bad)
    import hashlib

    for rec in manifest["shards"]["val"]:
        rec["sha256"][key] = hashlib.sha256(np.ascontiguousarray(block[rec["start"]:rec["stop"]]).tobytes()).hexdigest()
    write_manifest(bad, manifest)
    assert cli(["verify", f"cache={bad}", "rows=300", "--json"]) == 1
    checks = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checks"]
    assert checks["shard checksums"] == "ok" and checks["teacher fidelity"].startswith("FAILED")


def test_info_names_the_mode(caches, capsys):
    assert cli(["info", f"cache={caches['topk:2'].root}"]) == 0
    out = capsys.readouterr().out
    assert "logits topk:2 of 3 classes (uint8 ids, float32 logits, float32 tail" in out
    assert cli(["info", f"cache={caches['sample:4'].root}"]) == 0
    assert "sample:4 of 3 classes drawn at T=4 (uint8 ids, seed 0; serves T=4 only)" in capsys.readouterr().out
    assert cli(["info", f"cache={caches['topk:1+sample:2'].root}"]) == 0
    assert ("topk:1+sample:2 of 3 classes (the top 1 exactly, 2 draws from the rest at T=4; uint8 ids, "
            "float32 logits, float32 tail, seed 0; serves T=4 only)") in capsys.readouterr().out


# =========================================================================== students

@pytest.fixture(scope="module")
def signal_caches(tmp_path_factory, builder) -> dict[str, object]:
    """The sparse caches again on signals (2, 16), for students that take no images (cnn1d)."""
    work = tmp_path_factory.mktemp("sparse_signals")
    out = {}
    for mode in STUDENT_MODES:
        builder(work / mode.replace(":", "-"), work, dataset="synthetic:300:2x16:3", teacher="mlp",
                logits=mode)
        out[mode] = open_cache(work / mode.replace(":", "-"))
    return out


@pytest.mark.parametrize("mode", STUDENT_MODES)
@pytest.mark.parametrize("name", STUDENTS.names())
def test_every_student_trains_from_sparse_logits(caches, signal_caches, mode, name, tmp_path):
    """Every registered student, through the stage's run (a results row), from each mode."""
    from pipeline.runs import train_student

    if STUDENTS.declared(name).modality not in (None, "array"):  # (declared: these caches hold arrays)
        pytest.skip(f"{name} reads {STUDENTS.declared(name).modality}; these caches are of arrays")
    quick = {"epochs": 1} if "epochs" in student_params(name) else {}
    for cache in (caches[mode], signal_caches[mode]):
        # one epoch: what is checked is that a run from sparse targets lands its row
        cfg = student_config({"cache": cache.root, "model": name, "runs_dir": tmp_path / "runs", **quick})
        try:
            row = train_student(cfg, progress=False)
        except KdError as exc:
            if name == "logreg_soft" and _unlisted(cache):  # random teachers favour some classes
                assert "logreg_soft cannot learn them; use a cache with more classes" in str(exc)
                return
            # an architecture that takes no such inputs (cnn1d: no images)
            assert "needs inputs shaped" in str(exc), exc
            continue
        # agreement is exact (from the index), the KL to the teacher not measurable
        assert 0 <= row["test_accuracy"] <= 1 and 0 <= row["teacher_agreement"] <= 1
        assert row["kl_teacher_student"] is None
        break
    else:
        pytest.fail(f"{name} trained from neither cache")


def test_head_and_tail_caches_train_students(caches, tmp_path):
    """From a topk:K+sample:M cache: kd through the stage's run (its targets: the head and the
    draws), a stand-in loss, and logreg_soft over the listed classes."""
    from pipeline.runs import train_student

    cache = caches["topk:1+sample:2"]
    data = StudentData(cache)
    batches = data.input_batches(32, 0, temperature=4.0, sparse=True)
    _, _, targets = next(iter(batches(0)))
    assert set(targets) == {"t_ids", "t_w", "t_tail"} and targets["t_ids"].shape[1] == 3
    assert not targets["t_tail"].any()
    for loss in ("kd", "dkd"):
        cfg = student_config({"cache": cache.root, "model": "mlp", "loss": loss, "epochs": 1,
                              "runs_dir": tmp_path / "runs"})
        row = train_student(cfg, progress=False)
        assert 0 <= row["test_accuracy"] <= 1 and row["kl_teacher_student"] is None
    student = create_student("logreg_soft", temperature=4.0)
    if not _unlisted(cache):
        student.fit_cache(data)
        assert student.predict(data.features("test")).shape == (30,)
    with pytest.raises(KdError, match="serves only that one; train with temperature=4"):
        data.check_targets(2.0)


def _unlisted(cache) -> set[int]:
    """Classes no train row lists with probability >= 1e-4 (logreg_soft's min_prob) at T=4."""
    t = StudentData(cache).sparse_targets("train", 4.0)
    return set(range(cache.num_classes)) - set(t["t_ids"][t["t_w"] >= 1e-4].tolist())


@pytest.mark.parametrize("loss", [n for n in classification_losses() if LOSSES.declared(n).logits
                                  and not LOSSES.declared(n).features])
def test_every_logit_loss_trains_from_sparse_logits(caches, loss):
    data = StudentData(caches["topk:2"])
    student = create_student_for(loss)
    student.fit_cache(data)
    assert np.isfinite(student.history_[-1]["train_loss"])


def create_student_for(loss: str):
    from pipeline.students.networks import TorchStudent

    return TorchStudent("mlp", loss=loss, epochs=2, batch_size=32)


def test_kd_reads_sparse_targets_and_other_losses_the_stand_in(caches, monkeypatch):
    """kd gets (t_ids, t_w, t_tail); dkd gets z_t, the dense stand-in, never the sparse form."""
    data = StudentData(caches["topk:2"])
    seen = {}
    for loss in ("kd", "dkd"):
        needs = LOSSES.declared(loss)
        batches = data.input_batches(32, 0, temperature=4.0, sparse=needs.sparse)
        _, _, targets = next(iter(batches(0)))
        seen[loss] = set(targets)
    assert seen["kd"] == {"t_ids", "t_w", "t_tail"}
    assert seen["dkd"] == {"z_t", "z_t1", "log_p_t", "p_t"}


def test_nkd_reads_the_teachers_probability_at_t1_from_the_stand_in_made_for_it():
    """nkd's target term reads the teacher at T = 1, its non-target term at T: from a topk
    cache both must be the teacher's (the K + 1 probabilities are exact at 1 and T_c)."""
    z_t, z_s = logits(41), torch.from_numpy(logits(42))
    y = torch.from_numpy(np.argmax(z_t, axis=1))  # the target among the listed classes
    sparse = topk_of(z_t, C - 1)  # one class dropped: the stand-ins are exact at every T
    dense = LOSSES.get("nkd")(z_s, y, z_t=torch.from_numpy(z_t), T=4.0)
    stand_in = LOSSES.get("nkd")(z_s, y, z_t=torch.from_numpy(sparse.dense(4.0)), T=4.0,
                                 z_t1=torch.from_numpy(sparse.dense(1.0)))
    assert float(stand_in) == pytest.approx(float(dense), rel=1e-4)


def test_kernel_keeps_the_tail_gradient_when_the_students_tail_underflows(monkeypatch):
    z = torch.tensor([[200.0, 0.0, 0.0, 0.0]])
    targets = {"t_ids": torch.tensor([[0]]), "t_w": torch.tensor([[0.5]]), "t_tail": torch.tensor([0.5])}
    grads = []
    for enabled in (True, False):
        monkeypatch.setattr(losses_cpu, "ENABLED", enabled)
        z_s = z.clone().requires_grad_()
        kd(z_s, torch.tensor([0]), T=1.0, alpha=1.0, **targets).backward()
        grads.append(z_s.grad.numpy())
    np.testing.assert_allclose(grads[0], grads[1], atol=1e-6)
    np.testing.assert_allclose(grads[0], [[0.5, -1 / 6, -1 / 6, -1 / 6]], atol=1e-6)


def test_a_class_of_zero_probability_is_never_drawn():
    z = np.array([[0.0, 0.0, -np.inf]] * 4, np.float32)
    u = np.full((4, 3), 1 - 2.0**-53)  # the largest uniform
    assert draw(z, 1.0, u, 3).max() == 1


def test_the_stand_ins_argmax_is_the_top_class_despite_float16_rounding():
    z = np.array([[1.00001, 1.0, 1.0, 1.0]], np.float32)
    ids, values, tail = encode_topk(z, 1, 4, 4.0)
    sparse = SparseLogits(TOPK, ids.astype(np.int64), values.astype(np.float16).astype(np.float32),
                          tail, 4, 4.0)
    assert sparse.dense(1.0).argmax(1)[0] == 0 and sparse.top1()[0] == 0


def test_cache_logits_at_the_caches_temperature_are_exact(caches):
    dense, cache = caches["dense"], caches["topk:2"]
    p, q = dense.probs("val", 4.0), cache.probs("val", 4.0)
    listed = cache.sparse_logits("val").classes
    np.testing.assert_allclose(np.take_along_axis(q, listed, 1), np.take_along_axis(p, listed, 1), rtol=1e-4)
    with pytest.raises(KdError, match="serves only that one"):
        caches["sample:4"].probs("val", 2.0)


def test_sample_caches_refuse_another_temperature_before_training(caches, capsys):
    root = caches["sample:4"].root
    assert cli(["student", f"cache={root}", "model=mlp", "temperature=2", "epochs=1"]) == 2
    assert "serves only that one; train with temperature=4" in capsys.readouterr().err
    assert cli(["student", f"cache={root}", "model=mlp", "standardize_logits=true", "epochs=1"]) == 2
    assert "standardize_logits=true needs every logit" in capsys.readouterr().err


def test_logreg_soft_expands_over_the_listed_classes(caches):
    data = StudentData(caches["topk:2"])
    student = create_student("logreg_soft", temperature=4.0)
    rows, cls, w = expand_soft_targets({**data.sparse_targets("train", 4.0), "num_classes": 3},
                                       student.min_prob)
    t = data.sparse_targets("train", 4.0)
    assert len(rows) == int((t["t_w"] >= student.min_prob).sum())
    np.testing.assert_array_equal(cls, t["t_ids"][t["t_w"] >= student.min_prob])
    sampled = StudentData(caches["sample:4"])
    assert not _unlisted(caches["sample:4"])  # (drawn at T=4, every class turns up)
    student.fit_cache(sampled)
    assert student.predict(sampled.features("test")).shape == (30,)



