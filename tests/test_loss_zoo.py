"""The loss zoo through the CLI: every registered loss trains a student from a cache, a sweep
over the zoo lands one row per loss and the report groups them, map losses read an unpooled
cache's map and the student's layer of the same name, and each option a loss declares
(loss_weight, standardize_logits, student_layer) is recorded in the run's row and config."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.losses import LOSSES
from pipeline.results import read_results, results_dir
from stages.cli import main as cli


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    from conftest import build

    work = tmp_path_factory.mktemp("zoo")
    build(work / "cache", work)
    return work / "cache"


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """A cache of cnn_small's last conv block, unpooled ([C, 4, 4] per row)."""
    from conftest import build

    work = tmp_path_factory.mktemp("zoo-maps")
    build(work / "cache", work, layers="block3.2", pool="false")
    return work / "cache"


def run(capsys, *argv: str) -> dict:
    from conftest import run_cli

    return run_cli(capsys, *argv)


def config_of(row: dict) -> dict:
    from pathlib import Path

    return json.loads((Path(row["run_dir"]) / "config.json").read_text())["config"]["params"]


def test_a_sweep_over_the_zoo_lands_one_row_per_loss_and_the_report_groups_them(pooled, tmp_path, capsys):
    copy = tmp_path / "cache"
    shutil.copytree(pooled, copy)
    zoo = "kd dkd dist nkd rkd pkt sp crd"
    summary = run(capsys, "sweep", f"cache={copy}", f"runs_dir={tmp_path}/runs", "grid.model=cnn_small",
                  f"grid.loss={zoo}", "grid.seed=0", "epochs=1")
    rows = read_results(results_dir(copy)).to_pylist()
    assert summary["runs"] == 8 and sorted(r["loss"] for r in rows) == sorted(zoo.split())
    for r in rows:
        needs = LOSSES.declared(r["loss"])
        assert r["loss_weight"] == needs.weight  # the declared default, recorded
        assert r.get("standardize_logits") == (False if needs.temperature else None)
        assert r.get("student_layer") == ("embed" if needs.features else None)
        assert (r.get("temperature") is not None) == needs.temperature
    report = run(capsys, "report", f"cache={copy}", f"out={tmp_path}/report")
    text = (tmp_path / "report" / "leaderboard.md").read_text()
    by_loss = text.split("## By loss")[1].split("##")[0]
    assert all(f"| cnn_small | {name} |" in by_loss for name in zoo.split())
    assert report["runs"] == 8


def test_options_a_loss_declares_are_recorded(pooled, tmp_path, capsys):
    row = run(capsys, "student", f"cache={pooled}", f"runs_dir={tmp_path}/runs", "model=mlp",
              "loss=dist", "standardize_logits=true", "loss_weight=0.5", "epochs=1")
    assert row["standardize_logits"] is True and row["loss_weight"] == 0.5
    config = config_of(row)
    assert config["standardize_logits"] is True and config["loss_weight"] == 0.5
    assert "student_layer" not in config  # dist reads no feature

    row = run(capsys, "student", f"cache={pooled}", f"runs_dir={tmp_path}/runs", "model=cnn_small",
              "loss=sp", "student_layer=block2.2", "epochs=1")
    assert row["student_layer"] == "block2.2" and config_of(row)["student_layer"] == "block2.2"
    assert row["loss_weight"] == LOSSES.declared("sp").weight and "standardize_logits" not in row


def test_attention_transfer_reads_the_cached_map_and_the_students_layer_of_that_name(maps, tmp_path, capsys):
    info = run(capsys, "info", f"cache={maps}")
    assert info["layers"]["block3.2"] == [128, 4, 4]
    row = run(capsys, "student", f"cache={maps}", f"runs_dir={tmp_path}/runs", "model=cnn_small",
              "loss=at", "epochs=1")
    assert row["layer"] == "block3.2" and row["student_layer"] == "block3.2"
    assert row["loss_weight"] == 1.0 and 0.0 <= row["test_accuracy"] <= 1.0
    # relational losses compare the flattened maps
    row = run(capsys, "student", f"cache={maps}", f"runs_dir={tmp_path}/runs", "model=cnn_small",
              "loss=rkd", "epochs=1")
    assert row["student_layer"] == "block3.2"


