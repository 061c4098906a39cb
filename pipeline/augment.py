"""Augmentation policies (a registry): exact, deterministic and replayable.

A policy turns a batch of normalised inputs ``x`` [B, *shape] into augmented ones in two
steps, so that what the teacher saw can be rebuilt later from the original input alone:

- ``sample(rng, n, shape) -> params``: int64 [n, P], one row of P small integers per input
  (``rng`` is a :class:`numpy.random.Generator`, or a :class:`pipeline.keyed_random.KeyedRandom`
  whose draws are a pure function of a key per row, e.g. (seed, split, sample_id, view));
- ``apply(x, params) -> x'``: the augmented inputs, a pure function of ``x`` and ``params``,
  on CPU or GPU tensors (translations and flips are exact copies; ``rrc`` resizes with
  bilinear interpolation, deterministic on a given device);
- ``identity(n, shape) -> params``: the parameters that leave inputs unchanged.

Policies are written ``NAME[:ARG]`` and combined with ``+`` (``crop:4+flip``: parameters side
by side, applied left to right). Augmentation acts on the normalised inputs the teacher sees;
translations fill with 0 (the training mean after normalisation). Inputs are ranked by their
sample shape: ``(L,)`` and ``(C, L)`` are signals (one spatial axis, the last), ``(C, H, W)``
images (two). docs/CACHE_FORMAT.md states each policy's parameters and arithmetic exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import KdError
from pipeline.registry import Registry

NONE = "none"
MAX_SHIFT = 64  # pixels / samples: a translation beyond this leaves little of a small input


# =========================================================================== the policies

@dataclass(frozen=True)
class AugmentNeeds:
    """What a policy declares at registration: the sample ranks it applies to
    (1: ``(L,)`` signals, 2: ``(C, L)`` signals, 3: ``(C, H, W)`` images)."""

    ranks: tuple[int, ...] = (1, 2, 3)


@dataclass(frozen=True)
class Policy:
    """One parsed policy: ``columns`` names its parameters; see the module docstring."""

    spec: str
    columns: tuple[str, ...]
    sample: Callable[[object, int], np.ndarray]
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    identity: Callable[[int], np.ndarray]


# An entry is ``make(arg, shape) -> Policy`` for ``NAME[:ARG]`` on inputs of ``shape``.
POLICIES: Registry[Callable[[str, tuple[int, ...]], Policy]] = Registry("augmentation policy", AugmentNeeds)


def spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The sizes of the spatial axes: the last one for signals, the last two for images."""
    return tuple(shape[-2:]) if len(shape) == 3 else (shape[-1],)


def _int_arg(name: str, arg: str, low: int, high: int, what: str) -> int:
    try:
        value = int(arg)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise KdError(f"{name}:{arg} is malformed; {name} takes {what} in {low}..{high}, "
                      f"e.g. {name}:{max(low, min(high, 4))}")
    return value


def _no_arg(name: str, arg: str) -> None:
    if arg:
        raise KdError(f"{name}:{arg} is malformed; {name} takes no argument (write {name})")


def _as_index(params, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(params) if not isinstance(params, torch.Tensor) else params,
                           dtype=torch.int64, device=device)


