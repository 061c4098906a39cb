"""Where tensors run: device choice, thread counts, and the GPU fast paths.

The CUDA paths (autocast, pinned host memory, non-blocking copies, torch.compile) are written
once here and used by every stage; on a CPU-only machine they reduce to plain calls.
"""

from __future__ import annotations

import contextlib
import os

import torch

from pipeline.errors import KdError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KdError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdError(f"device={name} asked for CUDA but no GPU is visible; use device=cpu")
    return device


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(n: int) -> None:
    """Set torch's intra-op threads; dask's nanny pins OMP_NUM_THREADS=1, so do it explicitly."""
    n = max(1, int(n))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block and restored after it: the
    setting is process-wide, and a cache build must not leave, say, a notebook's later
    training on one thread. ``n = 0`` (a config's ``threads=0``, auto) leaves them as they are.
    Enter it in the thread that runs torch: the count is per OS thread (OpenMP)."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    set_threads(n)
    try:
        yield
    finally:
        set_threads(before)


def autocast(device: torch.device, dtype: torch.dtype = torch.float16):
    """Mixed precision on CUDA (``dtype`` activations, float16 by default; float32
    accumulation); a no-op on CPU so that cached values on CPU are exact float32 forward
    passes."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def text_autocast_dtype(device: torch.device) -> torch.dtype:
    """The mixed precision of transformer text teachers on ``device``: bfloat16 where the GPU
    supports it (float16's range overflows in attention and layer norms of some pretrained
    encoders), else float16. Unused on CPU (:func:`autocast` is a no-op there)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device copy; pinned + non_blocking on CUDA so the copy overlaps compute."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    return torch.compile(model, dynamic=False) if enabled else model
