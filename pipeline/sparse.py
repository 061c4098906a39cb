"""Sparse teacher logits: what a ``logits=topk:K`` or ``logits=sample:K`` cache stores instead of
every logit, how it is computed from the teacher's logits on building, and how a student reads
it back (as sparse targets, or densified for losses that have no sparse form).

Why: dense logits cost C values per row and view (ImageNet-1k × 32 views in float16: 82 GB;
a 128k vocabulary: out of reach). The field keeps a few classes per row instead.

``topk:K`` keeps the K largest raw logits z_(1) ≥ … ≥ z_(K), their class ids, and two
numbers of the C − K logits it drops, the log of their partition function at T = 1 and at the
cache's temperature T_c:

    tail = ( log Σ_{j ∉ top-K} exp z_j ,  log Σ_{j ∉ top-K} exp(z_j / T_c) ).

With the K logits these give the teacher's distribution over the K classes and one tail
bucket (the rest, as one "ghost" class, as in Megatron's sparse KD: :func:`pipeline.losses.kd`)
**exactly at T = 1 and at T = T_c**. At another T the ratios among the top K stay exact and
the tail's log partition function log S(1/T) is interpolated linearly in 1/T between its
three known points (1/T = 0: log(C − K); 1/T_c; 1). log S is convex in 1/T, so between known
points the tail's mass is over-estimated, beyond them under-estimated. (One tail number, the
uniform-tail model, over-estimated the tail at T = 4 on digits3 by 1.8×: 0.84 for 0.45.)

``sample:K`` keeps K class ids drawn with replacement from softmax(z / T_c) at the cache's
recorded temperature T_c (inverse-CDF draws from keyed uniforms, so a rebuild draws the same
ones), sorted. The empirical distribution p̂ = counts / K is an unbiased estimate of the
teacher's softmax(z / T_c), so cross-entropy to it is an unbiased estimate of KD's at T_c
(Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs",
ACL 2025). It serves T_c only: other temperatures are refused.

``topk:K+sample:M`` keeps what ``topk:K`` keeps plus M class ids drawn with replacement from
the teacher's distribution at T_c *restricted to the tail* R (the classes not in the top K),
p_j / S for j ∈ R, with S = Σ_{j ∈ R} p_j the tail's mass (keyed uniforms, as sample:K, sorted).
The head is then exact and the tail unbiased. With p = softmax(z / T_c), q = softmax(z_s / T_c),
r_j = q_j / q_R the student's distribution renormalised over R, and p̂ the M draws' empirical
distribution (counts / M; E p̂_j = p_j / S):

    KL(p ‖ q) = Σ_{j ∈ K} p_j log(p_j / q_j) + S log(S / q_R) + S · KL(p_R / S ‖ r)

(the first two terms are topk:K's KD with the tail as one class, exact), and the estimator

    L̂ = Σ_{j ∈ K} p_j log(p_j / q_j) + S log(S / q_R) + S · Σ_j p̂_j log(p̂_j / r_j)

has E L̂ = KL(p ‖ q) + S · (H(p_R / S) − E H(p̂)): the student's part, − S · Σ_j p̂_j log r_j,
is unbiased (E p̂ = p_R / S), and what remains is a constant of the teacher (the plug-in
entropy's bias), so E ∇L̂ = ∇KL exactly. As targets over listed classes (:meth:`SparseLogits.targets`)
L̂ is the ghost-class KL with the M draws listed at weights S · p̂_j and no tail left over.
Like sample:K it serves T_c only.

Class ids are stored in the smallest unsigned integer type that holds C.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import numpy as np

from pipeline.errors import KdError
from pipeline.keyed_random import RNG, SPLIT_IDS, KeyedRandom, key
from pipeline.numerics import logsumexp

DENSE, TOPK, SAMPLE = "dense", "topk", "sample"
TOPK_SAMPLE = "topk+sample"  # the K largest exactly, plus M draws from the tail
TAIL_DTYPE = "float32"  # z̄ is kept in float32 whatever the cache dtype: it sums C − K classes
SAMPLE_STREAM = 0x5A3F  # salts the draws' keys, apart from the views' augmentation draws
# densifying sample:K puts this much probability on each class never drawn (relative to 1/C),
# so that the densified logits are finite; softmax of them is p̂ within 1e-4 in total
UNSEEN_MASS = 1e-4
_MODE = re.compile(r"(topk|sample):(\d+)")
_HEAD_TAIL = re.compile(r"topk:(\d+)\+sample:(\d+)")


@dataclass(frozen=True)
class LogitsMode:
    """How a cache stores its logits: ``dense`` (every logit), ``topk`` or ``sample`` with
    ``k`` classes per row and view, or ``topk+sample`` with the ``k`` largest and ``m`` draws
    from the rest."""

    kind: str = DENSE
    k: int = 0
    m: int = 0

    @property
    def sparse(self) -> bool:
        return self.kind != DENSE

    @property
    def spec(self) -> str:
        if self.kind == TOPK_SAMPLE:
            return f"topk:{self.k}+sample:{self.m}"
        return DENSE if self.kind == DENSE else f"{self.kind}:{self.k}"

    @property
    def has_topk(self) -> bool:
        """Whether the cache keeps the K largest logits and the tail (topk, topk+sample)."""
        return self.kind in (TOPK, TOPK_SAMPLE)

    @property
    def has_draws(self) -> bool:
        """Whether the cache keeps drawn classes (sample, topk+sample): it serves T_c only."""
        return self.kind in (SAMPLE, TOPK_SAMPLE)

    @property
    def draws(self) -> int:
        """Draws per row and view (0 without any)."""
        return {SAMPLE: self.k, TOPK_SAMPLE: self.m}.get(self.kind, 0)

    def record(self, num_classes: int, seed: int, temperature: float) -> dict:
        """The manifest's ``logits`` entry (sample: with the draws' seed, generator and T;
        topk: the temperatures of its tail's two numbers)."""
        if not self.sparse:
            return {"mode": DENSE}
        entry = {"mode": self.kind, "k": self.k, "classes_dtype": classes_dtype(num_classes),
                 "temperature": temperature}
        if self.kind == TOPK_SAMPLE:
            entry["m"] = self.m
        if self.has_draws:
            entry.update({"seed": seed, "rng": RNG})
        if self.has_topk:
            entry["tail_temperatures"] = [1.0, temperature]
        return entry