def translate(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = x[..., i - dy, j - dx]`` (0 outside the input), per sample, for
    ``offsets`` [B, axes] (dy, dx) over the last ``axes`` dimensions: exact copies. A
    translation is separable, so it is one gather per axis."""
    axes = offsets.shape[1]
    for k in range(axes):
        x = _translate_axis(x, offsets[:, k], x.dim() - axes + k)
    return x


def _translate_axis(x: torch.Tensor, d: torch.Tensor, axis: int) -> torch.Tensor:
    """``out[..., i, ...] = x[..., i - d, ...]`` along ``axis``, 0 where ``i - d`` falls outside."""
    n = x.shape[axis]
    source = torch.arange(n, device=x.device)[None, :] - d[:, None]  # [B, n]
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[axis] = n
    inside = ((source >= 0) & (source < n)).view(shape)
    gathered = torch.gather(x, axis, source.clamp(0, n - 1).view(shape).expand_as(x))
    return gathered.masked_fill(~inside, 0.0)


@POLICIES.register("shift")
def shift(arg: str, shape: tuple[int, ...]) -> Policy:
    """``shift:S``: translate by d ∈ [−S, S] pixels (or samples) per spatial axis, uniformly,
    filling with 0; parameters (dy, dx) for images, (d,) for signals; the content moves by +d:
    ``x'[i] = x[i − d]``."""
    s = _int_arg("shift", arg, 0, MAX_SHIFT, "a maximal shift S")
    axes = len(spatial(shape))
    columns = ("shift_y", "shift_x") if axes == 2 else ("shift",)

    def sample(rng, n: int) -> np.ndarray:
        return np.stack([rng.integers(-s, s + 1, size=n) for _ in range(axes)], 1)

    return Policy(f"shift:{s}", columns, sample,
                  lambda x, p: translate(x, _as_index(p, x.device)),
                  lambda n: np.zeros((n, axes), np.int64))


@POLICIES.register("crop")
def crop(arg: str, shape: tuple[int, ...]) -> Policy:
    """``crop:P``: CIFAR-style random crop: pad P zeros on every side, then crop back to the
    input size at offset o ∈ [0, 2P] per spatial axis: ``x'[i] = x[i + o − P]``; parameters
    (oy, ox) for images, (o,) for signals. (The identity is o = P.)"""
    p = _int_arg("crop", arg, 0, MAX_SHIFT, "a padding P")
    axes = len(spatial(shape))
    columns = ("crop_y", "crop_x") if axes == 2 else ("crop",)

    def sample(rng, n: int) -> np.ndarray:
        return np.stack([rng.integers(0, 2 * p + 1, size=n) for _ in range(axes)], 1)

    return Policy(f"crop:{p}", columns, sample,
                  lambda x, o: translate(x, p - _as_index(o, x.device)),
                  lambda n: np.full((n, axes), p, np.int64))


@POLICIES.register("flip", ranks=(3,))
def flip(arg: str, shape: tuple[int, ...]) -> Policy:
    """``flip``: horizontal flip with probability 1/2: parameter f ∈ {0, 1}; with f = 1,
    ``x'[..., j] = x[..., W − 1 − j]``."""
    _no_arg("flip", arg)

    def sample(rng, n: int) -> np.ndarray:
        return rng.integers(0, 2, size=n)[:, None]

    def apply(x: torch.Tensor, f) -> torch.Tensor:
        f = _as_index(f, x.device)[:, 0].bool().view(-1, *([1] * (x.dim() - 1)))
        return torch.where(f, x.flip(-1), x)

    return Policy("flip", ("flip",), sample, apply, lambda n: np.zeros((n, 1), np.int64))


RRC_RATIO = (3 / 4, 4 / 3)
RRC_ATTEMPTS = 10


@POLICIES.register("rrc", ranks=(3,))
def rrc(arg: str, shape: tuple[int, ...]) -> Policy:
    """``rrc:SMIN``: RandomResizedCrop (Szegedy et al. 2015; torchvision's sampling) with scale
    (SMIN, 1) and ratio (3/4, 4/3), resized back to (H, W). Parameters (top, left, height,
    width) of the crop box. Sampling: up to 10 attempts of area = H·W·U(SMIN, 1), aspect =
    exp(U(log 3/4, log 4/3)), w = round(√(area·aspect)), h = round(√(area/aspect)); the first
    with 0 < w ≤ W and 0 < h ≤ H takes top = ⌊U·(H − h + 1)⌋, left = ⌊U·(W − w + 1)⌋; if none
    fits, the central crop of the clamped aspect. Apply: ``F.interpolate(x[:, :, top:top+h,
    left:left+w], size=(H, W), mode="bilinear", align_corners=False, antialias=False)``."""
    try:
        smin = float(arg)
    except ValueError:
        smin = -1.0
    if not 0.0 < smin <= 1.0:
        raise KdError(f"rrc:{arg} is malformed; rrc takes the smallest scale SMIN in (0, 1], "
                      "e.g. rrc:0.35")
    H, W = shape[-2:]
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])

    def sample(rng, n: int) -> np.ndarray:
        box = np.zeros((n, 4), np.int64)
        found = np.zeros(n, bool)
        for _ in range(RRC_ATTEMPTS):
            area = H * W * (smin + (1.0 - smin) * rng.random(size=n))
            aspect = np.exp(log_lo + (log_hi - log_lo) * rng.random(size=n))
            w = np.round(np.sqrt(area * aspect)).astype(np.int64)
            h = np.round(np.sqrt(area / aspect)).astype(np.int64)
            u_top, u_left = rng.random(size=n), rng.random(size=n)
            ok = ~found & (w > 0) & (w <= W) & (h > 0) & (h <= H)
            top = np.floor(u_top * (H - h + 1)).astype(np.int64)
            left = np.floor(u_left * (W - w + 1)).astype(np.int64)
            box[ok] = np.stack([top, left, h, w], 1)[ok]
            found |= ok
        box[~found] = _central(H, W)
        return box

    def apply(x: torch.Tensor, box) -> torch.Tensor:
        box = np.asarray(box.cpu() if isinstance(box, torch.Tensor) else box, np.int64)
        out = torch.empty_like(x)
        for b, (top, left, h, w) in enumerate(box):
            patch = x[b:b + 1, :, top:top + h, left:left + w]
            out[b] = patch[0] if (h, w) == (H, W) else F.interpolate(
                patch, size=(H, W), mode="bilinear", align_corners=False, antialias=False)[0]
        return out

    return Policy(f"rrc:{smin!r}", ("rrc_top", "rrc_left", "rrc_height", "rrc_width"), sample, apply,
                  lambda n: np.tile(np.array([[0, 0, H, W]], np.int64), (n, 1)))


