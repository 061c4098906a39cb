"""The stored default teacher: keyed by the data it was trained on and its training settings,
never reused for other data; its training prints a line per epoch, checkpoints every epoch and
resumes after Ctrl-C to the very same weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import teacher_training
from pipeline.config import TeacherConfig
from pipeline.settings import resolve
from pipeline.data import open_dataset
from pipeline.errors import KdError
from stages.cli import main



def _signals(path: Path, classes: int, shift: int, seed: int) -> Path:
    """An npz of separable (N, 12) rows: class k is centred at (k + shift) % classes, so two
    files with other shifts hold the same inputs under other labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(150) % classes
    x = (rng.normal(size=(150, 12)) + 4.0 * ((y[:, None] + shift) % classes)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=x[:120], y_train=y[:120], x_test=x[120:], y_test=y[120:])
    return path


def _cache(tmp: Path, npz: Path, name: str, capsys) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    rc = main(["cache", f"dataset=npz:{npz}", "teacher=mlp", "epochs=6", "lr=0.01",
               "scheduler=synchronous", f"teacher_dir={tmp / 'teachers'}", f"cache={tmp / name}",
               "--json"])
    out, err = capsys.readouterr()
    return rc, json.loads(out.strip().splitlines()[-1]) if rc == 0 else None, err


def _stored(tmp: Path) -> list[Path]:
    return sorted(p.parent for p in (tmp / "teachers").rglob("model.safetensors"))


def test_a_same_named_file_of_other_data_trains_its_own_teacher(tmp_path, capsys):
    a = _signals(tmp_path / "a" / "sig.npz", 3, shift=0, seed=0)
    b = _signals(tmp_path / "b" / "sig.npz", 3, shift=1, seed=0)  # same inputs, other labels
    rc, first, err = _cache(tmp_path, a, "ca", capsys)
    assert rc == 0, err
    rc, second, err = _cache(tmp_path, b, "cb", capsys)
    assert rc == 0, err
    # the teacher of b is b's own: the one of a scores ~0 on b's labels
    assert first["teacher_accuracy"]["test"] > 0.9 and second["teacher_accuracy"]["test"] > 0.9
    stored = _stored(tmp_path)
    assert len(stored) == 2 and all(p.parent.name == "npz-sig" for p in stored)
    manifests = [json.loads((tmp_path / c / "manifest.json").read_text()) for c in ("ca", "cb")]
    assert {Path(m["teacher"]["ckpt"]).parent for m in manifests} == set(stored)
    for m in manifests:  # each stored teacher records the fingerprint of the data it learnt
        recorded = json.loads((Path(m["teacher"]["ckpt"]).parent / "metrics.json").read_text())
        assert recorded["dataset_fingerprint"] == m["dataset"]["fingerprint"]
    for p in stored:
        config = json.loads((p / "config.json").read_text())
        assert config["dataset_fingerprint"] == json.loads((p / "metrics.json").read_text())["dataset_fingerprint"]
    # another cache of b uses b's stored teacher: nothing is trained again
    mtimes = [(p / "model.safetensors").stat().st_mtime_ns for p in stored]
    rc, again, err = _cache(tmp_path, b, "cb2", capsys)
    assert rc == 0 and "epoch" not in err, err
    assert again["teacher_fingerprint"] == second["teacher_fingerprint"]
    assert _stored(tmp_path) == stored and [(p / "model.safetensors").stat().st_mtime_ns for p in stored] == mtimes


def test_a_same_named_file_with_other_classes_trains_its_own_teacher(tmp_path, capsys):
    """A 3-class teacher stored for a/sig.npz is not offered to the 4-class b/sig.npz (which
    used to fail with a message blaming the architecture)."""
    rc, _, err = _cache(tmp_path, _signals(tmp_path / "a" / "sig.npz", 3, 0, 0), "ca", capsys)
    assert rc == 0, err
    rc, summary, err = _cache(tmp_path, _signals(tmp_path / "b" / "sig.npz", 4, 0, 1), "cb", capsys)
    assert rc == 0, err
    assert summary["num_classes"] == 4 and summary["teacher_accuracy"]["test"] > 0.9
    assert "architecture" not in err