def parse_mode(text: str) -> LogitsMode:
    """``dense``, ``topk:K``, ``sample:K`` or ``topk:K+sample:M`` (K, M ≥ 1); anything else is
    refused in one line."""
    if text == DENSE:
        return LogitsMode()
    both = _HEAD_TAIL.fullmatch(text)
    if both is not None and min(int(both.group(1)), int(both.group(2))) >= 1:
        return LogitsMode(TOPK_SAMPLE, int(both.group(1)), int(both.group(2)))
    match = _MODE.fullmatch(text)
    if both is not None or match is None or int(match.group(2)) < 1:
        raise KdError(f"logits={text!r} is not a logits mode; use dense, topk:K, sample:K or "
                      "topk:K+sample:M with K, M >= 1 classes per row (e.g. topk:16+sample:16)")
    return LogitsMode(match.group(1), int(match.group(2)))


def check_mode(mode: LogitsMode, num_classes: int) -> None:
    """Refuse K that leaves nothing to drop (top-k of all classes is dense logits, stored worse)."""
    if mode.has_topk and mode.k >= num_classes:
        raise KdError(f"logits={mode.spec} keeps every one of the {num_classes} classes; use "
                      f"logits=dense, or topk:K with K < {num_classes}")


def mode_of(manifest: dict) -> LogitsMode:
    """The logits mode of a cache (format 1 and 2 caches are dense)."""
    entry = manifest.get("logits") or {"mode": DENSE}
    return LogitsMode(entry["mode"], int(entry.get("k", 0)), int(entry.get("m", 0)))


def classes_dtype(num_classes: int) -> str:
    """The smallest unsigned integer type that holds every class id 0..C−1."""
    for dtype in ("uint8", "uint16", "uint32"):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return dtype
    raise KdError(f"{num_classes} classes do not fit a uint32 class id")


# --------------------------------------------------------------------------- encoding (stage one)