def test_a_map_loss_with_a_student_layer_that_is_not_a_map_is_refused(maps, tmp_path, capsys):
    capsys.readouterr()
    rc = cli(["student", f"cache={maps}", f"runs_dir={tmp_path}/runs", "model=cnn_small", "loss=at",
              "student_layer=embed", "epochs=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "loss at compares spatial feature maps" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.json"))


# --------------------------------------------------------------------------- reference losses
# bench/reference_losses.py is the yardstick of the loss zoo's step-time floor: each kdcache loss
# must compute what its reference computes, or the floor would compare different work.

REFERENCE_CASES = ["kd", "kd+Z", "mse_logits", "fitnet", "dkd", "dkd+Z", "dist", "dist+Z", "nkd", "nkd+Z",
                   "rkd", "pkt", "sp", "at", "crd"]


def _zoo_inputs(name: str, seed: int = 0):
    """Random student outputs (leaves with gradients) and teacher targets for loss ``name``,
    a batch of 16 over 10 classes; features of different widths for student and teacher."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    b, c = 16, 10
    z_s = (3 * torch.randn(b, c, generator=gen)).requires_grad_()
    z_t = 3 * torch.randn(b, c, generator=gen)
    y = torch.randint(0, c, (b,), generator=gen)
    if name == "at":
        hint, f_t = torch.randn(b, 8, 4, 4, generator=gen), torch.randn(b, 16, 4, 4, generator=gen)
    else:
        hint, f_t = torch.randn(b, 24, generator=gen), torch.randn(b, 32, generator=gen)
    return z_s, z_t, y, hint.requires_grad_(), f_t


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_each_loss_computes_its_references_value_and_gradient(case):
    """kdcache's loss, called as the trainer calls it (soft targets precomputed by the data
    path, the CPU kernels where a loss has one), against bench/reference_losses.py's plain
    torch graph: the same value and the same gradients for the logits, the feature and the
    loss's head."""
    import numpy as np
    import torch

    from bench import reference_losses
    from pipeline.losses import LOSSES, soft_targets

    name, standardize = case.removesuffix("+Z"), case.endswith("+Z")
    needs = LOSSES.declared(name)
    z_s, z_t, y, hint, f_t = _zoo_inputs(name)
    torch.manual_seed(1)
    head = needs.head(tuple(hint.shape[1:]), tuple(f_t.shape[1:])) if needs.head else None
    kwargs = {"y": y, "z_t": z_t, "hint": hint, "f_t": f_t, "head": head, "T": 4.0, "alpha": 0.9,
              "weight": needs.weight, "standardize": standardize, "dkd_alpha": 1.0, "dkd_beta": 8.0}
    if needs.weight is None:
        del kwargs["weight"]
    ref_kwargs = dict(kwargs)
    if name == "crd":  # a memory holding earlier rows, two of them rows of this batch
        earlier = torch.cat([torch.randn(40, 32, generator=torch.Generator().manual_seed(2)), f_t[:2]])
        earlier_idx = torch.cat([torch.arange(100, 140), torch.tensor([0, 1])])
        head.remember(earlier)
        memory = reference_losses.Memory()
        with torch.no_grad():
            memory.remember(head.embed_teacher(earlier), earlier_idx)
        ref_kwargs.update(memory=memory, idx=torch.arange(len(f_t)))
    if needs.temperature:  # as the data path hands them over
        kwargs.update({k: torch.from_numpy(v) for k, v in soft_targets(z_t.numpy(), 4.0, standardize).items()})

    def value_and_grads(loss, kw):
        inputs = [z_s, hint] + (list(head.parameters()) if head is not None else [])
        value = loss(z_s, **kw)
        grads = torch.autograd.grad(value, inputs, allow_unused=True)
        return value.item(), [np.zeros(x.shape) if g is None else g.numpy() for x, g in zip(inputs, grads)]

    ours, ours_grads = value_and_grads(LOSSES.get(name), kwargs)
    ref, ref_grads = value_and_grads(reference_losses.REFERENCES[name], ref_kwargs)
    assert ours == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert ours != pytest.approx(reference_losses.ce(z_s, y).item(), rel=1e-3)  # the method's term counts
    for ours_g, ref_g in zip(ours_grads, ref_grads):
        np.testing.assert_allclose(ours_g, ref_g, rtol=1e-4, atol=1e-6)