def _central(H: int, W: int) -> np.ndarray:
    """torchvision's fallback box: the central crop of the aspect clamped to the ratio range."""
    ratio = W / H
    if ratio < RRC_RATIO[0]:
        w, h = W, int(round(W / RRC_RATIO[0]))
    elif ratio > RRC_RATIO[1]:
        h, w = H, int(round(H * RRC_RATIO[1]))
    else:
        h, w = H, W
    return np.array([(H - h) // 2, (W - w) // 2, h, w], np.int64)


# =========================================================================== parsing

def parse(spec: str, shape: tuple[int, ...], key: str = "augment") -> Policy | None:
    """The policy ``spec`` (``none``, ``NAME[:ARG]``, or several joined by ``+``) for inputs of
    ``shape``, or None for ``none``. Unknown, malformed or ill-fitting policies are refused,
    naming the config ``key`` that gave them."""
    try:
        return _parse(spec, tuple(shape))
    except KdError as exc:
        raise KdError(f"{key}={spec}: {exc}") from None


def _parse(spec: str, shape: tuple[int, ...] | None) -> Policy | None:
    """``shape`` None: check names and arguments only (on a stand-in input of a fitting rank)."""
    text = spec.strip()
    if text == NONE:
        return None
    parts = [p.strip() for p in text.split("+")]
    if not text or any(not p for p in parts):
        raise KdError(f"{spec!r} is malformed; write NAME[:ARG] joined by +, e.g. crop:4+flip, "
                      f"or none (policies: {', '.join(POLICIES.names())})")
    if shape == ():  # documents (text datasets): there is nothing to shift, crop or flip
        raise KdError("augmentation applies to arrays (signals, images), and these inputs are text; "
                      "a text cache holds one view per row: drop views= and augment=")
    policies = []
    for part in parts:
        name, _, arg = part.partition(":")
        make, ranks = POLICIES.get(name), POLICIES.declared(name).ranks
        if shape is None:
            make(arg, (1, 8, 8) if 3 in ranks else (8,))  # validates the argument
            continue
        if len(shape) not in ranks:
            kind = "images (C, H, W)" if ranks == (3,) else "these inputs"
            raise KdError(f"{name} applies only to {kind}, not to inputs shaped {tuple(shape)}; "
                          "use shift:S or crop:P for signals")
        policies.append(make(arg, tuple(shape)))
    if shape is None:
        return None
    return policies[0] if len(policies) == 1 else _combined(policies)


def _combined(policies: list[Policy]) -> Policy:
    widths = [len(p.columns) for p in policies]
    starts = np.cumsum([0] + widths)

    def sample(rng, n: int) -> np.ndarray:
        return np.concatenate([p.sample(rng, n) for p in policies], 1)

    def apply(x: torch.Tensor, params) -> torch.Tensor:
        for p, a, b in zip(policies, starts[:-1], starts[1:]):
            x = p.apply(x, params[:, a:b])
        return x

    return Policy("+".join(p.spec for p in policies), sum((p.columns for p in policies), ()),
                  sample, apply, lambda n: np.concatenate([p.identity(n) for p in policies], 1))


def check(spec: str, key: str = "augment") -> None:
    """Refuse a malformed or unknown policy before any data is opened, naming the config ``key``
    that gave it (its fit to the inputs is checked by :func:`parse` once the input shape is
    known)."""
    try:
        _parse(spec, None)
    except KdError as exc:
        raise KdError(f"{key}={spec}: {exc}") from None