@dataclass
class HeadAndTail:
    """The top K of raw logits ``z`` [B, C] and what is known of the rest (:func:`head_and_tail`):
    ``ids`` int64 [B, K] and ``values`` float32 [B, K] in descending order (equal logits in class
    order), ``tail`` float64 [B, 2] (log Σ over the rest of exp z_j and of exp(z_j / T)) and
    ``tail_mean`` float64 [B] (Σ exp(z_j) z_j / Σ exp(z_j) over the rest; NaN unless asked)."""

    ids: np.ndarray
    values: np.ndarray
    tail: np.ndarray
    tail_mean: np.ndarray

    def log_partition(self) -> np.ndarray:
        """log Σ_j exp z_j over all C logits [B] (head and tail, in float64)."""
        head = logsumexp(self.values.astype(np.float64))
        return np.logaddexp(head, self.tail[:, 0])


_SCRATCH = threading.local()


def _scratch(rows: int, columns: int) -> np.ndarray:
    """A float32 [rows, columns] work array of this thread, reused from call to call: a fresh
    64 MiB array per chunk of a 49,152-token vocabulary cost more in page faults (20 ms) than
    the arithmetic done in it (3 ms)."""
    have = getattr(_SCRATCH, "array", None)
    if have is None or have.size < rows * columns:
        have = _SCRATCH.array = np.empty(rows * columns, np.float32)
    return have[:rows * columns].reshape(rows, columns)


def head_and_tail(z: np.ndarray, k: int, temperature: float, tail_mean: bool = False) -> HeadAndTail:
    """The K largest of finite raw logits ``z`` [B, C] (K < C), and the rest's log partition
    functions at T = 1 and T = ``temperature`` (:class:`HeadAndTail`).

    Why not an argsort: at a 49,152-token vocabulary a stable argsort of every position cost
    4.9 ms, 2.5× the forward pass of a 135M-parameter teacher. Here ``torch.topk`` finds the K + 1
    largest (multi-threaded), a row whose K-th and (K+1)-th logits are equal (a tie across the
    cut, which ``topk`` breaks arbitrarily) is redone by a stable argsort, and the head is
    ordered by (−logit, class id): exactly the argsort's choice. The rest's exponentials are
    taken relative to its own maximum, the (K+1)-th logit (no term overflows, the largest is 1),
    in float32 in a reused work array, with the head's K zeroed, and summed by numpy's pairwise
    sum (the same bits whatever the thread count), in float32: the tail is stored in float32.
    Non-finite logits give non-finite results."""
    import torch  # lazily: importing the library must not load torch

    z = np.ascontiguousarray(z, np.float32)
    n, c = z.shape
    zt = torch.from_numpy(z)
    top = torch.topk(zt, k + 1, dim=1, sorted=True)
    ids, values = top.indices[:, :k], top.values[:, :k]
    # the head in (−logit, class id) order: sort by id, then stably by descending logit
    by_id = torch.sort(ids, dim=1).values
    by_value = torch.sort(torch.gather(zt, 1, by_id), dim=1, descending=True, stable=True)
    ids, values = torch.gather(by_id, 1, by_value.indices).numpy(), by_value.values.numpy()
    cut = np.flatnonzero(top.values[:, k - 1].numpy() == top.values[:, k].numpy())
    if len(cut):  # ties across the cut: the smaller class ids are kept, as a stable argsort does
        order = np.argsort(-z[cut], axis=1, kind="stable")[:, :k]
        ids[cut], values[cut] = order, np.take_along_axis(z[cut], order, axis=1)
    rest_max = top.values[:, k].numpy()[:, None]  # the (K+1)-th logit: the rest's maximum
    tail = np.empty((n, 2), np.float64)
    mean = np.full(n, np.nan)
    e = _scratch(n, c)
    rows = np.arange(n)[:, None]
    for column, beta in enumerate((1.0, 1.0 / temperature)):
        if column == 1 and beta == 1.0:
            tail[:, 1] = tail[:, 0]
            break
        np.subtract(z, rest_max, out=e)  # ≤ 0 on the rest: no exponential overflows, the largest is 1
        if beta != 1.0:
            e *= beta
        with np.errstate(over="ignore", invalid="ignore"):  # the head may overflow: zeroed next
            np.exp(e, out=e)
        e[rows, ids] = 0.0  # the head's K
        total = e.sum(axis=1).astype(np.float64)  # numpy's pairwise sum: the same bits on any thread count
        tail[:, column] = np.log(total) + rest_max[:, 0].astype(np.float64) * beta
        if column == 0 and tail_mean:  # Σ e z / Σ e over the rest
            mean = np.einsum("ij,ij->i", e, z).astype(np.float64) / total
    return HeadAndTail(ids, values, tail, mean)


