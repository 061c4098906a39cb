"""`kdcache verify`: a healthy cache passes every check; each way a cache can be wrong while
still reading cleanly is caught by the check made for it, with exit code 1.

Checksums alone cannot catch a cache that was *written* wrong (a writer bug, another teacher's
weights, other preprocessing): its checksums are self-consistent. The fidelity check re-runs the
teacher on sampled rows, and the fingerprint checks compare the teacher and the dataset on disk
with the ones recorded.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from pipeline.cache import shard
from pipeline.teachers import create_teacher
from stages.cli import main
from tests.conftest import SMALL_CLASSES, SMALL_SHAPE

CHECKS = ["shard checksums", "index checksums", "dataset fingerprint", "teacher fingerprint",
          "teacher fidelity"]


def verify(root, capsys, rows: int = 64) -> tuple[int, dict, str]:
    code = main(["verify", f"cache={root}", f"rows={rows}", "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1]), out


def test_a_healthy_cache_passes_every_check(make_cache, capsys):
    root = make_cache(dtype="float16")
    code, summary, out = verify(root, capsys)
    assert code == 0 and summary["ok"] is True
    assert sorted(summary["checks"]) == sorted(CHECKS)
    assert all(v.startswith("ok") for v in summary["checks"].values()), summary["checks"]
    checked = int(re.match(r"ok \((\d+) rows", summary["checks"]["teacher fidelity"]).group(1))
    assert checked == 64  # rows=64, shared among the splits by size
    assert f"verdict: PASS — {root}" in out


def test_logits_written_wrong_are_caught_by_the_fidelity_check(make_cache, capsys, monkeypatch):
    """A writer that stores slightly wrong logits (here: every logit + 0.25) produces a cache
    whose checksums all match: only re-running the teacher can tell."""
    real = shard.compute_shard

    def skewed(job, *args):
        shard = real(job, *args)
        for key, buf in shard.bufs.items():
            if key.endswith("logits"):
                buf += np.float16(0.25)
        return shard

    monkeypatch.setattr(shard, "compute_shard", skewed)
    root = make_cache()
    monkeypatch.setattr(shard, "compute_shard", real)
    code, summary, out = verify(root, capsys)
    assert code == 1 and summary["ok"] is False
    checks = summary["checks"]
    assert checks["shard checksums"] == "ok" and checks["index checksums"] == "ok"
    assert checks["teacher fidelity"].startswith("FAILED: cached logits differ from a fresh forward")
    assert "verdict: FAIL" in out


def test_a_replaced_teacher_checkpoint_fails_the_teacher_fingerprint(make_cache, tmp_path, capsys):
    ckpt = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(create_teacher("cnn_small", SMALL_SHAPE, SMALL_CLASSES).state_dict(), ckpt)
    root = make_cache(teacher_ckpt=ckpt)
    torch.manual_seed(1)  # retrained in place: same path, other weights
    torch.save(create_teacher("cnn_small", SMALL_SHAPE, SMALL_CLASSES).state_dict(), ckpt)
    code, summary, _ = verify(root, capsys)
    assert code == 1
    assert summary["checks"]["teacher fingerprint"].startswith("FAILED")
    assert "teacher fidelity" not in summary["checks"]  # not compared against the wrong weights
    assert summary["checks"]["shard checksums"] == "ok"


def test_a_changed_dataset_fails_the_dataset_fingerprint(make_cache, tmp_path, capsys):
    rng = np.random.default_rng(0)
    npz = tmp_path / "data.npz"
    arrays = {"x_train": rng.normal(size=(160, *SMALL_SHAPE)).astype(np.float32),
              "y_train": rng.integers(0, 3, 160),
              "x_test": rng.normal(size=(40, *SMALL_SHAPE)).astype(np.float32),
              "y_test": rng.integers(0, 3, 40)}
    np.savez(npz, **arrays)
    root = make_cache(dataset=f"npz:{npz}")
    arrays["x_train"][17, 0, 3, 3] += 1.0  # one value of one sample
    np.savez(npz, **arrays)
    code, summary, _ = verify(root, capsys)
    assert code == 1
    assert summary["checks"]["dataset fingerprint"].startswith("FAILED")
    assert "differs" in summary["checks"]["dataset fingerprint"]


@pytest.mark.parametrize("rows, sizes, expected", [
    (64, {"train": 240, "val": 30, "test": 30}, {"train": 51, "val": 7, "test": 6}),
    (256, {"train": 1221, "val": 216, "test": 360}, {"train": 174, "val": 31, "test": 51}),
    (10, {"train": 5, "val": 2, "test": 2}, {"train": 5, "val": 2, "test": 2}),  # all rows
    (2, {"train": 100, "val": 10, "test": 10}, {"train": 2, "val": 1, "test": 1}),  # >= 1 each
])
def test_verify_apportions_rows_among_splits_exactly(rows, sizes, expected):
    from pipeline.cache.verify import apportion

    shares = apportion(rows, sizes)
    assert shares == expected
    if rows >= len(sizes):
        assert sum(shares.values()) == min(rows, sum(sizes.values()))


def test_a_flipped_byte_fails_the_shard_checksum_and_names_the_repair(make_cache, capsys):
    """Damage is a failed check, not bad input: the whole table, exit 1, and the way out. The
    fidelity check, which reads cached logits, fails on the damaged shard instead of stopping."""
    from test_faults import shard_file

    root = make_cache()
    path = shard_file(root, "train/logits", 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    code, summary, out = verify(root, capsys, rows=300)  # every row: the damaged shard is read
    assert code == 1 and summary["ok"] is False
    assert sorted(summary["checks"]) == sorted(CHECKS)
    assert summary["checks"]["shard checksums"] == "FAILED: train/logits shard 1"
    assert summary["checks"]["index checksums"] == "ok"
    assert summary["checks"]["teacher fidelity"].startswith("FAILED: cache array")
    assert f"kdcache cache cache={root} repair=true" in summary["checks"]["teacher fidelity"]
    assert f"verdict: FAIL — {root}" in out
    assert f"repair: `kdcache cache cache={root} repair=true` recomputes the damaged shards" in out
