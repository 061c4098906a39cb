"""Students that read text: the hashed n-gram featuriser (exact, stable across processes), the
scikit-learn students on raw documents (tfidf_logreg, tfidf_svc) and the small torch ones
(fasttext, textcnn), trained in memory on the test corpus (tests/text_models.py); what they
declare (the inputs they read, their export format, their hyperparameters) and the refusals
that come from it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import KdError
from pipeline.numerics import softmax
from pipeline.rows import LazyRows
from pipeline.students import (STUDENTS, StudentNeeds, check_modality, create_student,
                               student_config, student_params, uses)
from pipeline.text_features import HashedNgrams
from tests.text_models import write_corpus

ROOT = Path(__file__).resolve().parents[1]
TEXT_STUDENTS = [n for n in STUDENTS.names() if STUDENTS.declared(n).modality == "text"]
NETS = ["fasttext", "textcnn"]
QUICK = dict(epochs=4, batch_size=32, buckets=4096, device="cpu")  # small tables, a few epochs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """The 3-class corpus as train (180) / val (60) / test (60) documents, with labels and
    teacher logits that mostly favour the label."""
    path = write_corpus(tmp_path_factory.mktemp("corpus") / "mail.csv", rows=300)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = sorted({r["label"] for r in rows})
    X = np.empty(len(rows), dtype=object)
    X[:] = [r["text"] for r in rows]
    y = np.array([names.index(r["label"]) for r in rows])
    z = (3.0 * np.eye(3)[y] + np.random.default_rng(1).normal(size=(len(y), 3))).astype(np.float32)
    return {"X": X[:180], "y": y[:180], "z": z[:180], "X_val": X[180:240], "y_val": y[180:240],
            "X_test": X[240:], "y_test": y[240:]}


# =========================================================================== the featuriser

def test_the_featuriser_follows_its_spec_step_by_step():
    f = HashedNgrams(buckets=1000, max_tokens=3, ngrams=2)
    text = "Hello, WORLD! naïve café_2 dropped"
    assert f.tokens(text) == ["hello", "world", "naïve"]  # lowercased \w+ runs, the first 3
    assert f.grams(text) == ["hello", "world", "naïve", "hello world", "world naïve"]
    assert f.ids(text) == [1 + zlib.crc32(g.encode("utf-8")) % 1000 for g in f.grams(text)]
    # pinned values: a change in any step (or in crc32) changes them
    assert HashedNgrams(buckets=65536, ngrams=2).ids("Free money") == [49609, 5093, 56129]
    batch = f(["a b", "", "one two three four"])
    assert batch.dtype == np.int64 and batch.shape == (3, 5)  # the longest row: 3 words + 2 bigrams
    assert batch[1].tolist() == [0] * 5 and batch[0, 3:].tolist() == [0, 0]
    assert f([]).shape == (0, 1) and f.max_ids() == 5
    assert HashedNgrams.from_spec(json.dumps(f.spec())) == f
    with pytest.raises(ValueError, match="is not kdcache-hashed-ngrams version 1"):
        HashedNgrams.from_spec({**f.spec(), "version": 2})
    with pytest.raises(ValueError, match="buckets=0 must be an integer >= 1"):
        HashedNgrams(buckets=0)


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(max_size=60), max_size=6), buckets=st.integers(1, 2 ** 20),
       max_tokens=st.integers(1, 12), ngrams=st.integers(1, 3))
def test_ids_are_bounded_deterministic_and_per_document(texts, buckets, max_tokens, ngrams):
    f = HashedNgrams(buckets=buckets, max_tokens=max_tokens, ngrams=ngrams)
    ids = f(texts)
    assert ids.shape[0] == len(texts) and 1 <= ids.shape[1] <= max(1, f.max_ids())
    assert ((ids >= 0) & (ids <= buckets)).all()
    np.testing.assert_array_equal(ids, f(texts))
    for i, text in enumerate(texts):  # a row does not depend on the rest of its batch
        row = f.ids(text)
        assert ids[i, :len(row)].tolist() == row and not ids[i, len(row):].any()
        assert all(v >= 1 for v in row) and len(row) <= f.max_ids()


def test_ids_are_the_same_in_another_process():
    """crc32, not Python's per-process salted hash: another interpreter (another hash seed)
    makes the same ids."""
    texts = ["Win a FREE prize now", "meeting notes: budget review", "ünïcödé wörds ok", ""]
    code = ("import json, sys; from pipeline.text_features import HashedNgrams; "
            "print(json.dumps(HashedNgrams(buckets=997, ngrams=3)(json.loads(sys.argv[1])).tolist()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(texts)], capture_output=True,
                         text=True, check=True, env=env, cwd=ROOT)
    assert json.loads(out.stdout) == HashedNgrams(buckets=997, ngrams=3)(texts).tolist()


# =========================================================================== declarations

def test_text_students_declare_what_they_read_and_how_they_export():
    assert sorted(TEXT_STUDENTS) == ["fasttext", "textcnn", "tfidf_logreg", "tfidf_svc"]
    for name in TEXT_STUDENTS:
        needs = STUDENTS.declared(name)
        assert needs.kind == "inputs"
        assert needs.export == ("skops" if name.startswith("tfidf") else "onnx")
        assert needs.loss == (name in NETS)
    assert STUDENTS.declared("mlp").modality == "array" and STUDENTS.declared("mlp").export == "onnx"
    assert STUDENTS.declared("logreg").modality is None and STUDENTS.declared("logreg").export == "skops"
    with pytest.raises(ValueError, match="declares no modality"):
        StudentNeeds(kind="features", modality="text")
    with pytest.raises(ValueError, match="modality 'audio'"):
        StudentNeeds(kind="inputs", modality="audio")


def test_their_hyperparameters_are_their_constructors():
    assert set(student_params("tfidf_logreg")) == {
        "vectorizer", "C", "target", "temperature", "ngrams", "min_df", "buckets", "max_iter", "min_prob"}
    assert student_params("tfidf_svc")["C"].default == "auto"
    fasttext, textcnn = student_params("fasttext"), student_params("textcnn")
    assert set(fasttext) == {"width", "buckets", "max_tokens", "ngrams", "epochs", "lr",
                             "weight_decay", "batch_size"}
    assert (fasttext["ngrams"].default, textcnn["ngrams"].default) == (2, 1)  # the entries' defaults
    with pytest.raises(KdError, match=r"buckets=0 must be in \[1, 1e\+07\]"):
        student_config(["model=fasttext", "buckets=0"])
    with pytest.raises(KdError, match="augment=shift:1 does not apply: model textcnn with loss kd takes no augment"):
        student_config(["model=textcnn", "augment=shift:1"])


@pytest.mark.parametrize("target, logits, temperature", [("labels", False, False),
                                                         ("teacher", True, False),
                                                         ("soft", True, True)])
def test_what_a_target_reads(target, logits, temperature):
    use = uses(student_config(["model=tfidf_logreg", f"target={target}"]))
    assert (use.kind, use.target, use.logits, use.temperature) == ("inputs", target, logits, temperature)
    # the feature students keep their two targets, logreg_soft its temperature
    assert uses(student_config(["model=logreg_soft"])).temperature
    with pytest.raises(KdError, match="target='soft' must be labels or teacher"):
        student_config(["model=logreg", "target=soft"])


def test_a_run_on_the_other_kind_of_inputs_is_refused_in_one_line():
    check_modality("fasttext", "text", "cache c")
    check_modality("logreg", "text", "cache c")  # cached features: any data
    with pytest.raises(KdError) as exc:
        check_modality("fasttext", "array", "cache c")
    assert str(exc.value).startswith("model fasttext reads text, and cache c holds array inputs")
    with pytest.raises(KdError) as exc:
        check_modality("cnn_small", "text", "cache c")
    message = str(exc.value)
    assert message.startswith("model cnn_small reads array inputs, and cache c holds text; pick a "
                              "student of text (fasttext, textcnn, tfidf_logreg, tfidf_svc)")
    assert "\n" not in message


# =========================================================================== scikit-learn

@pytest.mark.parametrize("name, vectorizer", [("tfidf_logreg", "tfidf"), ("tfidf_svc", "hashing")])
def test_tfidf_students_learn_documents_and_restore_from_their_tensors(corpus, name, vectorizer):
    from safetensors.numpy import load, save

    params = dict(C=1.0, vectorizer=vectorizer, buckets=2048)
    est = create_student(name, **params).fit(corpus["X"], corpus["y"])
    scores = est.decision_function(corpus["X_test"])
    assert scores.shape == (60, 3) and np.mean(est.predict(corpus["X_test"]) == corpus["y_test"]) >= 0.9
    assert est.has_proba == (name == "tfidf_logreg") and est.n_params_ == est.model_.coef_.size + 3
    lazy = LazyRows(60, (), lambda a, b: corpus["X_test"][a:b], dtype=object)  # as a run reads them
    np.testing.assert_array_equal(est.decision_function(lazy), scores)
    saved = load(save({k: np.ascontiguousarray(v) for k, v in est.tensors().items()}))
    restored = create_student(name, **params).load_tensors(saved)
    np.testing.assert_array_equal(restored.decision_function(corpus["X_test"]), scores)
    np.testing.assert_array_equal(restored.cpu_predict()(corpus["X_test"][:4]), scores[:4])
    with pytest.raises(TypeError, match="scores documents"):
        est.decision_function(np.zeros((2, 3), np.float32))


def test_tfidf_soft_targets_and_two_classes(corpus):
    soft = softmax(corpus["z"] / 2.0)
    est = create_student("tfidf_logreg", C=10.0).fit(corpus["X"], soft)
    assert np.mean(est.predict(corpus["X_test"]) == corpus["y_test"]) >= 0.9
    two = corpus["y"] < 2
    svc = create_student("tfidf_svc", C=1.0).fit(corpus["X"][two], corpus["y"][two])
    scores = svc.decision_function(corpus["X_test"])
    assert scores.shape == (60, 2)  # scikit-learn's one margin, as two class scores
    np.testing.assert_array_equal(svc.predict(corpus["X_test"]), svc.classes_[scores.argmax(1)])
    with pytest.raises(ValueError, match="C='auto' chooses C on a validation split"):
        create_student("tfidf_logreg").fit(corpus["X"], corpus["y"])


@pytest.mark.parametrize("vectorizer", ["tfidf", "hashing"])
def test_the_deployed_pipeline_takes_documents_and_loads_with_nothing_trusted(corpus, tmp_path, vectorizer):
    import skops.io as sio

    est = create_student("tfidf_logreg", C=1.0, vectorizer=vectorizer, buckets=512).fit(corpus["X"], corpus["y"])
    sio.dump(est.to_sklearn(), tmp_path / "m.skops")
    assert sio.get_untrusted_types(file=tmp_path / "m.skops") == []
    pipeline = sio.load(tmp_path / "m.skops")
    np.testing.assert_array_equal(pipeline.decision_function(list(corpus["X_test"])),
                                  est.decision_function(corpus["X_test"]))


# =========================================================================== torch

_NETS: dict[str, object] = {}


def trained_net(name: str, corpus: dict):
    if name not in _NETS:
        est = create_student(name, loss="kd", temperature=4.0, **QUICK)
        _NETS[name] = est.fit(corpus["X"], corpus["y"], teacher_logits=corpus["z"],
                              X_val=corpus["X_val"], y_val=corpus["y_val"])
    return _NETS[name]


@pytest.mark.parametrize("name", NETS)
def test_text_networks_distil_and_restore(corpus, name):
    from safetensors.numpy import load, save

    est = trained_net(name, corpus)
    assert len(est.history_) == 4 and est.temperature_ == 4.0 and est.student_layer_ is None
    scores = est.decision_function(corpus["X_test"])
    assert scores.shape == (60, 3) and np.mean(scores.argmax(1) == corpus["y_test"]) >= 0.8
    assert est.n_params_ == sum(p.numel() for p in est.model_.net.parameters())
    saved = load(save({k: np.ascontiguousarray(v) for k, v in est.tensors().items()}))
    restored = create_student(name, **QUICK).load_tensors(saved, (), 3)
    np.testing.assert_allclose(restored.decision_function(corpus["X_test"]), scores, rtol=1e-5, atol=1e-5)
    cpu = restored.cpu_predict()(corpus["X_test"][:5])  # documents in: the featuriser is part of it
    np.testing.assert_allclose(cpu.numpy(), scores[:5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NETS)
def test_padding_never_changes_the_logits(corpus, name):
    import torch

    net = trained_net(name, corpus).deployed_module()
    f = trained_net(name, corpus).featuriser()
    docs = [corpus["X_test"][0], "", "win", corpus["X_test"][1]]
    ids = torch.from_numpy(f(docs))
    with torch.no_grad():
        batch = net(ids)
        wider = net(torch.nn.functional.pad(ids, (0, 9)))
        alone = torch.cat([net(torch.from_numpy(f([d]))) for d in docs])
    torch.testing.assert_close(wider, batch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, batch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", ["dkd", "fitnet", "rkd", "ce"])
def test_text_networks_train_with_other_losses(corpus, loss):
    from pipeline.losses import LOSSES

    needs = LOSSES.declared(loss)
    feats = np.random.default_rng(2).normal(size=(180, 7)).astype(np.float32)
    extra = {"temperature": 4.0} if needs.temperature else {}
    est = create_student("fasttext", loss=loss, **{**QUICK, "epochs": 1}, **extra)
    est.fit(corpus["X"], corpus["y"], teacher_logits=corpus["z"], teacher_features=feats,
            X_val=corpus["X_val"], y_val=corpus["y_val"])
    assert np.isfinite(est.history_[0]["train_loss"])
    assert est.student_layer_ == ("embed" if needs.features else None)
    assert set(est.tensors()) == set(est.model_.net.state_dict())  # a loss's head is not deployed


def test_text_networks_refuse_map_losses_and_other_layers(corpus):
    maps = np.zeros((180, 4, 2, 2), np.float32)
    with pytest.raises(KdError, match="loss at compares spatial feature maps, and model textcnn has none"):
        create_student("textcnn", loss="at", **QUICK).fit(
            corpus["X"], corpus["y"], teacher_features=maps, X_val=corpus["X_val"], y_val=corpus["y_val"])
    with pytest.raises(KdError, match="student fasttext has no layer 'conv'"):
        create_student("fasttext", loss="rkd", student_layer="conv", **QUICK).fit(
            corpus["X"], corpus["y"], teacher_features=maps.reshape(180, -1), X_val=corpus["X_val"],
            y_val=corpus["y_val"])


def test_text_network_training_is_deterministic(corpus):
    a, b = (create_student("textcnn", loss="kd", temperature=4.0, seed=3, **{**QUICK, "epochs": 1})
            .fit(corpus["X"], corpus["y"], teacher_logits=corpus["z"], X_val=corpus["X_val"],
                 y_val=corpus["y_val"]) for _ in range(2))
    np.testing.assert_array_equal(a.decision_function(corpus["X_val"]), b.decision_function(corpus["X_val"]))


# =========================================================================== end to end

def test_text_students_run_and_export_from_a_text_cache(text_cache, tmp_path, capsys):
    """The founding example and its text students: from one cache of a BERT teacher, a TF-IDF
    student on soft targets, fasttext with kd and logistic regression on the cached features
    each write a results row, and each exports to a file that plain skops / onnxruntime score
    the test documents with as the run did."""
    import onnxruntime as ort
    import skops.io as sio

    from conftest import run_cli
    from pipeline.cache import open_cache
    from pipeline.data import positions_of
    from pipeline.results import read_results, results_dir
    from stages.cli import main

    cache = open_cache(text_cache)
    runs = tmp_path / "runs"
    rows = {model: run_cli(capsys, "student", f"cache={text_cache}", f"runs_dir={runs}",
                           f"model={model}", "device=cpu", *args)
            for model, args in (("tfidf_logreg", ["target=soft", "C=1"]),
                                ("fasttext", ["loss=kd", "epochs=2", "buckets=4096"]),
                                ("logreg", []))}
    assert (rows["tfidf_logreg"]["target"], rows["tfidf_logreg"]["temperature"]) == ("soft", cache.temperature)
    assert rows["fasttext"]["loss"] == "kd" and rows["fasttext"]["kind"] == "inputs"
    assert rows["logreg"]["kind"] == "features"
    table = read_results(results_dir(text_cache)).to_pylist()
    assert sorted(r["model"] for r in table) == ["fasttext", "logreg", "tfidf_logreg"]
    for row in rows.values():
        assert 0 <= row["test_accuracy"] <= 1 and row["latency_b1_ms"] > 0

    dataset = cache.open_dataset()  # the test documents as stored, in cache row order
    split = dataset.splits["test"]
    docs = dataset.pools[split.pool].read(split.positions[positions_of(split.sample_ids, cache.sample_ids("test"))])
    labels = cache.labels("test")

    tfidf = run_cli(capsys, "export", f"run={rows['tfidf_logreg']['run_dir']}")
    assert tfidf["format"] == "skops" and tfidf["input"]["dtype"] == "str"
    pipeline = sio.load(tfidf["path"])  # nothing trusted; documents in
    assert np.mean(pipeline.predict(list(docs)) == labels) == rows["tfidf_logreg"]["test_accuracy"]

    net = run_cli(capsys, "export", f"run={rows['fasttext']['run_dir']}")
    run_dir = Path(rows["fasttext"]["run_dir"])
    assert net["format"] == "onnx" and net["beside"] == ["featuriser.json"]
    assert net["input"]["name"] == "ids" and net["check"]["max_abs_logit_diff"] < 1e-4
    featurise = HashedNgrams.from_spec(json.loads((run_dir / "featuriser.json").read_text()))
    assert featurise == HashedNgrams(buckets=4096, max_tokens=256, ngrams=2)
    session = ort.InferenceSession(str(run_dir / "student.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"ids": featurise(docs)})[0]
    assert np.mean(logits.argmax(1) == labels) == pytest.approx(rows["fasttext"]["test_accuracy"])
    one = session.run(["logits"], {"ids": featurise(docs[:1])})[0]  # batch and length are dynamic
    np.testing.assert_allclose(one, logits[:1], rtol=1e-5, atol=1e-5)

    features = run_cli(capsys, "export", f"run={rows['logreg']['run_dir']}")
    assert features["format"] == "skops" and features["input"]["dtype"] == "float32"

    capsys.readouterr()  # an image student on documents: refused up front, in one line
    assert main(["student", f"cache={text_cache}", f"runs_dir={runs}", "model=mlp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model mlp reads array inputs, and cache" in err[0]