def encode_topk(z: np.ndarray, k: int, num_classes: int,
                temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class ids [B, K], their raw logits [B, K] in descending order, the tail [B, 2]: log
    partition function of the other logits at T = 1 and at T = ``temperature``) of raw logits
    ``z`` [B, C]. Ties are broken towards the smaller class id (a stable argsort of −z)."""
    z = np.asarray(z, np.float32)
    if np.isfinite(z).all():
        found = head_and_tail(z, k, temperature)
        return found.ids.astype(classes_dtype(num_classes)), found.values, found.tail.astype(TAIL_DTYPE)
    # non-finite logits (a shard refuses them after encoding): the plain definition
    order = np.argsort(-z, axis=1, kind="stable")
    ids = order[:, :k]
    values = np.take_along_axis(z, ids, axis=1)
    rest = np.take_along_axis(z, order[:, k:], axis=1).astype(np.float64)
    tail = np.stack([logsumexp(rest), logsumexp(rest / temperature)], axis=1)
    return ids.astype(classes_dtype(num_classes)), values, tail.astype(TAIL_DTYPE)


def tail_log_partition(tail: np.ndarray, rest: int, cache_temperature: float, T: float) -> np.ndarray:
    """log S(1/T), S(β) = Σ_{j ∉ top-K} exp(β z_j), from the stored ``tail`` [B, 2] (log S(1) and
    log S(1/T_c)) and log S(0) = log(``rest``): exact at T = 1 and T_c, linear in 1/T between
    and beyond (from the nearest segment)."""
    b = 1.0 / T
    points = sorted([(0.0, np.full(len(tail), np.log(rest))), (1.0, tail[:, 0].astype(np.float64)),
                     (1.0 / cache_temperature, tail[:, 1].astype(np.float64))], key=lambda p: p[0])
    if np.isclose(points[1][0], points[2][0]):  # T_c = 1: two points
        points = points[:2]
    (b0, v0), (b1, v1) = (points[0], points[1]) if len(points) == 2 or b <= points[1][0] else (points[1], points[2])
    return v0 + (v1 - v0) * (b - b0) / (b1 - b0)


def sample_uniforms(seed: int, split: str, sample_ids: np.ndarray, view: int, k: int) -> np.ndarray:
    """The uniforms [B, K] in [0, 1) behind the draws of these samples' view ``view``: keyed by
    (seed, split, sample_id, view), so they never depend on batching, sharding or order."""
    rng = KeyedRandom(key(seed, SPLIT_IDS[split], np.asarray(sample_ids, np.int64), view, SAMPLE_STREAM))
    return np.stack([rng.random(len(sample_ids)) for _ in range(k)], axis=1)


def draw(z: np.ndarray, temperature: float, uniforms: np.ndarray, num_classes: int) -> np.ndarray:
    """K classes per row drawn with replacement from softmax(z / T) by inverse CDF on
    ``uniforms`` [B, K] (in float64), sorted ascending, as the smallest class-id type."""
    u = np.asarray(z, np.float64) / temperature
    p = np.exp(u - u.max(axis=1, keepdims=True))
    cdf = np.cumsum(p, axis=1)
    cdf /= cdf[:, -1:]
    # row by row (a few µs each): a class is the first whose cdf exceeds u; cdf ends at exactly
    # 1.0 (flat after the last class of positive probability) and u < 1, so a class of zero
    # probability is never drawn
    ids = np.empty(uniforms.shape, np.int64)
    for i in range(len(cdf)):
        ids[i] = np.searchsorted(cdf[i], uniforms[i], side="right")
    ids.sort(axis=1)
    return ids.astype(classes_dtype(num_classes))


def draw_tail(z: np.ndarray, head: np.ndarray, temperature: float, uniforms: np.ndarray,
              num_classes: int) -> np.ndarray:
    """M classes per row drawn with replacement from softmax(z / T) restricted to the classes
    not in ``head`` [B, K] (the top-K ids), by inverse CDF on ``uniforms`` [B, M], sorted, as
    the smallest class-id type: a head class has probability 0 there, so it is never drawn."""
    u = np.array(z, np.float64)
    np.put_along_axis(u, np.asarray(head, np.int64), -np.inf, axis=1)
    return draw(u, temperature, uniforms, num_classes)


def encode_topk_sample(z: np.ndarray, k: int, num_classes: int, temperature: float,
                       uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``topk:K+sample:M`` of raw logits ``z`` [B, C]: :func:`encode_topk`'s (ids, values,
    tail) and the M tail draws [B, M] (:func:`draw_tail` on ``uniforms`` [B, M])."""
    ids, values, tail = encode_topk(z, k, num_classes, temperature)
    return ids, values, tail, draw_tail(z, ids, temperature, uniforms, num_classes)


