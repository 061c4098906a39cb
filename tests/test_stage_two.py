"""Stage two end to end: students trained from a small cached teacher, the sample_id join, the
streaming reader, sweep and report (bad input is tests/test_bad_input.py).

One digits cache (a cnn_small teacher trained for 4 epochs) is built once for the module in a
tmp directory; tests that need their own results table work on a copy of it.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cache import TeacherCache, open_cache
from pipeline.cache import format as fmt
from pipeline.config import DataConfig
from pipeline.data import open_dataset, positions_of
from pipeline.errors import KdError
from pipeline.io import sha256_file
from pipeline.results import read_results, results_dir
from pipeline.rows import BLOCK_ROWS
from pipeline.settings import resolve
from pipeline.students import student_config
from stages.cli import main as cli
from pipeline.runs import train_student
from pipeline.students.data import joined_inputs

SUMMARY_KEYS = {"model", "loss", "test_accuracy", "val_accuracy", "teacher_agreement",
                "teacher_test_accuracy", "params", "fit_seconds", "run_dir"}
RUN_FILES = {"config.json", "metrics.json", "student.safetensors", "log.jsonl"}


# =========================================================================== fixtures and helpers

@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    """A digits cache built once: cnn_small teacher, 4 epochs, synchronous scheduler."""
    d = tmp_path_factory.mktemp("stage_two")
    cache = d / "caches" / "digits"
    rc = cli(["cache", "dataset=digits", "teacher=cnn_small", f"teacher_dir={d}/teachers",
              f"cache={cache}", "scheduler=synchronous", "epochs=4"])
    assert rc == 0
    return SimpleNamespace(work=d, cache=cache, teacher_dir=d / "teachers", runs=d / "runs")


def num_rows(cache: Path) -> int:
    return read_results(results_dir(cache)).num_rows


def student(capsys, cache: Path, runs: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli(["student", f"cache={cache}", f"runs_dir={runs}", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def copy_cache(src: Path, dst: Path) -> Path:
    """A copy of a cache without its results table (results live beside the cache)."""
    shutil.copytree(src, dst)
    return dst


def shuffle_cache_rows(root: Path, seed: int) -> dict[str, np.ndarray]:
    """Physically permute the rows of every split of a cache (arrays and index together), as a
    cache written in another order would be. Returns the permutation per split."""
    import zarr

    manifest = json.loads((root / "manifest.json").read_text())
    group = zarr.open_group(root / "arrays.zarr", mode="r+")
    rng = np.random.default_rng(seed)
    perms = {}
    for split, info in manifest["splits"].items():
        perm = rng.permutation(info["rows"])
        for key in [f"{split}/logits"] + [f"{split}/features/{layer}" for layer in manifest["layers"]]:
            arr = group[key]
            arr[:] = arr[:][perm]
        path = root / "index" / f"{split}.parquet"
        table = pq.read_table(path).take(pa.array(perm))
        table = table.set_column(table.schema.get_field_index("row"), "row",
                                 pa.array(np.arange(info["rows"]), pa.int64()))
        pq.write_table(table, path)
        perms[split] = perm
        manifest["splits"][split]["index_sha256"] = sha256_file(path)
    fmt.write_manifest(root, manifest)  # as the writer of such a cache would have recorded it
    return perms


@pytest.fixture(scope="module")
def shuffled(env, tmp_path_factory) -> SimpleNamespace:
    root = copy_cache(env.cache, tmp_path_factory.mktemp("shuffled") / "digits-shuffled")
    perms = shuffle_cache_rows(root, seed=123)
    return SimpleNamespace(root=root, perms=perms)


def digits_inputs(dataset, ids: np.ndarray) -> np.ndarray:
    """The oracle: digits sample_id is the row in load_digits(), normalised like the teacher saw it."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32)[:, None]
    return dataset.normalise(images[ids])


# =========================================================================== the sample_id join

