"""pipeline.latency: milliseconds per sample, the same protocol for teacher and students."""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.latency import per_sample_ms, torch_predict


def test_per_sample_ms_divides_the_median_call_by_the_batch():
    calls = []

    def predict(batch):  # a model whose every call takes at least 2 ms, whatever the batch
        calls.append(len(batch))
        time.sleep(0.002)

    out = per_sample_ms(predict, np.zeros((3, 4), np.float32))
    assert set(calls) == {1, 256}  # batches larger than the rows repeat them
    assert out["batch_1_ms"] >= 2.0 and out["batch_256_ms"] >= 2.0 / 256
    assert out["batch_256_ms"] < out["batch_1_ms"] / 50  # per sample, not per call
    assert calls.count(1) >= 6 and out["device"] == "cpu" and out["threads"] >= 1


def test_torch_predict_runs_inference_in_eval_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Dropout(0.9)).train()
    predict = torch_predict(model)
    x = np.ones((5, 4), np.float32)
    first, second = predict(x), predict(x)
    assert not model.training and torch.equal(first, second) and not first.requires_grad
