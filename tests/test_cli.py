"""The command line: a shard that fails mid-build rolls a fresh cache back; the happy path prints
a JSON summary; Ctrl-C resumes; the slow end-to-end runs train real teachers on digits. (Bad input
in general — exit 2, one line, nothing half-written — is tests/test_bad_input.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_CLASSES, SMALL_DATASET, SMALL_SHAPE, FailOnCall, cache_args, run_cli
from pipeline.cache import format as fmt
from pipeline.cache import open_cache, shard
from pipeline.teachers import TeacherSpec, build_teacher
from stages.cli import main


def cache_cmd(tmp: Path, **overrides) -> list[str]:
    return ["cache", *cache_args(tmp / "cache", tmp, **overrides)]


# --------------------------------------------------------------------------- bad input
# Every bad-input case (exit 2, one line, nothing written) is a row of tests/test_bad_input.py.

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


def test_info_prints_the_normalisation_a_deployment_needs(make_cache, capsys):
    """The README's ONNX and export sections send users to `kdcache info` for the train mean
    and std their inputs must be normalised with: it prints the manifest's, per channel."""
    root = make_cache(dataset="synthetic:300:3x8x8:3")
    pre = fmt.read_manifest(root)["preprocessing"]
    capsys.readouterr()
    assert main(["info", f"cache={root}", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    (line,) = [line for line in out if line.startswith("inputs ")]
    assert len(pre["mean"]) == len(pre["std"]) == 3  # one per channel
    mean = ", ".join(f"{v:.7g}" for v in pre["mean"])
    std = ", ".join(f"{v:.7g}" for v in pre["std"])
    assert line.endswith(f"(3, 8, 8) float32, normalised as (x - mean) / std per channel with train "
                         f"statistics: mean [{mean}], std [{std}]")
    assert json.loads(out[-1])["preprocessing"] == pre


def test_ctrl_c_exits_130_and_resumes(tmp_path, capsys, monkeypatch):
    real = shard.compute_shard
    monkeypatch.setattr(shard, "compute_shard", FailOnCall(real, fail_on=3, error=KeyboardInterrupt))
    assert main(cache_cmd(tmp_path)) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "re-run the same command to resume" in err
    assert (tmp_path / "cache" / fmt.MANIFEST).is_file()  # kept, resumable

    monkeypatch.setattr(shard, "compute_shard", real)
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
    assert summary["outputs_per_s"] > 0 and summary["bytes"] > 0
    # the teacher was trained and saved under teacher_dir, then used for the cache
    # (in a folder named by the dataset, the architecture and 12 hex of the teacher's key)
    assert len(list((tmp_path / "teachers" / "digits").glob("cnn_small-" + "[0-9a-f]" * 12 + "/model.safetensors"))) == 1
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


def test_a_cache_built_with_relative_paths_works_from_any_directory(tmp_path, monkeypatch, capsys):
    """Manifests and run configs hold absolute paths: a cache built in one directory from a
    relative npz, default teacher and relative cache path verifies and trains students from
    another directory."""
    here, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(here)
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    np.savez("signals.npz", x_train=(rng.normal(size=(120, 12)) + y[:, None]).astype(np.float32),
             y_train=y, x_test=(rng.normal(size=(30, 12)) + y[:30, None]).astype(np.float32),
             y_test=y[:30])
    assert main(["cache", "dataset=npz:signals.npz", "teacher=mlp", "epochs=2",
                 "scheduler=synchronous", "cache=caches/signals"]) == 0
    manifest = json.loads((here / "caches/signals/manifest.json").read_text())
    assert re.fullmatch(re.escape(str(here / "data/teachers/npz-signals")) + r"/mlp-[0-9a-f]{12}/model\.safetensors",
                        manifest["teacher"]["ckpt"])
    assert manifest["dataset"]["config"]["dataset"] == f"npz:{here}/signals.npz"
    assert manifest["dataset"]["config"]["data_root"] == str(here / "data/datasets")

    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["verify", f"cache={here}/caches/signals", "--json"]) == 0
    checks = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checks"]
    assert all(v.startswith("ok") for v in checks.values()), checks
    assert main(["student", "cache=../project/caches/signals", "model=mlp", "epochs=1", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["cache"] == str(here / "caches/signals")
    assert row["run_dir"].startswith(str(elsewhere / "data/runs/signals/"))
    config = json.loads((Path(row["run_dir"]) / "config.json").read_text())["config"]
    assert config["cache"] == str(here / "caches/signals") and config["runs_dir"] == str(elsewhere / "data/runs")


# --------------------------------------------------------------------------- threads

@pytest.mark.parametrize(("given", "policy", "spin"), [(None, "PASSIVE", "0"), ("ACTIVE", "ACTIVE", None)])
def test_the_cli_prefers_a_passive_openmp_wait_policy(tmp_path, given, policy, spin):
    """libgomp reads OMP_WAIT_POLICY once, as torch loads it: the CLI must set PASSIVE before
    that (unless the user chose a policy). Checked twice in a fresh process: the variable seen
    inside a verb, and the settings libgomp itself reports (OMP_DISPLAY_ENV=VERBOSE), where
    GOMP_SPINCOUNT is 0 only under a passive policy (300000 under libgomp's default)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    env.update(OMP_DISPLAY_ENV="VERBOSE", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    # a verb of this test's own, registered in the child, reports what a verb sees
    probe = ("import os, sys, types; from stages import cli; import torch; "
             "m = types.ModuleType('probe'); m.main = lambda args: {'policy': os.environ.get("
             "'OMP_WAIT_POLICY'), 'torch': torch.ones(2).sum().item()}; sys.modules['probe'] = m; "
             "cli.VERBS['probe'] = ('probe', ''); sys.exit(cli.main(['probe', '--json']))")
    # the import of stages.cli must come before torch's: the probe imports cli first
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["policy"] == policy
    assert f"OMP_WAIT_POLICY = '{policy}'" in done.stderr
    if spin is not None:
        assert f"GOMP_SPINCOUNT = '{spin}'" in done.stderr
    # a real verb: torch is imported by the verb's module, after the CLI set the policy
    done = subprocess.run([sys.executable, "-m", "stages.cli", "verify", f"cache={tmp_path / 'none'}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and f"OMP_WAIT_POLICY = '{policy}'" in done.stderr, done.stderr
    if spin is not None:
        assert f"GOMP_SPINCOUNT = '{spin}'" in done.stderr


def test_threads_is_applied_by_every_verb_that_runs_torch(make_cache, tmp_path, capsys, monkeypatch):
    """threads=N holds while the verb's torch work runs, in the thread that runs it, and the
    process's own setting is back afterwards."""
    import pipeline.runs
    import pipeline.teacher_training
    import stages.export
    import stages.verify

    seen: dict[str, int] = {}

    def spy(module, name: str, verb: str) -> None:
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            seen[verb] = torch.get_num_threads()
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    spy(pipeline.runs, "_train_student", "student")
    spy(pipeline.teacher_training, "_train_teacher", "teacher")
    spy(stages.verify, "verify", "verify")
    spy(stages.export, "export_run", "export")
    root = make_cache()
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        student = run_cli(capsys, "student", f"cache={root}", "model=mlp", "epochs=1",
                               f"runs_dir={tmp_path / 'runs'}", "threads=1")
        run_cli(capsys, "verify", f"cache={root}", "rows=4", "threads=1")
        run_cli(capsys, "export", f"run={student['run_dir']}", "threads=1")
        run_cli(capsys, "teacher", f"dataset={SMALL_DATASET}", "teacher=cnn_small", "epochs=1",
                     f"teacher_dir={tmp_path / 'teachers'}", "threads=1")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert seen == {"student": 1, "verify": 1, "export": 1, "teacher": 1}
