"""Every registered student follows the student contract and scikit-learn's conventions.

The contract tests are parametrized over every name in pipeline.students.STUDENTS, so a new
student is covered the moment it registers: it is constructed from the default config, cloned,
and trained through ``fit_cache`` on a tiny real cache (of images, or of signals when its
architecture takes no images). ``SPECS`` adds in-memory ``fit(X, y, ...)`` checks for the
built-in students: feature students fit small random features; torch students fit small inputs
against fake teacher logits for two epochs.
"""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.base
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from pipeline.architectures import ARCHITECTURES, student_width
from pipeline.errors import KdError
from pipeline.losses import LOSSES, classification_losses
from pipeline.numerics import softmax
from pipeline.students import STUDENTS, StreamingSGDStudent, StudentData, create_student, student_params

K = 3  # classes


def blobs(shape: tuple[int, ...], n: int, seed: int, k: int = K):
    """Separable-ish classes: a per-class prototype plus noise, any input shape."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(0, 1.5, (k,) + shape).astype(np.float32)
    y = np.arange(n) % k
    rng.shuffle(y)
    x = protos[y] + rng.normal(0, 1.0, (n,) + shape).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def fake_teacher(y: np.ndarray, seed: int, k: int = K) -> np.ndarray:
    """Teacher logits that mostly favour the label."""
    rng = np.random.default_rng(seed)
    return (3.0 * np.eye(k)[y] + rng.normal(0, 1.0, (len(y), k))).astype(np.float32)


# name -> (input shape, student parameters (run keys and hyperparameters), kind)
TORCH = dict(epochs=2, batch_size=32, device="cpu", lr=1e-2, temperature=4.0)
SPECS = {
    "linear_svc": ((6,), {"C": 0.5}, "features"),
    "logreg": ((6,), {"C": 2.0}, "features"),
    "logreg_soft": ((6,), {"C": 1.0}, "features"),
    "sgd": ((6,), {"epochs": 3, "sgd_alpha": 1e-3}, "features"),
    "mlp": ((10,), {"loss": "kd", **TORCH}, "inputs"),
    "cnn1d": ((2, 16), {"loss": "kd", **TORCH}, "inputs"),
    "cnn_small": ((1, 8, 8), {"loss": "kd", **TORCH}, "inputs"),
    "resnet_small": ((1, 8, 8), {"loss": "kd", **TORCH}, "inputs"),
}
NAMES = sorted(SPECS)


def test_specs_declare_the_registered_kind():
    for name, (_, _, kind) in SPECS.items():
        assert STUDENTS.declared(name).kind == kind, name


def make_data(name: str, n: int = 72, seed: int = 0) -> dict:
    shape = SPECS[name][0]
    x, y = blobs(shape, n + 24, seed)
    return {"X": x[:n], "y": y[:n], "X_val": x[n:], "y_val": y[n:], "z_t": fake_teacher(y[:n], seed + 1)}


def fit(est, name: str, d: dict):
    """Fit ``est`` the way its kind is fitted; returns what fit returned."""
    if name == "logreg_soft":
        return est.fit(d["X"], softmax(d["z_t"] / 2.0))
    if SPECS[name][2] == "features":
        return est.fit(d["X"], d["y"])
    return est.fit(d["X"], d["y"], teacher_logits=d["z_t"], X_val=d["X_val"], y_val=d["y_val"])


def new(name: str, **extra):
    params = {**SPECS[name][1], **extra}
    if params.get("loss") and not LOSSES.declared(params["loss"]).temperature:
        params.pop("temperature", None)  # a loss without a temperature does not take one
    return create_student(name, **params)


_FITTED: dict[str, tuple] = {}


def fitted_once(name: str) -> tuple:
    """(unfitted attribute names, fitted estimator, what fit returned, data), fitted once per name."""
    if name not in _FITTED:
        d = make_data(name)
        est = new(name)
        before = set(vars(est))
        returned = fit(est, name, d)
        _FITTED[name] = (before, est, returned, d)
    return _FITTED[name]


@pytest.fixture
def fitted(request):
    return fitted_once(request.param)


def by_name(test):
    return pytest.mark.parametrize("fitted", NAMES, indirect=True)(test)


# =========================================================================== construction

@pytest.mark.parametrize("name", STUDENTS.names())
def test_constructor_only_stores_parameters(name):
    est = create_student(name)
    params = est.get_params()
    assert set(vars(est)) == set(params), "the constructor must store exactly its parameters"
    with pytest.raises(NotFittedError):
        check_is_fitted(est)
    learned = [a for a in vars(est) if a.endswith("_")]
    assert not learned, f"learned attributes exist before fit: {learned}"


@pytest.mark.parametrize("name", NAMES)
def test_factories_take_the_config(name):
    est = new(name)
    params = est.get_params()
    for key, value in SPECS[name][1].items():
        if key in params:
            assert params[key] == value


@pytest.mark.parametrize("name", STUDENTS.names())
def test_clone_and_get_params_round_trip(name):
    est = create_student(name)
    params = est.get_params()
    copy = sklearn.base.clone(est)
    assert copy is not est and copy.get_params() == params
    rebuilt = type(est)(**params)
    assert rebuilt.get_params() == params
    first = next(iter(params))
    assert est.set_params(**{first: params[first]}) is est


def test_constructor_does_not_validate():
    """Validation belongs in fit (scikit-learn convention), so clone/set_params never fail."""
    from pipeline.students import FeatureStudent, TorchStudent

    est = FeatureStudent(estimator="no-such-model")
    sklearn.base.clone(est)
    with pytest.raises(ValueError):
        est.fit(*blobs((4,), 30, 0))
    TorchStudent(arch="mlp", loss="no-such-loss")


# =========================================================================== fit and predict

@by_name
def test_fit_returns_self_and_learns_underscore_attributes(fitted):
    before, est, returned, _ = fitted
    assert returned is est
    new_attrs = set(vars(est)) - before
    assert new_attrs, "fit learned nothing"
    assert all(a.endswith("_") for a in new_attrs), f"learned attributes without '_': {new_attrs}"
    check_is_fitted(est)
    assert isinstance(est.n_params_, int) and est.n_params_ > 0


@by_name
def test_predict_and_decision_function(fitted):
    _, est, _, d = fitted
    X = d["X_val"]
    scores = est.decision_function(X)
    assert scores.shape == (len(X), K)
    assert np.isfinite(scores).all()
    pred = est.predict(X)
    assert pred.shape == (len(X),)
    assert np.isin(pred, est.classes_).all()
    np.testing.assert_array_equal(pred, est.classes_[scores.argmax(1)])
    assert list(est.classes_) == list(range(K))
    if est.has_proba:
        probs = est.predict_proba(X)
        assert probs.shape == (len(X), K)
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


@by_name
def test_tensors_are_plain_arrays(fitted):
    _, est, _, _ = fitted
    tensors = est.tensors()
    assert tensors
    for key, value in tensors.items():
        assert np.asarray(value).size > 0, key


@pytest.mark.parametrize("name", NAMES)
def test_load_tensors_restores_the_fitted_student(name):
    """What a run saves is enough to score again: a fresh student loaded from the tensors
    (through a safetensors file, as a run directory holds them) gives the same scores."""
    from safetensors.numpy import load, save

    _, est, _, d = fitted_once(name)
    saved = load(save({k: np.ascontiguousarray(v) for k, v in est.tensors().items()}))
    restored = new(name).load_tensors(saved, SPECS[name][0], K)
    X = d["X_val"]
    np.testing.assert_array_equal(restored.decision_function(X), est.decision_function(X))
    np.testing.assert_array_equal(restored.predict(X), est.predict(X))
    if est.has_proba:
        np.testing.assert_allclose(restored.predict_proba(X), est.predict_proba(X), rtol=1e-6)
    assert restored.n_params_ == est.n_params_
    cpu = restored.cpu_predict()(np.ascontiguousarray(X[:4]))
    scores = cpu.numpy() if hasattr(cpu, "numpy") else cpu
    np.testing.assert_allclose(scores, est.decision_function(X[:4]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if SPECS[n][2] == "features"])
def test_feature_students_learn_separable_data(name):
    d = make_data(name, n=240)
    est = fit(new(name), name, d)
    assert np.mean(est.predict(d["X_val"]) == d["y_val"]) >= 0.7


@pytest.mark.parametrize("name", [n for n in NAMES if SPECS[n][2] == "features"])
def test_feature_students_binary(name):
    """Two classes: scikit-learn returns one margin per row; students still give (n, 2)."""
    x, y = blobs((5,), 80, 3, k=2)
    est = new(name)
    if name == "logreg_soft":
        est.fit(x, softmax(fake_teacher(y, 4, k=2)))
    else:
        est.fit(x, y)
    scores = est.decision_function(x)
    assert scores.shape == (80, 2)
    np.testing.assert_array_equal(est.predict(x), est.classes_[scores.argmax(1)])
    assert np.mean(est.predict(x) == y) > 0.7


def test_sgd_trains_out_of_core_from_batches():
    d = make_data("sgd", n=300)
    calls = []

    def batches(epoch):
        calls.append(epoch)
        order = np.random.default_rng(epoch + 1).permutation(len(d["X"]))
        for a in range(0, len(order), 64):
            yield d["X"][order[a:a + 64]], d["y"][order[a:a + 64]]

    est = StreamingSGDStudent(sgd_alpha=1e-3, epochs=4, seed=0)
    assert est._fit_batches(batches, np.arange(K), d["X_val"], d["y_val"]) is est
    assert calls == [-1, 0, 1, 2, 3]  # one scaling pass, then one pass per epoch
    assert [h["epoch"] for h in est.history_] == [0, 1, 2, 3]
    best = max(h["val_accuracy"] for h in est.history_)
    assert est.history_[est.best_epoch_]["val_accuracy"] == best
    assert np.mean(est.predict(d["X_val"]) == d["y_val"]) == pytest.approx(best)


@pytest.mark.parametrize("fitted", [n for n in NAMES if SPECS[n][2] == "inputs"], indirect=True)
def test_torch_students_keep_best_validation_epoch(fitted):
    _, est, _, d = fitted
    assert len(est.history_) == 2
    assert 0 <= est.best_epoch_ < 2
    acc = np.mean(est.predict(d["X_val"]) == d["y_val"])
    assert acc == pytest.approx(est.history_[est.best_epoch_]["val_accuracy"])


@pytest.mark.parametrize("loss", sorted(n for n in classification_losses() if not LOSSES.declared(n).maps))
def test_torch_student_with_each_loss(loss):
    d = make_data("mlp", n=48)
    feats = np.random.default_rng(5).normal(size=(48, 7)).astype(np.float32)
    est = new("mlp", loss=loss, epochs=1)
    est.fit(d["X"], d["y"], teacher_logits=d["z_t"], teacher_features=feats, X_val=d["X_val"], y_val=d["y_val"])
    assert est.decision_function(d["X_val"]).shape == (len(d["X_val"]), K)
    assert np.isfinite(est.history_[0]["train_loss"])
    needs = LOSSES.declared(loss)
    assert est.student_layer_ == ("embed" if needs.features else None)
    assert est.loss_weight_ == needs.weight
    if loss == "fitnet":  # the hint adapter maps to the teacher's feature width, but is not deployed
        assert est.model_.head.linear.out_features == 7
    if needs.head is not None:
        head_params = sum(p.numel() for p in est.model_.head.parameters())
        assert head_params > 0
        assert est.n_params_ == sum(p.numel() for p in est.model_.net.parameters())
        assert set(est.tensors()) == set(est.model_.net.state_dict())  # heads are not deployed


@pytest.mark.parametrize("loss", sorted(n for n in LOSSES if LOSSES.declared(n).maps))
def test_torch_student_with_each_map_loss_reads_the_named_layer_unpooled(loss):
    d = make_data("cnn_small", n=48)
    maps = np.random.default_rng(6).normal(size=(48, 24, 4, 4)).astype(np.float32)  # 24 channels
    est = new("cnn_small", loss=loss, epochs=1)
    est.fit(d["X"], d["y"], teacher_features=maps, teacher_layer="block3.2", X_val=d["X_val"], y_val=d["y_val"])
    assert est.student_layer_ == "block3.2" and np.isfinite(est.history_[0]["train_loss"])
    assert est.model_.feature_shape((1, 8, 8)) == (16, 4, 4)  # width 4: 4·4 channels, unpooled
    with pytest.raises(KdError, match="compares spatial feature maps"):
        new("cnn_small", loss=loss, epochs=1).fit(
            d["X"], d["y"], teacher_features=maps.mean(axis=(2, 3)), teacher_layer="block3.2",
            X_val=d["X_val"], y_val=d["y_val"])


def test_feature_losses_take_the_student_layer_by_name():
    d = make_data("cnn_small", n=48)
    feats = np.random.default_rng(7).normal(size=(48, 9)).astype(np.float32)
    est = new("cnn_small", loss="rkd", epochs=1)
    est.fit(d["X"], d["y"], teacher_features=feats, teacher_layer="block2.2", X_val=d["X_val"], y_val=d["y_val"])
    assert est.student_layer_ == "block2.2"  # the cached layer's name, which the student has
    est = new("cnn_small", loss="rkd", epochs=1)
    est.fit(d["X"], d["y"], teacher_features=feats, teacher_layer="layer4", X_val=d["X_val"], y_val=d["y_val"])
    assert est.student_layer_ == "embed"  # a name it lacks: its penultimate layer
    with pytest.raises(KdError, match="student cnn_small has no layer 'nope'"):
        new("cnn_small", loss="rkd", epochs=1, student_layer="nope").fit(
            d["X"], d["y"], teacher_features=feats, X_val=d["X_val"], y_val=d["y_val"])


def test_torch_student_refuses_missing_targets():
    d = make_data("mlp", n=24)
    with pytest.raises(ValueError, match="teacher_logits"):
        new("mlp", loss="kd").fit(d["X"], d["y"], X_val=d["X_val"], y_val=d["y_val"])
    with pytest.raises(ValueError, match="teacher_features"):
        new("mlp", loss="fitnet").fit(d["X"], d["y"], teacher_logits=d["z_t"], X_val=d["X_val"], y_val=d["y_val"])


# =========================================================================== determinism

@pytest.mark.parametrize("name", ["cnn_small", "mlp"])
def test_torch_student_is_deterministic_on_cpu(name):
    d = make_data(name)
    a = fit(new(name, seed=7), name, d)
    b = fit(new(name, seed=7), name, d)
    np.testing.assert_array_equal(a.decision_function(d["X_val"]), b.decision_function(d["X_val"]))
    np.testing.assert_array_equal(a.predict(d["X_val"]), b.predict(d["X_val"]))
    for key, value in a.tensors().items():
        assert np.array_equal(value, b.tensors()[key]), key
    c = fit(new(name, seed=8), name, d)
    assert not np.array_equal(a.decision_function(d["X_val"]), c.decision_function(d["X_val"]))


@pytest.mark.parametrize("name", ["linear_svc", "logreg", "logreg_soft", "sgd"])
def test_feature_student_is_deterministic(name):
    d = make_data(name)
    a, b = fit(new(name, seed=3), name, d), fit(new(name, seed=3), name, d)
    np.testing.assert_array_equal(a.decision_function(d["X_val"]), b.decision_function(d["X_val"]))


def test_lazy_rows_give_the_same_predictions_as_arrays():
    from pipeline.rows import LazyRows, map_blocks

    rng = np.random.default_rng(0)
    X = rng.standard_normal((1000, 5)).astype(np.float32)
    fetched = []
    lazy = LazyRows(len(X), (5,), lambda a, b: fetched.append((a, b)) or X[a:b])
    assert len(lazy) == 1000 and lazy.shape == (1000, 5)
    np.testing.assert_array_equal(lazy[10:20], X[10:20])
    with pytest.raises(TypeError):
        lazy[[1, 2]]
    fetched.clear()
    np.testing.assert_array_equal(map_blocks(lambda b: b * 2, lazy, rows=300), X * 2)
    assert fetched == [(0, 300), (300, 600), (600, 900), (900, 1000)]
    y = (X[:, 0] > 0).astype(int)
    for name in ("logreg", "sgd"):
        student = create_student(name, seed=0).fit(X, y)
        np.testing.assert_allclose(student.decision_function(lazy), student.decision_function(X), rtol=1e-6)


# =========================================================================== the contract: fit_cache

@pytest.fixture(scope="module")
def contract_caches(tmp_path_factory, request) -> dict[str, StudentData]:
    """Tiny caches: images (1, 8, 8) and signals (2, 16) of random mlp teachers, and text (the
    test corpus) of a tiny random BERT where ``teacher=hf:`` is there to build it."""
    import importlib.util

    from conftest import build

    from pipeline.cache import open_cache

    work = tmp_path_factory.mktemp("contract")
    caches = {}
    for name, spec in (("images", "synthetic:300:1x8x8:3"), ("signals", "synthetic:300:2x16:3")):
        build(work / name, work, dataset=spec, teacher="mlp")
        caches[name] = StudentData(open_cache(work / name))
    if importlib.util.find_spec("pipeline.hf") is not None:
        corpus, bert = request.getfixturevalue("text_corpus"), request.getfixturevalue("tiny_bert")
        build(work / "text", work, dataset=f"text:{corpus}", teacher=f"hf:{bert}", teacher_ckpt="random")
        caches["text"] = StudentData(open_cache(work / "text"))
    return caches


@pytest.mark.parametrize("name", STUDENTS.names())
def test_fit_cache_is_the_one_way_to_train(name, contract_caches):
    """Every registered student trains from a cache through fit_cache and scores its rows."""
    trained = 0
    needs = STUDENTS.declared(name)
    if needs.kind == "inputs" and not any(d.modality == needs.modality for d in contract_caches.values()):
        pytest.skip(f"no contract cache of {needs.modality} inputs yet (a text cache needs a "
                    "text teacher, teacher=hf:DIR)")
    for data in contract_caches.values():
        if needs.kind == "inputs" and needs.modality != data.modality:
            continue  # (declared: a run on such a cache is refused up front, see test_text_students)
        quick = {k: v for k, v in dict(epochs=2, batch_size=32).items() if k in student_params(name)}
        est = create_student(name, device="cpu", **quick)  # (keys the student declares)
        try:
            returned = est.fit_cache(data)
        except KdError as exc:  # an architecture that takes no such inputs (cnn1d: no images)
            assert "needs inputs shaped" in str(exc), exc
            continue
        assert returned is est
        learned = [a for a in vars(est) if a.endswith("_")]
        assert learned and all(a.endswith("_") for a in set(vars(est)) - set(est.get_params()))
        check_is_fitted(est)
        X = data.rows("test", STUDENTS.declared(name).kind)
        scores = est.decision_function(X)
        assert scores.shape == (len(X), K) and np.isfinite(scores).all()
        np.testing.assert_array_equal(est.predict(X), est.classes_[scores.argmax(1)])
        assert isinstance(est.n_params_, int) and est.n_params_ > 0 and est.tensors()
        trained += 1
    assert trained, f"{name} trained on neither contract cache"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_is_a_teacher_and_a_narrower_input_student(arch):
    from pipeline.teachers import TEACHERS

    assert arch in TEACHERS and STUDENTS.declared(arch).kind == "inputs"
    build, shape = ARCHITECTURES.get(arch), (2, 16) if arch == "cnn1d" else (1, 8, 8)
    params = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert params(build(shape, 3, student_width(arch))) < params(build(shape, 3))