@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(n=st.integers(1, 200), seed=st.integers(0, 2**32 - 1), take=st.floats(0.0, 1.0))
def test_positions_of_joins_by_id(n, seed, take):
    rng = np.random.default_rng(seed)
    ids = rng.choice(2**62, size=n, replace=False).astype(np.int64)  # unique, unsorted
    wanted = rng.permutation(ids)[: max(1, int(take * n))]
    positions = positions_of(ids, wanted)
    np.testing.assert_array_equal(ids[positions], wanted)


def test_positions_of_raises_when_an_id_is_absent():
    ids = np.array([10, 3, 7, 42], np.int64)
    with pytest.raises(KdError, match=r"1 cache sample ids \(e.g. 5\) are not in the dataset"):
        positions_of(ids, np.array([7, 5, 10], np.int64))
    with pytest.raises(KdError, match="not in the dataset"):
        positions_of(ids, np.array([100], np.int64))  # past the largest id
    with pytest.raises(KdError, match="not in the dataset"):
        positions_of(ids, np.array([-1], np.int64))  # before the smallest


class FakeCache:
    """Just enough of TeacherCache for joined_inputs: the sample ids in cache row order."""

    def __init__(self, ids: dict[str, np.ndarray]):
        self.ids = ids

    def sample_ids(self, split: str) -> np.ndarray:
        return self.ids[split]


def test_joined_inputs_follow_sample_id_not_position(tmp_path):
    # Every input row holds its own sample_id (npz ids: train rows first, then test rows).
    n_train, n_test = 80, 20
    x_train = np.repeat(np.arange(n_train, dtype=np.float32)[:, None], 3, 1)
    x_test = np.repeat(np.arange(n_train, n_train + n_test, dtype=np.float32)[:, None], 3, 1)
    path = tmp_path / "ids.npz"
    np.savez(path, x_train=x_train, y_train=np.arange(n_train) % 3, x_test=x_test,
             y_test=np.arange(n_test) % 3)
    dataset = open_dataset(DataConfig(dataset=f"npz:{path}"))
    rng = np.random.default_rng(0)
    cache = FakeCache({s: rng.permutation(dataset.splits[s].sample_ids) for s in ("train", "val", "test")})
    for split in ("train", "val", "test"):
        ids = cache.sample_ids(split)
        assert not np.array_equal(ids, dataset.splits[split].sample_ids)  # really reordered
        joined = joined_inputs(dataset, cache, split)
        expected = dataset.normalise(np.repeat(ids.astype(np.float32)[:, None], 3, 1))
        np.testing.assert_allclose(joined, expected, rtol=1e-6, atol=1e-6)
    # An id the dataset does not hold is refused, never silently paired with another row.
    bad = FakeCache({"train": np.append(cache.sample_ids("train")[:5], 10_000)})
    with pytest.raises(KdError, match="not in the dataset"):
        joined_inputs(dataset, bad, "train")


def test_shuffled_cache_joins_inputs_by_sample_id(env, shuffled):
    import torch

    from pipeline.teachers import TeacherSpec, build_teacher

    original, cache = open_cache(env.cache), open_cache(shuffled.root)
    dataset = open_dataset(resolve(DataConfig, cache.manifest["dataset"]["config"]))
    teacher = cache.manifest["teacher"]
    model = build_teacher(TeacherSpec(teacher["arch"], tuple(teacher["input_shape"]),
                                      teacher["num_classes"], teacher["ckpt"]))
    for split in ("train", "val", "test"):
        perm = shuffled.perms[split]
        ids = cache.sample_ids(split)
        np.testing.assert_array_equal(ids, original.sample_ids(split)[perm])
        assert not np.array_equal(ids, original.sample_ids(split))
        np.testing.assert_array_equal(cache.raw_logits(split), original.raw_logits(split)[perm])

        joined = joined_inputs(dataset, cache, split)
        np.testing.assert_array_equal(joined, digits_inputs(dataset, ids))
        # Row r of the joined inputs is what the teacher saw for cached row r.
        with torch.inference_mode():
            logits = model(torch.from_numpy(joined)).numpy()
        np.testing.assert_allclose(logits, cache.raw_logits(split), rtol=3e-3, atol=3e-3)
        # A positional join (the classic bug) would pair rows with other samples' logits.
        with torch.inference_mode():
            positional = model(torch.from_numpy(dataset.inputs(split, 0, len(ids)))).numpy()
        assert not np.allclose(positional, cache.raw_logits(split), rtol=3e-3, atol=3e-3)


