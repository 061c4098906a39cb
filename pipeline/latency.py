"""Prediction latency per sample, measured the same way for the teacher and for every student,
so "N× faster" compares like with like.

One protocol: on the CPU, with the process's torch threads, on real rows already in memory
(reading them is not the model's cost); for each batch size one untimed warm-up call, then
timed calls until at least ``MIN_CALLS`` calls and ``MIN_SECONDS`` have passed, or
``MAX_SECONDS`` (so a slow model may get fewer calls, at least one); the median call divided
by the batch size. Batch 1 is the latency
of serving one request; batch 256 the cost per sample of bulk scoring.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import numpy as np
import torch

BATCH_SIZES = (1, 256)
# a language model (teacher or student) is timed per window of seq_len tokens, at 1 and 8
# windows per call: 256 windows of a real LM would take minutes per call
WINDOW_BATCHES = (1, 8)


def tokens_per_s(seq_len: int, window_ms: float | None) -> float | None:
    """Tokens per second of a language model timed at ``window_ms`` per window of ``seq_len``."""
    return None if not window_ms else round(seq_len * 1000.0 / window_ms, 3)
MIN_CALLS, MIN_SECONDS, MAX_SECONDS = 5, 0.1, 3.0


def per_sample_ms(predict: Callable[[np.ndarray], object], rows: np.ndarray,
                  batch_sizes: tuple[int, ...] = BATCH_SIZES) -> dict:
    """``{"batch_1_ms": ..., "batch_256_ms": ..., "threads": ..., "device": "cpu"}``:
    milliseconds per sample of ``predict(batch)`` at each batch size. ``rows`` holds at least
    one row; a batch larger than ``rows`` repeats them (timing does not depend on values)."""
    rows = np.ascontiguousarray(rows)
    out = {}
    for size in batch_sizes:
        batch = np.ascontiguousarray(np.resize(rows, (size, *rows.shape[1:])))
        predict(batch)  # warm-up: allocator, lazy initialisation, caches
        times: list[float] = []
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            predict(batch)
            times.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - start
            if (len(times) >= MIN_CALLS and elapsed >= MIN_SECONDS) or elapsed >= MAX_SECONDS:
                break
        out[f"batch_{size}_ms"] = round(statistics.median(times) * 1000 / size, 6)
    return {**out, "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "device": "cpu"}


def torch_predict(model: torch.nn.Module) -> Callable[[np.ndarray], object]:
    """``predict(batch)`` for a module on the CPU: one inference-mode forward pass in eval mode."""
    model = model.eval()

    @torch.inference_mode()
    def predict(batch: np.ndarray):
        return model(torch.from_numpy(batch))

    return predict
