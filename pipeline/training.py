"""The PyTorch training loop shared by teachers and torch students.

One loop: AdamW with a one-cycle schedule, a validation pass every epoch, and the weights of the
best validation epoch kept (model selection on val; test is scored once, by the caller).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from pipeline import runtime
from pipeline.augment import Policy
from pipeline.errors import KdError


@dataclass
class FitResult:
    best_epoch: int
    best_val_accuracy: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


Batches = Callable[[int], Iterable[tuple[np.ndarray, np.ndarray, dict]]]


def array_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
                  targets: dict[str, np.ndarray] | None = None) -> Batches:
    """In-memory batches: ``batches(epoch)`` yields ``(x, y, {name: target rows})`` in a seeded
    random order; row i of every array describes the same sample."""
    targets = {k: v for k, v in (targets or {}).items() if v is not None}

    def batches(epoch: int):
        order = np.random.default_rng([seed, epoch]).permutation(len(x))
        for a in range(0, len(x), batch_size):
            rows = order[a:a + batch_size]
            yield x[rows], y[rows], {k: v[rows] for k, v in targets.items()}

    return batches


def as_tensor(x: np.ndarray) -> torch.Tensor:
    """A numpy batch of inputs as a tensor: integer ids (text students' hashed n-grams) as
    int64, anything else as float32."""
    x = np.asarray(x)
    return torch.from_numpy(np.ascontiguousarray(x, np.int64 if x.dtype.kind in "iu" else np.float32))


@torch.inference_mode()
def predict_logits(model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    out = []
    for a in range(0, len(x), batch_size):
        xb = runtime.to_device(as_tensor(x[a:a + batch_size]), device)
        with runtime.autocast(device):
            logits = model(xb)
        if isinstance(logits, tuple):  # students also return their features
            logits = logits[0]
        out.append(logits.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel for all parameters, on CPU and CUDA): on a small student the
    per-tensor loop of the default implementation took a third of a training step."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: np.ndarray, yb: np.ndarray,
               targets: dict[str, np.ndarray], loss_fn, device: torch.device,
               augment: Policy | None = None, rng: np.random.Generator | None = None) -> float:
    """One optimisation step on a numpy batch; returns the loss (the step is skipped, not
    taken, when the loss is not finite: the caller refuses to go on)."""
    xb = runtime.to_device(as_tensor(xb), device)
    if augment is not None:
        xb = augment.apply(xb, augment.sample(rng, len(xb)))
    yb = runtime.to_device(torch.from_numpy(np.asarray(yb, np.int64)), device)
    targets = {k: runtime.to_device(torch.from_numpy(np.ascontiguousarray(
        v, np.int64 if v.dtype.kind in "iu" else np.float32)), device) for k, v in targets.items()}
    with runtime.autocast(device):
        loss = loss_fn(model(xb), yb, targets)
    value = float(loss.detach())
    if not math.isfinite(value):
        return value
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return value


def fit(model: nn.Module, train_batches: Batches, steps_per_epoch: int, x_val: np.ndarray,
        y_val: np.ndarray, loss_fn: Callable[[object, torch.Tensor, dict], torch.Tensor],
        *, epochs: int, lr: float, weight_decay: float, seed: int, device: torch.device,
        augment: Policy | None = None, progress: bool = True, desc: str = "training",
        resume: dict | None = None, on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train ``model`` in place; on return it holds the weights of the best validation epoch.

    ``train_batches(epoch)`` yields ``(x, y, targets)`` numpy batches (in memory with
    :func:`array_batches`, or streamed from a cache); ``loss_fn(outputs, labels, targets)``
    gets the model's outputs, the labels and the batch's targets as tensors on the device.
    ``augment``: a policy applied afresh to every batch, with parameters from a generator
    seeded by ``seed`` (teachers, and students trained on labels only: cached targets are
    valid only for the inputs the teacher saw).

    ``on_epoch(state)``: called after every finished epoch with everything needed to go on
    from there (weights, optimizer, scheduler, RNG states, the best epoch so far; tensors and
    plain values, see :func:`_state`). ``resume``: such a state, from which training goes on
    with the next epoch, to the same weights as a run that never stopped (same device).
    """
    from threadpoolctl import threadpool_limits

    # NumPy's share of a step (soft targets, augmentation, the CPU loss kernels) is small
    # arrays; with a BLAS pool of all cores, its threads spin after each call and slowed
    # torch's next ops by up to 1.7x (bench/FINDINGS.md). One BLAS thread while torch trains.
    with threadpool_limits(1, user_api="blas"):
        return _fit(model, train_batches, steps_per_epoch, x_val, y_val, loss_fn, epochs=epochs, lr=lr,
                    weight_decay=weight_decay, seed=seed, device=device, augment=augment,
                    progress=progress, desc=desc, resume=resume, on_epoch=on_epoch)


def _fit(model, train_batches, steps_per_epoch, x_val, y_val, loss_fn, *, epochs, lr, weight_decay,
         seed, device, augment, progress, desc, resume, on_epoch) -> FitResult:
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 0x5EED])
    model.to(device)
    opt = optimizer(model, lr, weight_decay)
    steps = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    result = FitResult(best_epoch=-1, best_val_accuracy=-1.0)
    best_state, best_loss = None, float("inf")
    t0, samples, start, seconds_before = time.perf_counter(), 0, 0, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        rng.bit_generator.state = resume["numpy_rng"]
        torch.set_rng_state(resume["torch_rng"])
        if device.type == "cuda" and resume.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume["cuda_rng"], device)
        best_state, best_loss = resume["best_state"], resume["best_loss"]
        result.best_epoch, result.best_val_accuracy = resume["best_epoch"], resume["best_val_accuracy"]
        result.history = list(resume["history"])
        start, samples, seconds_before = resume["epoch"], resume["samples"], resume["seconds"]
    bar = tqdm(range(start, epochs), desc=desc, unit="epoch", disable=None if progress else True,
               initial=start, total=epochs,
               dynamic_ncols=True)  # disable=None: a bar only on a terminal, not in logs
    for epoch in bar:
        model.train()
        total, seen = 0.0, 0
        for xb, yb, targets in train_batches(epoch):
            loss = train_step(model, opt, xb, yb, targets, loss_fn, device, augment, rng)
            if not math.isfinite(loss):
                raise KdError(f"{desc}: the loss became {loss} in epoch {epoch}; training "
                              f"diverged: lower lr (now {lr:g}) or use a moderate temperature")
            if sched.last_epoch + 1 < steps:  # a stream may yield one short batch more
                sched.step()
            total += loss * len(yb)
            seen += len(yb)
        samples += seen
        val_logits = predict_logits(model, x_val, device)
        val_acc = float((val_logits.argmax(1) == y_val).mean())
        val_loss = float(nn.functional.cross_entropy(torch.from_numpy(val_logits),
                                                     torch.from_numpy(np.asarray(y_val, np.int64))))
        result.history.append({"epoch": epoch, "train_loss": total / max(1, seen),
                               "val_accuracy": val_acc, "val_loss": val_loss})
        if val_acc > result.best_val_accuracy or (val_acc == result.best_val_accuracy and val_loss < best_loss):
            result.best_epoch, result.best_val_accuracy, best_loss = epoch, val_acc, val_loss
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{total / max(1, seen):.3f}", val_acc=f"{val_acc:.4f}",
                        best=f"{result.best_val_accuracy:.4f}",
                        samples_s=f"{samples / (time.perf_counter() - t0):.0f}")
        if on_epoch is not None:
            on_epoch(_state(epoch + 1, model, opt, sched, rng, device, result, best_state, best_loss,
                            samples, seconds_before + time.perf_counter() - t0))
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    result.seconds = seconds_before + time.perf_counter() - t0
    return result


def _state(epochs_done, model, opt, sched, rng, device, result, best_state, best_loss, samples,
           seconds) -> dict:
    """Everything training needs to go on after ``epochs_done`` epochs exactly as if it never
    stopped: the next epoch's batches are seeded by its number, augmentation draws from ``rng``,
    and the one-cycle schedule and AdamW's moments sit in ``sched`` and ``opt``."""
    return {"epoch": epochs_done, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "best_state": best_state, "best_loss": best_loss, "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy, "history": list(result.history),
            "samples": samples, "seconds": seconds}