@pytest.mark.parametrize("which", ["original", "shuffled"])
def test_stream_batches_match_rows_of_their_sample_ids(env, shuffled, which):
    cache = open_cache(env.cache if which == "original" else shuffled.root)
    layer = cache.layers[0]
    for split in ("train", "test"):
        full_logits = cache.logits(split, temperature=2.0)
        full_feats = cache.features(split, layer)
        ids, labels = cache.sample_ids(split), cache.labels(split)
        seen = []
        for batch in cache.stream(split, batch_size=50, temperature=2.0, layers=(layer,), shuffle=True,
                                  seed=5, buffer_chunks=2):
            rows = positions_of(ids, batch.sample_id)
            np.testing.assert_array_equal(batch.logits, full_logits[rows])
            np.testing.assert_array_equal(batch.features[layer], full_feats[rows])
            np.testing.assert_array_equal(batch.label, labels[rows])
            assert len(batch.sample_id) <= 50
            seen.append(batch.sample_id)
        seen = np.concatenate(seen)
        assert sorted(seen.tolist()) == sorted(ids.tolist())  # every row exactly once
        assert not np.array_equal(seen, ids)  # and really shuffled


def test_student_on_shuffled_cache_learns(env, shuffled, capsys):
    """If inputs were joined by position, labels and teacher logits would belong to other
    samples and the student would sit at chance (10%)."""
    runs = env.work / "runs-shuffled"
    rc, out, _ = student(capsys, shuffled.root, runs, "model=mlp", "loss=kd", "epochs=6", "seed=0", "--json")
    assert rc == 0
    summary = last_json(out)
    assert summary["test_accuracy"] > 0.8
    assert summary["teacher_agreement"] > 0.8


# =========================================================================== one student, end to end

def test_student_json_summary_run_dir_and_results_row(env, capsys):
    from safetensors.numpy import load_file

    before = read_results(results_dir(env.cache)).column("run_id").to_pylist()
    rc, out, err = student(capsys, env.cache, env.runs, "model=linear_svc", "--json")
    assert rc == 0, err
    summary = last_json(out)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["model"] == "linear_svc" and summary["loss"] is None and summary.get("target") == "labels"
    assert summary["kind"] == "features" and summary["layer"] == "embed" and summary.get("temperature") is None
    assert 0.8 < summary["test_accuracy"] <= 1.0
    assert summary["teacher_test_accuracy"] == pytest.approx(open_cache(env.cache).teacher_accuracy("test"))

    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == env.runs / env.cache.name
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {k: metrics[k] for k in SUMMARY_KEYS} == {k: summary[k] for k in SUMMARY_KEYS}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["kind"] == "StudentConfig" and config["config"]["model"] == "linear_svc"
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert log[-1]["final"]["run_id"] == summary["run_id"]
    assert not list(run_dir.parent.glob(".*incomplete"))

    # Exactly one new row, and it is this run.
    table = read_results(results_dir(env.cache))
    new = [r for r in table.to_pylist() if r["run_id"] not in before]
    assert len(new) == 1 and table.num_rows == len(before) + 1
    row = new[0]
    for key in SUMMARY_KEYS:
        assert row[key] == summary[key], key

    # The saved weights alone reproduce the reported test accuracy.
    cache = open_cache(env.cache)
    w = load_file(str(run_dir / "student.safetensors"))
    x = cache.features("test", "embed").reshape(cache.num_rows("test"), -1)
    scores = ((x - w["scaler_mean"]) / w["scaler_scale"]) @ w["coef"].T + w["intercept"]
    pred = w["classes"][scores.argmax(1)]
    assert np.mean(pred == cache.labels("test")) == pytest.approx(summary["test_accuracy"])