def test_a_checkpoint_for_another_class_count_is_not_blamed_on_the_architecture(tmp_path, capsys):
    from pipeline.teachers import create_teacher

    npz = _signals(tmp_path / "sig.npz", 3, 0, 0)
    ckpt = tmp_path / "five.pt"
    torch.save(create_teacher("mlp", (12,), 5).state_dict(), ckpt)
    rc = main(["cache", f"dataset=npz:{npz}", "teacher=mlp", f"teacher_ckpt={ckpt}",
               f"cache={tmp_path / 'c'}", "scheduler=synchronous"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "five.pt holds a mlp teacher for 5 classes, but" in err and "3 classes" in err
    assert "architecture" not in err and "teacher=" not in err


def test_a_stored_teacher_of_other_data_is_refused(tmp_path, capsys):
    """A teacher folder copied by hand to where another dataset's teacher belongs: the
    recorded dataset fingerprint does not match, and the teacher is refused in one line."""
    a = _signals(tmp_path / "a" / "sig.npz", 3, 0, 0)
    b = _signals(tmp_path / "b" / "sig.npz", 3, 1, 0)
    assert _cache(tmp_path, a, "ca", capsys)[0] == 0
    (stored,) = _stored(tmp_path)
    cfg = resolve(TeacherConfig, [f"dataset=npz:{b}", "teacher=mlp", "epochs=6", "lr=0.01",
                                  f"teacher_dir={tmp_path / 'teachers'}"], verb="teacher")
    target = teacher_training.teacher_dir(cfg, open_dataset(cfg))
    assert target != stored
    shutil.copytree(stored, target)
    rc, _, err = _cache(tmp_path, b, "cb", capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"stored teacher {target} was trained on other data" in err
    assert not (tmp_path / "cb").exists()


def test_old_layout_teachers_are_not_used(tmp_path, capsys):
    """A teacher stored before teachers were keyed (<slug>/<arch>/) records no dataset
    fingerprint: it is never used, a new one is trained beside it."""
    npz = _signals(tmp_path / "a" / "sig.npz", 3, 1, 0)
    old = tmp_path / "teachers" / "npz-sig" / "mlp"
    old.mkdir(parents=True)
    from safetensors.torch import save_file

    from pipeline.teachers import create_teacher

    save_file(create_teacher("mlp", (12,), 3).state_dict(), str(old / "model.safetensors"))
    rc, summary, err = _cache(tmp_path, npz, "c", capsys)
    assert rc == 0, err
    assert Path(summary["cache"]).is_dir() and summary["teacher_accuracy"]["test"] > 0.9
    assert len(list((tmp_path / "teachers" / "npz-sig").iterdir())) == 2


# --------------------------------------------------------------------------- progress and resume

def _tiny(tmp: Path) -> str:
    """A dataset whose best validation epoch is the last of 4 (so the final weights come from
    after an interruption at epoch 2), with (2, 12) rows: shift:1 augmentation by default, so
    the augmentation's RNG is resumed too."""
    path = tmp / "tiny.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        y = np.arange(150) % 3
        x = (rng.normal(size=(150, 2, 12)) + y[:, None, None]).astype(np.float32)
        np.savez(path, x_train=x[:120], y_train=y[:120], x_test=x[120:], y_test=y[120:])
    return f"dataset=npz:{path}"


def _teacher_cfg(tmp: Path, teachers: str = "teachers", *extra: str) -> TeacherConfig:
    return resolve(TeacherConfig, [_tiny(tmp), "teacher=mlp", "epochs=4", "batch_size=32", "device=cpu",
                                   f"teacher_dir={tmp / teachers}", *extra], verb="teacher")


class StopAfter:
    """Wraps the per-epoch checkpoint save: records each finished epoch and raises
    KeyboardInterrupt (Ctrl-C) once epoch ``stop`` is saved."""

    def __init__(self, real, stop: int | None = None):
        self.real, self.stop, self.epochs = real, stop, []

    def __call__(self, folder, state):
        self.real(folder, state)
        self.epochs.append(state["epoch"])
        if state["epoch"] == self.stop:
            raise KeyboardInterrupt


def _weights(cfg: TeacherConfig) -> dict:
    return load_file(str(teacher_training.default_checkpoint(cfg, open_dataset(cfg))))


def test_an_interrupted_teacher_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    real = teacher_training.save_checkpoint
    straight = _teacher_cfg(tmp_path, "straight")
    hook = StopAfter(real)
    monkeypatch.setattr(teacher_training, "save_checkpoint", hook)
    teacher_training.train_teacher(straight, open_dataset(straight))
    assert hook.epochs == [1, 2, 3, 4]

    cfg = _teacher_cfg(tmp_path, "resumed")
    hook = StopAfter(real, stop=2)
    monkeypatch.setattr(teacher_training, "save_checkpoint", hook)
    with pytest.raises(KeyboardInterrupt, match=r"teacher training stopped after epoch 2/4; re-run "
                                                r"the same command to resume from there"):
        teacher_training.train_teacher(cfg, open_dataset(cfg))
    dataset = open_dataset(cfg)
    final = teacher_training.teacher_dir(cfg, dataset)
    assert not final.exists() and teacher_training.incomplete_dir(cfg, dataset).is_dir()

    hook = StopAfter(real)
    monkeypatch.setattr(teacher_training, "save_checkpoint", hook)
    capsys.readouterr()
    summary = teacher_training.train_teacher(cfg, open_dataset(cfg))
    assert hook.epochs == [3, 4]  # epochs 1 and 2 were not trained again
    assert "resuming teacher training after epoch 2/4" in capsys.readouterr().err
    a, b = _weights(straight), _weights(cfg)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        assert a[name].reshape(-1).view(torch.uint8).equal(b[name].reshape(-1).view(torch.uint8)), name
    metrics = [json.loads((teacher_training.teacher_dir(c, dataset) / "metrics.json").read_text())
               for c in (straight, cfg)]
    assert metrics[0]["history"] == metrics[1]["history"]
    assert summary["best_epoch"] == metrics[0]["best_epoch"] == 3  # weights trained after the resume
    assert not teacher_training.incomplete_dir(cfg, dataset).exists()  # removed once saved


def test_a_changed_config_does_not_resume_another_configs_checkpoint(tmp_path, monkeypatch):
    real = teacher_training.save_checkpoint
    cfg = _teacher_cfg(tmp_path)
    monkeypatch.setattr(teacher_training, "save_checkpoint", StopAfter(real, stop=2))
    with pytest.raises(KeyboardInterrupt):
        teacher_training.train_teacher(cfg, open_dataset(cfg))
    for change in ("lr=0.001", "epochs=3", "weight_decay=0.01", "batch_size=16", "teacher_augment=none",
                   "seed=1"):
        other = _teacher_cfg(tmp_path, "teachers", change)
        hook = StopAfter(real, stop=1)
        monkeypatch.setattr(teacher_training, "save_checkpoint", hook)
        with pytest.raises(KeyboardInterrupt, match="after epoch 1/"):
            teacher_training.train_teacher(other, open_dataset(other))
        assert hook.epochs == [1], change  # started from the first epoch
    # the first config's checkpoint is still there, and resumes
    hook = StopAfter(real)
    monkeypatch.setattr(teacher_training, "save_checkpoint", hook)
    teacher_training.train_teacher(cfg, open_dataset(cfg))
    assert hook.epochs == [3, 4]


def test_teacher_training_prints_a_line_per_epoch(tmp_path, capsys):
    cfg = _teacher_cfg(tmp_path)
    teacher_training.train_teacher(cfg, open_dataset(cfg))
    lines = [line for line in capsys.readouterr().err.splitlines() if "epoch" in line]
    assert len(lines) == 4
    for i, line in enumerate(lines, 1):
        assert line.startswith(f"teacher mlp: epoch {i}/4  loss "), line
        for part in ("val ", "best ", "elapsed ", "eta "):
            assert part in line, line


def test_ctrl_c_in_the_teacher_verb_says_what_was_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(teacher_training, "save_checkpoint",
                        StopAfter(teacher_training.save_checkpoint, stop=3))
    rc = main(["teacher", _tiny(tmp_path), "teacher=mlp", "epochs=4", "device=cpu",
               f"teacher_dir={tmp_path / 'teachers'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130
    assert err[-1] == ("kdcache teacher: interrupted; teacher training stopped after epoch 3/4; "
                       "re-run the same command to resume from there")


def test_stopped_after_the_last_epoch_resumes_to_saving_only(tmp_path, monkeypatch):
    """Ctrl-C after the last epoch's checkpoint (while test is scored or the teacher saved):
    the re-run trains nothing and saves the best epoch's weights."""
    cfg = _teacher_cfg(tmp_path)
    monkeypatch.setattr(teacher_training, "save_checkpoint", StopAfter(teacher_training.save_checkpoint, stop=4))
    with pytest.raises(KeyboardInterrupt, match="after epoch 4/4"):
        teacher_training.train_teacher(cfg, open_dataset(cfg))
    hook = StopAfter(teacher_training.save_checkpoint.real)
    monkeypatch.setattr(teacher_training, "save_checkpoint", hook)
    summary = teacher_training.train_teacher(cfg, open_dataset(cfg))
    assert hook.epochs == [] and summary["best_epoch"] == 3 and Path(summary["checkpoint"]).is_file()


def test_stopped_before_the_first_epoch_finished_says_so(tmp_path, monkeypatch):
    from pipeline import training

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_step", interrupt)
    cfg = _teacher_cfg(tmp_path)
    with pytest.raises(KeyboardInterrupt, match=r"teacher training stopped in epoch 1/4, before any "
                                                r"epoch finished; re-run the same command to start it again"):
        teacher_training.train_teacher(cfg, open_dataset(cfg))


def test_a_plain_ctrl_c_keeps_the_generic_note(monkeypatch, capsys):
    """Only a StoppedEarly carries its own message; any other KeyboardInterrupt (the signal's,
    or one a library raised with a message) gets the CLI's note."""
    import stages.info

    def interrupted(args):
        raise KeyboardInterrupt("a library's words")

    monkeypatch.setattr(stages.info, "main", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err.strip() == ("kdcache info: interrupted; nothing finished was lost — "
                                               "re-run the same command to resume")
