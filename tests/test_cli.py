"""The command line: bad input exits 2 with one line on stderr and leaves nothing half-written;
the happy path prints a JSON summary; the slow end-to-end runs train real teachers on digits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from conftest import SMALL_CLASSES, SMALL_SHAPE, build, cache_args
from pipeline.cache import format as fmt
from pipeline.cache import open_cache, writer
from pipeline.teachers import TeacherSpec, build_teacher, create_teacher
from stages.cli import main

KDCACHE = Path(sys.executable).parent / "kdcache"


def cache_cmd(tmp: Path, **overrides) -> list[str]:
    return ["cache", *cache_args(tmp / "cache", tmp, **overrides)]


def write_npz(path: Path, n_train=40, n_test=12, width=6, **replace) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.standard_normal((n_train, width)).astype(np.float32),
              "y_train": np.arange(n_train) % 3,
              "x_test": rng.standard_normal((n_test, width)).astype(np.float32),
              "y_test": np.arange(n_test) % 3}
    arrays.update(replace)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- bad input cases
# name -> (setup(tmp) -> argv, regex the one stderr line must match)

def _npz_case(**replace) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        path = write_npz(tmp / "data.npz", **replace)
        return cache_cmd(tmp, dataset=f"npz:{path}", teacher="mlp")
    return setup


def _not_a_zip(tmp: Path) -> list[str]:
    (tmp / "data.npz").write_text("definitely not a zip file")
    return cache_cmd(tmp, dataset=f"npz:{tmp / 'data.npz'}", teacher="mlp")


def _foreign_ckpt(tmp: Path) -> list[str]:
    torch.save(create_teacher("mlp", SMALL_SHAPE, SMALL_CLASSES).state_dict(), tmp / "mlp.pt")
    return cache_cmd(tmp, teacher_ckpt=tmp / "mlp.pt")


def _nan_ckpt(tmp: Path) -> list[str]:
    model = build_teacher(TeacherSpec("cnn_small", SMALL_SHAPE, SMALL_CLASSES, "random", 0))
    state = model.state_dict()
    state["head.weight"] = torch.full_like(state["head.weight"], float("nan"))
    torch.save(state, tmp / "nan.pt")
    return cache_cmd(tmp, teacher_ckpt=tmp / "nan.pt")


def _nan_features_ckpt(tmp: Path) -> list[str]:
    model = build_teacher(TeacherSpec("cnn_small", SMALL_SHAPE, SMALL_CLASSES, "random", 0))
    state = model.state_dict()
    state["block1.1.running_var"] = torch.full_like(state["block1.1.running_var"], -1.0)  # sqrt(<0)
    torch.save(state, tmp / "neg_var.pt")
    return cache_cmd(tmp, teacher_ckpt=tmp / "neg_var.pt")


def _not_a_cache_dir(tmp: Path) -> list[str]:
    (tmp / "cache").mkdir()
    (tmp / "cache" / "thesis.tex").write_text("precious")
    return cache_cmd(tmp)


def _not_a_cache_file(tmp: Path) -> list[str]:
    (tmp / "cache").write_text("precious")
    return cache_cmd(tmp)


def _another_teacher(tmp: Path) -> list[str]:
    build(tmp / "cache", tmp)  # a cache from the seed-0 random teacher
    return cache_cmd(tmp, seed=1)


BAD_INPUT: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "unknown verb": (lambda tmp: ["frobnicate", "dataset=digits"],
                     r"^kdcache frobnicate: error: unknown verb 'frobnicate'; verbs: teacher, cache, info"),
    "unknown option": (lambda tmp: [*cache_cmd(tmp), "--force"], r"unknown option '--force'"),
    "unknown key": (lambda tmp: cache_cmd(tmp, colour="red"),
                    r"unknown key 'colour' for `kdcache cache`; known keys: .*shard_size"),
    "not key=value": (lambda tmp: [*cache_cmd(tmp), "digits"], r"argument 'digits' is not key=value"),
    "bad value type": (lambda tmp: cache_cmd(tmp, shard_size="big"),
                       r"shard_size='big' is not valid: shard_size expects an integer"),
    "value out of range": (lambda tmp: cache_cmd(tmp, t="0"), r"t=0.0 must be > 0"),
    "unknown dataset": (lambda tmp: cache_cmd(tmp, dataset="mnist"),
                        r"unknown dataset 'mnist'; known: digits, imagefolder, npz, synthetic, torchvision"),
    "unknown teacher": (lambda tmp: cache_cmd(tmp, teacher="vgg99"), r"unknown teacher 'vgg99'; known: .*cnn_small"),
    "teacher does not fit inputs": (lambda tmp: cache_cmd(tmp, teacher="resnet18"),
                                    r"teacher resnet18 needs 3-channel images"),
    "unknown layer": (lambda tmp: cache_cmd(tmp, layers="fc9"), r"teacher cnn_small has no layer 'fc9'"),
    "missing npz": (lambda tmp: cache_cmd(tmp, dataset=f"npz:{tmp / 'missing.npz'}", teacher="mlp"),
                    r"npz file .*missing.npz does not exist"),
    "malformed npz": (_not_a_zip, r"data.npz is not a readable .npz archive"),
    "npz missing key": (_npz_case(y_test=None), r"has no array 'y_test'"),
    "label out of range": (_npz_case(y_test=np.arange(12) % 5),
                           r"labels must be 0..4 and each must occur in y_train; missing from y_train: \[3, 4\]"),
    "non-finite npz inputs": (_npz_case(x_test=np.full((12, 6), np.inf, np.float32)),
                              r"x_test has 12 rows with NaN or inf"),
    "checkpoint does not fit": (_foreign_ckpt, r"checkpoint .*mlp.pt does not fit teacher cnn_small"),
    "missing checkpoint": (lambda tmp: cache_cmd(tmp, teacher_ckpt=tmp / "nope.pt"),
                           r"teacher checkpoint .*nope.pt does not exist"),
    "checkpoint with NaN weights": (_nan_ckpt, r"teacher cnn_small produced NaN/inf outputs"),
    "checkpoint giving NaN features": (_nan_features_ckpt, r"teacher cnn_small produced NaN/inf outputs"),
    "cache of another teacher": (_another_teacher, r"cache .* was built from another teacher .*overwrite=true"),
    "path is a directory, not a cache": (_not_a_cache_dir, r"exists and is not a kdcache cache"),
    "path is a file, not a cache": (_not_a_cache_file, r"exists and is not a kdcache cache"),
    "info on a missing cache": (lambda tmp: ["info", f"cache={tmp / 'cache'}"],
                                r"^kdcache info: error: no kdcache cache at .*manifest.json missing"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    setup, pattern = BAD_INPUT[case]
    argv = setup(tmp_path)
    root = tmp_path / "cache"
    before = snapshot(root) if root.exists() else None
    capsys.readouterr()

    code = main(argv)

    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"kdcache {argv[0]}: error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in out + err
    # nothing half-written: no new cache, and an existing path is left exactly as it was
    if before is None:
        assert not root.exists()
    else:
        assert snapshot(root) == before
    if case == "cache of another teacher":
        assert open_cache(root).manifest["status"] == "complete"
    assert not list(tmp_path.glob(".cache.init-*"))


def test_failure_inside_a_shard_rolls_back_a_fresh_cache(tmp_path, capsys, recwarn):
    """Logits that are finite in float32 but overflow float16 are only caught while shards are
    written: the half-built cache must be removed, since resuming would fail the same way."""
    model = build_teacher(TeacherSpec("cnn_small", SMALL_SHAPE, SMALL_CLASSES, "random", 0))
    state = model.state_dict()
    state["head.weight"] = state["head.weight"] * 1e7
    torch.save(state, tmp_path / "loud.pt")
    capsys.readouterr()
    assert main(cache_cmd(tmp_path, teacher_ckpt=tmp_path / "loud.pt")) == 2
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("kdcache cache: error: teacher produced NaN/inf logits in train rows 0-64")
    assert "use dtype=float32" in last
    assert "Traceback" not in out + err
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # no extra stderr noise
    assert not (tmp_path / "cache").exists()
    assert not list(tmp_path.glob(".cache.init-*"))
    # the advice works
    assert main(cache_cmd(tmp_path, teacher_ckpt=tmp_path / "loud.pt", dtype="float32")) == 0
    assert np.abs(open_cache(tmp_path / "cache").raw_logits("val")).max() > 65504


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(KDCACHE), *argv], cwd=cwd, env=dict(os.environ), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("case", ["unknown key", "checkpoint with NaN weights"])
def test_real_process_exits_2_without_traceback(tmp_path, case):
    setup, pattern = BAD_INPUT[case]
    proc = _run(setup(tmp_path), tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.search(pattern, lines[0])
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- happy path

def test_help_lists_verbs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kdcache VERB") and "cache" in out and "info" in out


def test_json_summary_is_last_stdout_line(tmp_path, capsys):
    assert main([*cache_cmd(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == {"train": 240, "val": 30, "test": 30}
    assert summary["computed_rows"] == 300 and summary["skipped"] is False
    assert summary["cache"] == str(tmp_path / "cache")

    assert main([*cache_cmd(tmp_path), "--json"]) == 0  # the same command again: nothing to do
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["skipped"] is True and again["computed_rows"] == 0

    assert main(["info", f"cache={tmp_path / 'cache'}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("rows", "teacher_accuracy", "teacher_fingerprint", "dataset_fingerprint", "bytes", "cache"):
        assert info[key] == summary[key]


def test_ctrl_c_exits_130_and_resumes(tmp_path, capsys, monkeypatch):
    real = writer.build_shard
    calls = []

    def interrupted(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(writer, "build_shard", interrupted)
    assert main(cache_cmd(tmp_path)) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "re-run the same command to resume" in err
    assert (tmp_path / "cache" / fmt.MANIFEST).is_file()  # kept, resumable

    monkeypatch.setattr(writer, "build_shard", real)
    assert main([*cache_cmd(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["computed_rows"] == 300 - 2 * 64
    assert open_cache(tmp_path / "cache").num_rows("train") == 240


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_digits_end_to_end(tmp_path, capsys):
    common = [f"teacher_dir={tmp_path / 'teachers'}", f"cache_root={tmp_path / 'caches'}",
              "scheduler=synchronous"]
    assert main(["cache", "dataset=digits", "epochs=3", *common, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    root = tmp_path / "caches" / "digits-cnn_small"
    assert summary["cache"] == str(root)
    assert summary["teacher"] == "cnn_small"
    assert set(summary["rows"]) == {"train", "val", "test"}
    assert sum(summary["rows"].values()) == 1797 and summary["rows"]["test"] == 360
    assert set(summary["teacher_accuracy"]) == {"train", "val", "test"}
    assert all(0.0 <= a <= 1.0 for a in summary["teacher_accuracy"].values())
    assert summary["samples_per_s"] > 0 and summary["bytes"] > 0
    # the teacher was trained and saved under teacher_dir, then used for the cache
    assert (tmp_path / "teachers" / "digits" / "cnn_small" / "model.safetensors").is_file()
    assert not (tmp_path / "data").exists()

    assert main(["info", f"cache={root}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("rows", "teacher_accuracy", "bytes", "cache", "teacher_fingerprint", "dataset_fingerprint"):
        assert info[key] == summary[key], key
    cache = open_cache(root)
    assert cache.teacher_accuracy("test") == summary["teacher_accuracy"]["test"]


@pytest.mark.slow
def test_signal_npz_with_cnn1d_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 48, dtype=np.float32)

    def signals(n):
        y = np.arange(n) % 3
        x = np.sin(2 * np.pi * (y[:, None] + 1) * 3 * t) + 0.3 * rng.standard_normal((n, 48))
        return x.astype(np.float32), y

    x_train, y_train = signals(150)
    x_test, y_test = signals(30)
    path = tmp_path / "sig.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    argv = ["cache", f"dataset=npz:{path}", "teacher=cnn1d", "epochs=3", "scheduler=synchronous",
            f"teacher_dir={tmp_path / 'teachers'}", f"cache_root={tmp_path / 'caches'}", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["teacher"] == "cnn1d" and summary["num_classes"] == 3
    assert summary["rows"]["test"] == 30 and sum(summary["rows"].values()) == 180
    assert summary["layers"] == {"embed": [128]}
    cache = open_cache(summary["cache"])
    np.testing.assert_array_equal(cache.sample_ids("test"), np.arange(150, 180))
    np.testing.assert_array_equal(cache.labels("test"), y_test)