# --------------------------------------------------------------------------- decoding (stage two)

def check_temperature(kind: str, cache_temperature: float, T: float) -> None:
    """Refuse a temperature a cache of ``kind`` cannot serve: a cache of draws (sample,
    topk+sample) only serves the temperature its classes were drawn at."""
    if kind in (SAMPLE, TOPK_SAMPLE) and not np.isclose(T, cache_temperature, rtol=1e-6):
        raise KdError(f"a {kind} cache holds classes drawn at its temperature {cache_temperature:g}, "
                      f"so it serves only that one; train with temperature={cache_temperature:g} "
                      f"(not {T:g}), or build a topk or dense cache")


def _empirical(ids: np.ndarray) -> np.ndarray:
    """The weights counts / M of M sorted draws per row [B, M], on the first of each run of
    equal ids (0 on its repeats), so that Σ over a row's distinct ids of weight · f(id) is the
    empirical mean of f."""
    first = np.ones(ids.shape, bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]  # sorted: repeats are adjacent
    run = np.cumsum(first, axis=1) - 1  # the run each entry belongs to
    counts = np.zeros(ids.shape, np.float32)
    np.add.at(counts, (np.arange(len(ids))[:, None], run), 1.0)
    return np.where(first, np.take_along_axis(counts, run, axis=1), 0).astype(np.float32) / ids.shape[1]