def test_torch_student_run_files(env, capsys):
    from safetensors.torch import load_file

    rc, out, err = student(capsys, env.cache, env.runs, "model=cnn_small", "loss=kd", "epochs=2",
                           "temperature=3", "--json")
    assert rc == 0, err
    summary = last_json(out)
    assert summary["kind"] == "inputs" and summary["loss"] == "kd" and summary.get("temperature") == 3.0
    assert summary.get("target") is None and summary["layer"] is None
    config = json.loads((Path(summary["run_dir"]) / "config.json").read_text())["config"]
    assert (config["loss"], config["params"]["temperature"], "target" in config["params"]) == ("kd", 3.0, False)
    run_dir = Path(summary["run_dir"])
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    state = load_file(str(run_dir / "student.safetensors"))
    assert sum(v.numel() for v in state.values() if v.is_floating_point()) >= summary["params"] > 0
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in log[:-1]] == [0, 1]


def _forbid_teacher(monkeypatch):
    """Make every way of loading teacher weights fail, wherever it was imported."""
    import sys

    import pipeline.teachers as teachers

    def refuse(*_, **__):
        raise AssertionError("stage two loaded the teacher")

    for name in ("build_teacher", "read_state_dict", "load_weights"):
        original = getattr(teachers, name)
        for module in list(sys.modules.values()):
            if getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, refuse)


def test_student_never_loads_the_teacher(env, capsys, monkeypatch):
    ckpt = Path(open_cache(env.cache).manifest["teacher"]["ckpt"])
    assert ckpt.is_file() and ckpt.is_relative_to(env.teacher_dir)
    _forbid_teacher(monkeypatch)
    hidden = env.work / "teachers-hidden"
    shutil.move(env.teacher_dir, hidden)  # restored below: the join test uses the teacher
    try:
        before = num_rows(env.cache)
        for args in (["model=linear_svc"], ["model=cnn_small", "loss=kd", "epochs=2"]):
            rc, out, err = student(capsys, env.cache, env.runs, *args, "--json")
            assert rc == 0, err
            assert "error" not in err.lower()
        assert num_rows(env.cache) == before + 2
        assert not env.teacher_dir.exists()
    finally:
        shutil.move(hidden, env.teacher_dir)


