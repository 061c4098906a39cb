"""`kdcache export`: every student leaves its run as a file that plain onnxruntime or skops
loads and that predicts what the run recorded.

The checks here do not go through kdcache's own loader: the ONNX model is run by a plain
``onnxruntime.InferenceSession`` on inputs preprocessed from the *raw* dataset rows with the
statistics the model's metadata records, and the skops file is loaded by ``skops.io.load`` with
nothing trusted, then scored on the cached features with scikit-learn alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import build, run_cli
from pipeline.cache import open_cache
from pipeline.data import positions_of
from pipeline.students import STUDENTS
from stages.cli import main

# students of arrays (those of text: tests/test_text_students.py), by the format they declare
TORCH_STUDENTS = [n for n in STUDENTS.names() if STUDENTS.declared(n).export == "onnx"
                  and STUDENTS.declared(n).modality == "array"]
SKLEARN_STUDENTS = [n for n in STUDENTS.names() if STUDENTS.declared(n).kind == "features"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    """digits (images with real normalisation statistics) and signals (for cnn1d)."""
    work = tmp_path_factory.mktemp("export")
    out = {}
    for name, spec, teacher in (("digits", "digits", "cnn_small"), ("signals", "synthetic:300:2x16:3", "mlp")):
        build(work / name, work, dataset=spec, teacher=teacher, teacher_ckpt="random")
        out[name] = work / name
    return out


def trained(capsys, cache: Path, runs: Path, model: str, *args: str) -> tuple[Path, dict]:
    from conftest import declared

    row = run_cli(capsys, "student", f"cache={cache}", f"runs_dir={runs}", f"model={model}",
                  *declared(model, epochs=1), "device=cpu", *args)  # what is checked is the export
    return Path(row["run_dir"]), row


def raw_test_rows(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """The test split's rows as the dataset stores them (before any normalisation), in cache
    row order, and their labels."""
    c = open_cache(cache)
    dataset = c.open_dataset()
    split = dataset.splits["test"]
    positions = positions_of(split.sample_ids, c.sample_ids("test"))
    return dataset.pools[split.pool].read(split.positions[positions]), c.labels("test")


def normalised(raw: np.ndarray, preprocessing: dict) -> np.ndarray:
    """``(x - mean) / std`` from the recorded statistics alone (one per channel or one scalar)."""
    mean, std = np.asarray(preprocessing["mean"], np.float32), np.asarray(preprocessing["std"], np.float32)
    if preprocessing["normalise"] == "per-channel":
        shape = (1, -1) + (1,) * (raw.ndim - 2)
        mean, std = mean.reshape(shape), std.reshape(shape)
    return ((raw - mean) / std).astype(np.float32)


@pytest.mark.parametrize("model", TORCH_STUDENTS)
def test_onnx_round_trip(model, caches, tmp_path, capsys):
    import onnxruntime as ort

    cache = caches["signals" if model == "cnn1d" else "digits"]
    run_dir, row = trained(capsys, cache, tmp_path / "runs", model)
    record = run_cli(capsys, "export", f"run={run_dir}")
    assert record["format"] == "onnx" and Path(record["path"]) == run_dir / "student.onnx"
    assert json.loads((run_dir / "export.json").read_text())["sha256"] == record["sha256"]

    session = ort.InferenceSession(str(run_dir / "student.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    preprocessing = json.loads(meta["kdcache.preprocessing"])
    assert preprocessing == open_cache(cache).manifest["preprocessing"]
    assert json.loads(meta["kdcache.input_shape"]) == list(open_cache(cache).manifest["teacher"]["input_shape"])
    raw, labels = raw_test_rows(cache)
    x = normalised(raw, preprocessing)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("input", "logits") and not isinstance(inp.shape[0], int)

    logits = session.run(None, {"input": x})[0]
    one = session.run(None, {"input": x[:1]})[0]  # the batch axis is dynamic
    np.testing.assert_allclose(one, logits[:1], rtol=1e-5, atol=1e-5)
    assert logits.shape == (len(labels), open_cache(cache).num_classes)
    # what the run scored (training on the CPU is deterministic: the same predictions)
    assert np.mean(logits.argmax(1) == labels) == pytest.approx(row["test_accuracy"], abs=1 / len(labels))
    check = record["check"]
    assert check["rows"] == len(labels) and check["predictions_agree"] == len(labels)
    assert check["max_abs_logit_diff"] < 1e-4


@pytest.mark.parametrize("model", SKLEARN_STUDENTS)
def test_skops_round_trip(model, caches, tmp_path, capsys):
    import skops.io as sio
    from sklearn.pipeline import Pipeline

    cache = caches["digits"]
    run_dir, row = trained(capsys, cache, tmp_path / "runs", model)
    record = run_cli(capsys, "export", f"run={run_dir}")
    assert record["format"] == "skops"

    estimator = sio.load(run_dir / "student.skops")  # nothing trusted beyond skops' defaults
    assert isinstance(estimator, Pipeline) and [n for n, _ in estimator.steps] == ["scaler", "classifier"]
    c = open_cache(cache)
    features = c.features("test", record["input"]["layer"]).reshape(c.num_rows("test"), -1)
    pred = estimator.predict(features.astype(np.float32))
    assert np.mean(pred == c.labels("test")) == row["test_accuracy"]
    assert record["check"]["predictions_agree"] == c.num_rows("test")
    assert record["check"]["max_abs_logit_diff"] == 0.0
    if model == "linear_svc":  # margins: the temperature that calibrated them is part of the model
        assert record["calibration_temperature"] == row["calibration_temperature"] > 0
    else:
        assert record["calibration_temperature"] is None and row["calibration_temperature"] is None


@pytest.mark.parametrize("model, format, module", [("mlp", "onnx", "onnxruntime"),
                                                   ("logreg", "skops", "skops")])
def test_export_without_its_packages(model, format, module, caches, tmp_path, capsys, monkeypatch):
    run_dir, _ = trained(capsys, caches["digits"], tmp_path / "runs", model)
    before = sorted(p.name for p in run_dir.iterdir())
    monkeypatch.setitem(sys.modules, module, None)  # `import MODULE` now fails
    capsys.readouterr()
    assert main(["export", f"run={run_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kdcache export: error: format={format} needs {module}, not installed here; "
                   "pip install 'kdcache[export]'"]
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_a_failed_check_leaves_nothing(caches, tmp_path, capsys, monkeypatch):
    """An export that does not reproduce its run is refused, and neither the file nor its
    record (nor a temporary) is left in the run directory."""
    import pipeline.export

    run_dir, _ = trained(capsys, caches["digits"], tmp_path / "runs", "cnn_small")
    before = sorted(p.name for p in run_dir.iterdir())
    monkeypatch.setattr(pipeline.export, "LOGIT_TOLERANCE", -1.0)  # no export can pass
    capsys.readouterr()
    assert main(["export", f"run={run_dir}"]) == 2
    assert "does not reproduce run" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_non_finite_exported_scores_are_refused(caches, tmp_path, capsys, monkeypatch):
    import pipeline.export

    run_dir, _ = trained(capsys, caches["digits"], tmp_path / "runs", "mlp")
    before = sorted(p.name for p in run_dir.iterdir())
    real = pipeline.export._onnx_scorer

    def broken(path, text):  # an exported graph that emits NaN for one row
        score = real(path, text)

        def scores(x):
            out = score(x).copy()
            out[0, 0] = np.nan
            return out
        return scores

    monkeypatch.setattr(pipeline.export, "_onnx_scorer", broken)
    capsys.readouterr()
    assert main(["export", f"run={run_dir}"]) == 2
    assert "non-finite scores on test rows 0.." in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_a_rebuilt_cache_is_not_the_run_s_cache(caches, tmp_path, capsys):
    """The same path holding another teacher's cache: export refuses to check against it."""
    import shutil

    cache = Path(shutil.copytree(caches["digits"], tmp_path / "cache"))
    run_dir, _ = trained(capsys, cache, tmp_path / "runs", "logreg")
    shutil.rmtree(cache)
    build(cache, tmp_path, dataset="digits", teacher="cnn_small", teacher_ckpt="random", seed=1)
    capsys.readouterr()
    assert main(["export", f"run={run_dir}"]) == 2
    assert "now holds another teacher" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["linear_svc", "mlp"])
def test_two_classes(model, tmp_path, capsys):
    """Binary: scikit-learn's one margin per row, kdcache's two class scores."""
    import onnxruntime as ort
    import skops.io as sio

    cache = tmp_path / "binary"
    build(cache, tmp_path, dataset="synthetic:200:2x16:2", teacher="mlp")
    run_dir, row = trained(capsys, cache, tmp_path / "runs", model)
    record = run_cli(capsys, "export", f"run={run_dir}")
    assert record["check"]["predictions_agree"] == record["check"]["rows"]
    c = open_cache(cache)
    if model == "linear_svc":
        margins = sio.load(run_dir / "student.skops").decision_function(
            c.features("test", "embed").astype(np.float32))
        assert margins.ndim == 1 and "[-m, m]" in record["scores"]
        assert np.mean((margins > 0).astype(int) == c.labels("test")) == row["test_accuracy"]
    else:
        session = ort.InferenceSession(str(run_dir / "student.onnx"))
        raw, labels = raw_test_rows(cache)
        logits = session.run(None, {"input": raw.astype(np.float32)})[0]  # synthetic: not normalised
        assert logits.shape == (len(labels), 2)