@dataclass
class SparseLogits:
    """Sparse teacher logits of a batch of rows, as a cache stores them (one view per row).

    ``classes`` int64 [B, K] (sample: the draws); ``values`` float32 [B, K] the raw top-K
    logits (topk, topk+sample; None for sample); ``tail`` float32 [B, 2] the tail's log
    partition function at T = 1 and T_c (topk, topk+sample; None for sample); ``draws`` int64
    [B, M] the tail draws (topk+sample only); ``kind``, ``num_classes``, and ``temperature``
    the cache's T_c (the draws' temperature, for sample and topk+sample). Rows may be any
    leading shape [..., K] for :meth:`targets` (a token cache's [N, T, K]).
    """

    kind: str
    classes: np.ndarray
    values: np.ndarray | None
    tail: np.ndarray | None
    num_classes: int
    temperature: float
    draws: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.classes)

    def check_temperature(self, T: float) -> None:
        check_temperature(self.kind, self.temperature, T)

    def targets(self, T: float) -> dict[str, np.ndarray]:
        """The teacher's distribution at T over listed classes and one tail bucket (the classes
        not listed): ``t_ids`` int64 [B, L], ``t_w`` float32 [B, L] their probabilities (zero
        for a repeated id), ``t_tail`` float32 [B] the tail's. topk: the K logits / T and the
        tail's log S(1/T) (:func:`tail_log_partition`; exact at T = 1 and T_c), normalised
        together (L = K). sample: p̂ = counts / K, no tail (L = K). topk+sample: topk's K
        probabilities, then the M draws at S · counts / M (S the tail's mass), no tail left
        (L = K + M): the estimator of the module docstring. Leading axes beyond the first are
        kept (targets [..., L] and [...])."""
        self.check_temperature(T)
        lead = self.classes.shape[:-1]
        flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])  # noqa: E731
        ids = flat(self.classes)
        if self.kind == SAMPLE:
            out = {"t_ids": ids, "t_w": _empirical(ids), "t_tail": np.zeros(len(ids), np.float32)}
        else:
            k = ids.shape[1]
            a = flat(self.values).astype(np.float64) / T
            tail = tail_log_partition(flat(self.tail), self.num_classes - k, self.temperature, T)
            m = np.maximum(a.max(axis=1), tail)
            total = np.exp(a - m[:, None]).sum(axis=1) + np.exp(tail - m)
            lse = m + np.log(total)
            w, w_tail = np.exp(a - lse[:, None]).astype(np.float32), np.exp(tail - lse).astype(np.float32)
            out = {"t_ids": ids, "t_w": w, "t_tail": w_tail}
            if self.kind == TOPK_SAMPLE:
                draws = flat(self.draws)
                out = {"t_ids": np.concatenate([ids, draws], axis=1),
                       "t_w": np.concatenate([w, w_tail[:, None] * _empirical(draws)], axis=1),
                       "t_tail": np.zeros(len(ids), np.float32)}
        return {"t_ids": out["t_ids"].reshape(*lead, -1), "t_w": out["t_w"].reshape(*lead, -1),
                "t_tail": out["t_tail"].reshape(lead)}

    def dense(self, T: float = 1.0) -> np.ndarray:
        """Dense raw logits [B, C] standing in for the teacher's, for losses with no sparse form,
        to be softened at ``T``. topk: the K logits, every other class at the one logit v that
        gives the tail its mass at T ((C − K) · exp(v / T) = S(1/T)), so softmax(· / T) is the
        teacher's over the K classes and the tail. sample: T_c · log p̂ with each class never
        drawn at ``UNSEEN_MASS`` / C, so softmax(· / T_c) is p̂ (within 1e-4). topk+sample:
        T_c · log of topk's K probabilities and the tail's mass spread as the draws say (each
        tail class never drawn at ``UNSEEN_MASS`` / C of it; none above the K-th listed
        probability, which bounds every tail class's)."""
        rows = np.arange(len(self))[:, None]
        if self.kind == TOPK:
            rest = self.num_classes - self.classes.shape[1]
            v = T * (tail_log_partition(self.tail, rest, self.temperature, T) - np.log(rest))
            # v <= z_(K) exactly (a power mean of smaller values); float16 rounding of the kept
            # logits could break that and hand the argmax to a dropped class
            v = np.minimum(v, self.values[:, -1])
            out = np.repeat(v[:, None].astype(np.float32), self.num_classes, axis=1)
            out[rows, self.classes] = self.values
            return out
        if self.kind == TOPK_SAMPLE:
            t = self.targets(self.temperature)
            k, m = self.classes.shape[1], self.draws.shape[1]
            p_tail = t["t_w"][:, -m:].sum(axis=1, keepdims=True)  # S (the draws' weights sum to it)
            p = np.repeat(p_tail * np.float32(UNSEEN_MASS / self.num_classes), self.num_classes, axis=1)
            np.add.at(p, (rows, t["t_ids"][:, -m:]), t["t_w"][:, -m:])
            p[rows, self.classes] = 0.0
            # a tail class's true probability is at most the K-th largest: few draws can pile
            # the tail's mass on one class, and must not hand it the argmax. What the cap cuts
            # goes to the tail classes below it, in proportion to their room (there is room
            # enough: the tail's mass is at most (C − K) times the cap)
            cap = t["t_w"][:, k - 1:k]
            capped = np.minimum(p, cap)
            room = np.maximum(cap - capped, 0)
            room[rows, self.classes] = 0.0
            cut = p_tail - capped.sum(axis=1, keepdims=True)
            p = capped + room * np.clip(cut / np.maximum(room.sum(axis=1, keepdims=True), 1e-30), 0, 1)
            p[rows, self.classes] = t["t_w"][:, :k]
            p = np.maximum(p, np.finfo(np.float32).tiny)
            return (np.float32(self.temperature) * np.log(p)).astype(np.float32)
        counts = np.zeros((len(self), self.num_classes), np.float32)
        np.add.at(counts, (rows, self.classes), 1.0)
        p = np.maximum(counts / self.classes.shape[1], np.float32(UNSEEN_MASS / self.num_classes))
        return (np.float32(self.temperature) * np.log(p)).astype(np.float32)

    def top1(self) -> np.ndarray:
        """The teacher's predicted class per row: its largest logit (topk, topk+sample), its
        most drawn class (sample; ties to the smaller id)."""
        if self.kind in (TOPK, TOPK_SAMPLE):
            return self.classes[:, 0].copy()
        return self.dense().argmax(axis=1)