def test_sgd_streams_the_train_split_out_of_core(env, capsys, monkeypatch):
    passes, feature_splits, train_reads, other_reads = [], [], [], []
    original_stream, original_features, original_read = TeacherCache.stream, TeacherCache.features, TeacherCache._rows

    def spy_stream(self, split, *args, **kwargs):
        record = {"split": split, "sizes": [], "ids": [], "kwargs": kwargs}
        passes.append(record)
        for batch in original_stream(self, split, *args, **kwargs):
            record["sizes"].append(len(batch.sample_id))
            record["ids"].append(batch.sample_id)
            yield batch

    def spy_features(self, split, *args, **kwargs):
        feature_splits.append(split)
        return original_features(self, split, *args, **kwargs)

    def spy_read(self, key, rows, view, out=None, index=None):
        (train_reads if key.startswith("train/") else other_reads).append((key, rows))
        return original_read(self, key, rows, view, out, index)

    monkeypatch.setattr(TeacherCache, "stream", spy_stream)
    monkeypatch.setattr(TeacherCache, "features", spy_features)
    monkeypatch.setattr(TeacherCache, "_rows", spy_read)

    rc, out, err = student(capsys, env.cache, env.runs, "model=sgd", "epochs=3", "--json")
    assert rc == 0, err
    summary = last_json(out)
    assert summary["model"] == "sgd" and summary["test_accuracy"] > 0.8

    cache = open_cache(env.cache)
    chunk = int(cache.manifest["chunk_size"])
    buffer_chunks = inspect.signature(original_stream).parameters["buffer_chunks"].default
    assert "train" not in feature_splits  # val/test may be loaded whole, train never
    assert len(passes) == 1 + 3  # a scaling pass, then one per epoch
    train_ids = sorted(cache.sample_ids("train").tolist())
    for p in passes:
        assert p["split"] == "train"
        batch = p["kwargs"]["batch_size"]
        buffer_rows = max(buffer_chunks, -(-batch // chunk)) * chunk  # at least one batch
        assert p["sizes"] and max(p["sizes"]) <= min(batch, buffer_rows)
        assert sorted(np.concatenate(p["ids"]).tolist()) == train_ids
    # Memory: the train split is only ever read a chunk at a time, val and test a block at a time.
    assert train_reads and all(r is not None and r.stop - r.start <= chunk for _, r in train_reads)
    features = [r for key, r in other_reads if "/features/" in key]
    assert features and all(r is not None and r.stop - r.start <= BLOCK_ROWS for r in features)


def test_input_student_streams_train_inputs_chunk_by_chunk(env, capsys, monkeypatch):
    """Torch students read train through the block-shuffled stream: cached targets and inputs
    arrive one chunk at a time, joined by sample_id, never the whole split at once."""
    from pipeline.data import Dataset

    input_reads, train_reads, eval_reads = [], [], []
    original_inputs_at, original_read = Dataset.inputs_at, TeacherCache._rows

    def spy_inputs_at(self, split, rows):
        (input_reads if split == "train" else eval_reads).append(len(rows))
        return original_inputs_at(self, split, rows)

    def no_whole_split(self, split, start, stop):
        raise AssertionError(f"{split} inputs read whole ({start}:{stop})")

    def spy_read(self, key, rows, view, out=None, index=None):
        if key.startswith("train/"):
            train_reads.append(rows)
        return original_read(self, key, rows, view, out, index)

    monkeypatch.setattr(Dataset, "inputs_at", spy_inputs_at)
    monkeypatch.setattr(Dataset, "inputs", no_whole_split)
    monkeypatch.setattr(TeacherCache, "_rows", spy_read)
    rc, out, err = student(capsys, env.cache, env.runs, "model=cnn_small", "loss=kd", "epochs=2", "--json")
    assert rc == 0, err
    cache = open_cache(env.cache)
    chunk = int(cache.manifest["chunk_size"])
    assert input_reads and max(input_reads) <= chunk
    assert sum(input_reads) == 2 * cache.num_rows("train")  # every train row once per epoch
    assert eval_reads and max(eval_reads) <= BLOCK_ROWS  # val each epoch and test: block by block
    assert train_reads and all(r is not None and r.stop - r.start <= chunk for r in train_reads)
    assert last_json(out)["test_accuracy"] > 0.3


def test_logreg_soft_with_temperature(env, capsys):
    rc, out, err = student(capsys, env.cache, env.runs, "model=logreg_soft", "temperature=2", "--json")
    assert rc == 0, err
    summary = last_json(out)
    assert summary["loss"] is None and summary.get("target") is None and summary.get("temperature") == 2.0
    assert summary["test_accuracy"] > 0.8 and np.isfinite(summary["kl_teacher_student"])
    row = [r for r in read_results(results_dir(env.cache)).to_pylist() if r["run_id"] == summary["run_id"]]
    assert row and row[0]["temperature"] == 2.0


def test_c_auto_picks_the_best_validation_c(env, capsys):
    from pipeline.students import C_GRID, create_student

    rc, out, err = student(capsys, env.cache, env.runs, "model=linear_svc", "C=auto", "--json")
    assert rc == 0, err
    summary = last_json(out)
    row = [r for r in read_results(results_dir(env.cache)).to_pylist() if r["run_id"] == summary["run_id"]][0]
    assert row.get("C") == summary.get("C") and float(row.get("C")) in C_GRID
    # Recompute the selection: the first C with the best validation accuracy wins.
    cache = open_cache(env.cache)
    X = {s: cache.features(s, "embed").reshape(cache.num_rows(s), -1) for s in ("train", "val")}
    val = {c: np.mean(create_student("linear_svc", C=c).fit(X["train"], cache.labels("train"))
                      .predict(X["val"]) == cache.labels("val")) for c in C_GRID}
    best = max(val.values())
    assert float(row.get("C")) == next(c for c in C_GRID if val[c] == best)
    assert row["val_accuracy"] == pytest.approx(best)


def test_fixed_c_is_recorded_as_given(env, capsys):
    rc, out, _ = student(capsys, env.cache, env.runs, "model=logreg", "C=0.5", "--json")
    assert rc == 0 and last_json(out)["C"] == "0.5"  # (results columns hold C as text: a number or auto)
    rc, out, _ = student(capsys, env.cache, env.runs, "model=cnn_small", "epochs=1", "--json")
    assert rc == 0 and "C" not in last_json(out)  # no C at all


@pytest.mark.parametrize("loss", ["fitnet", "dkd"])
def test_fitnet_and_dkd(env, capsys, loss):
    rc, out, err = student(capsys, env.cache, env.runs, "model=cnn_small", f"loss={loss}", "epochs=2", "--json")
    assert rc == 0, err
    summary = last_json(out)
    assert summary["loss"] == loss and summary.get("temperature") == 4.0  # the cache's default
    assert summary["layer"] == ("embed" if loss == "fitnet" else None)
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and np.isfinite(summary["kl_teacher_student"])


def _patch_train_argmax(monkeypatch, classes: list[int]):
    """Make the cached teacher predict only ``classes`` on the train split."""
    original = TeacherCache.raw_logits

    def raw_logits(self, split, view=0, rows=None):
        z = original(self, split, view, rows)
        if split == "train":
            z = z.copy()
            top = np.array(classes)[np.arange(len(z)) % len(classes)]
            z[np.arange(len(z)), top] += 1000.0
        return z

    monkeypatch.setattr(TeacherCache, "raw_logits", raw_logits)


@pytest.mark.parametrize("model", ["linear_svc", "logreg"])
def test_target_teacher_missing_classes(env, capsys, monkeypatch, model):
    """A teacher that never predicts some class on train: the student knows fewer classes than
    the cache; metrics still compare whole distributions."""
    _patch_train_argmax(monkeypatch, [1, 2, 3, 4, 5, 6, 7, 8])
    rc, out, err = student(capsys, env.cache, env.runs, f"model={model}", "target=teacher", "--json")
    assert rc == 0, err
    summary = last_json(out)
    assert summary["loss"] is None and summary.get("target") == "teacher"
    assert np.isfinite(summary["kl_teacher_student"]) and np.isfinite(summary["ece"])


# =========================================================================== bad input
# Bad input to stage two (unknown model or loss, out-of-range values, incomplete or changed
# caches, a teacher that predicts one class, report without results, ...) is a row of
# tests/test_bad_input.py.


# =========================================================================== sweep and report

@pytest.mark.slow
def test_sweep_then_report(env, capsys, tmp_path):
    cache = copy_cache(env.cache, tmp_path / "sweep-cache")
    capsys.readouterr()
    rc = cli(["sweep", f"cache={cache}", f"runs_dir={tmp_path}/runs", "grid.model=linear_svc cnn_small",
              "grid.loss=kd ce", "grid.seed=0 1", "epochs=1", "--json"])  # rows and report, not accuracy
    out, err = capsys.readouterr()
    assert rc == 0, err
    summary = last_json(out)
    # linear_svc has no loss axis: 2 seeds; cnn_small: 2 losses x 2 seeds.
    assert summary["runs"] == 6
    rows = read_results(results_dir(cache)).to_pylist()
    assert len(rows) == 6
    combos = sorted((r["model"], str(r["loss"]), str(r.get("target")), r["seed"]) for r in rows)
    assert combos == sorted([("linear_svc", "None", "labels", 0), ("linear_svc", "None", "labels", 1),
                             ("cnn_small", "kd", "None", 0), ("cnn_small", "kd", "None", 1),
                             ("cnn_small", "ce", "None", 0), ("cnn_small", "ce", "None", 1)])
    assert {r.get("temperature") for r in rows if r["loss"] == "kd"} == {4.0}
    assert {r.get("temperature") for r in rows if r["loss"] != "kd"} == {None}

    rc = cli(["report", f"cache={cache}", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = last_json(out)
    text = (Path(report["report"])).read_text()
    assert text.strip() in out
    # no hyperparameter tells apart two experiments of one (model, loss) pair here
    assert "| model | loss | test accuracy |" in text and "±" in text
    assert "Against the best label-only baseline" in text
    assert report["runs"] == 6 and report["groups"] == 3
    for (model, loss, cells) in [("linear_svc", None, "–"), ("cnn_small", "kd", "kd"),
                                 ("cnn_small", "ce", "ce")]:
        acc = np.array([r["test_accuracy"] for r in rows if r["model"] == model and r["loss"] == loss])
        cell = f"{acc.mean():.4f} ± {acc.std(ddof=1):.4f}"
        assert any(line.startswith(f"| {model} | {cells} |") and cell in line for line in text.splitlines()), cell
    out_dir = Path(report["report"]).parent
    assert out_dir == results_dir(cache) / "report"
    # each experiment against the teacher, from the figures the rows and the cache recorded
    teacher = open_cache(cache).manifest["teacher"]
    assert teacher["latency"]["batch_1_ms"] > 0 and teacher["weights_bytes"] > 0
    assert f"Teacher: {teacher['num_params']:,} params, {teacher['weights_bytes']:,} bytes" in text
    for r in rows:
        assert r["teacher_latency_b1_ms"] == teacher["latency"]["batch_1_ms"]
        assert r["latency_b1_ms"] > 0 and r["latency_b256_ms"] > 0 and r["weights_bytes"] > 0
    board = {(b["model"], b["loss"]): b for b in report["leaderboard"]}
    kd = board[("cnn_small", "kd")]
    smaller = teacher["num_params"] / kd["params"]
    kept = 100 * kd["mean"] / rows[-1]["teacher_test_accuracy"]
    line = next(l for l in text.splitlines() if l.startswith("| cnn_small/kd") and "smaller" in l)
    assert f"{smaller:,.0f}× smaller" in line or f"{smaller:.1f}× smaller" in line, line
    # faster or slower as the side-by-side timing says (a shared machine: either can be)
    timed = kd["side_by_side"]
    word = "faster" if timed["teacher_b1_ms"] >= timed["student_b1_ms"] else "slower"
    assert f" {word} (batch 1; " in line and f"{kept:.1f}% of the teacher's accuracy kept" in line
    svc = next(l for l in text.splitlines() if l.startswith("| linear_svc |") and "smaller" in l)
    assert "deployed with the teacher's backbone, it is not faster" in svc
    pngs = sorted(out_dir.glob("*.png"))
    assert [p.name for p in pngs] == ["accuracy_vs_latency.png", "accuracy_vs_params.png",
                                      "accuracy_vs_temperature.png", "students_vs_baseline.png"]
    for p in pngs:
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n")


def test_train_student_api(env, tmp_path):
    """The Python entry point behind the CLI: a resolved config in, the summary out."""
    cfg = student_config({"cache": str(env.cache), "model": "logreg", "runs_dir": str(tmp_path / "runs")})
    summary = train_student(cfg, progress=False)
    assert summary["model"] == "logreg" and Path(summary["results"]).is_file()
    assert Path(summary["run_dir"]).is_dir()


def test_default_cache_is_found_from_a_non_canonical_dataset_spec(tmp_path, capsys):
    """`synthetic:300:8` and its canonical `synthetic:300:8:10` name one dataset, so a student
    given either spec finds the cache stage one built by default."""
    common = ["dataset=synthetic:300:8", "teacher=mlp", f"cache_root={tmp_path}/caches"]
    assert cli(["cache", *common, "epochs=1", f"teacher_dir={tmp_path}/t", "scheduler=synchronous"]) == 0
    capsys.readouterr()
    rc = cli(["student", *common, "model=logreg", f"runs_dir={tmp_path}/runs", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert last_json(out)["cache"] == str(tmp_path / "caches" / "synthetic-300-8-10-mlp")
