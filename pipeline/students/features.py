"""Feature students: scikit-learn linear models on cached teacher features ("feature transfer").

Features are standardised with train statistics and handed to scikit-learn as contiguous
float32 (float16 would be silently upcast to float64 by LogisticRegression).
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Callable, Iterable

import numpy as np
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from pipeline.errors import KdError
from pipeline.numerics import softmax
from pipeline.rows import map_blocks
from pipeline.students.base import Student
from pipeline.students.data import StudentData
from pipeline.students.registry import STUDENTS

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)  # C=auto: the values tried, best validation accuracy wins


def as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def teacher_soft_targets(data: StudentData, temperature: float, min_prob: float,
                         model: str) -> np.ndarray | dict:
    """The train split's soft targets softmax(z / T) at ``temperature``: probabilities [N, C],
    or from a sparse-logit cache the targets over each row's K listed classes (a dict, see
    :meth:`SoftLogRegStudent.fit`). A class that gets less than ``min_prob`` on every train row
    could never be learnt by ``model`` (a student fitting :func:`expand_soft_targets`): refused
    in one line."""
    if data.sparse:
        data.check_targets(temperature)
        target = {**data.sparse_targets("train", temperature), "num_classes": data.num_classes}
    else:
        target = softmax(data.teacher_logits("train") / np.float32(temperature))
    _, cls, _ = expand_soft_targets(target, min_prob)
    starved = np.setdiff1d(np.arange(data.num_classes), cls)
    if len(starved) and data.sparse:
        raise KdError(f"class(es) {starved.tolist()[:5]} get almost no probability on any train "
                      f"row among the classes cache {data.cache.root} keeps (logits="
                      f"{data.cache.logits_mode.spec}), so {model} cannot learn them; "
                      "use a cache with more classes per row (a larger K) or dense logits")
    if len(starved):
        raise KdError(f"at temperature {temperature:g} the teacher gives class(es) "
                      f"{starved.tolist()[:5]} almost no probability on any train row, so "
                      f"{model} cannot learn them; use a larger temperature (e.g. temperature=2)")
    return target


def expand_soft_targets(soft_targets: np.ndarray | dict,
                        min_prob: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, class, weight) of every teacher probability >= ``min_prob``: the rows of the
    expansion that fits soft targets with a classifier that takes only hard labels and sample
    weights (see :class:`SoftLogRegStudent`)."""
    if isinstance(soft_targets, dict):
        keep = soft_targets["t_w"] >= min_prob
        rows = np.nonzero(keep)[0]
        return rows, soft_targets["t_ids"][keep], soft_targets["t_w"][keep].astype(np.float64)
    rows, cls = np.nonzero(soft_targets >= min_prob)
    return rows, cls, soft_targets[rows, cls].astype(np.float64)


def fit_soft_targets(estimator, X, soft_targets: np.ndarray | dict, min_prob: float):
    """``estimator`` fitted to soft targets by the expansion: each row of ``X`` (an array, or
    a sparse matrix) once per class c with label c and sample weight p(c), the weights scaled
    to sum to the number of rows (so C means what it means on hard targets). Returns it."""
    n, k = X.shape[0], _num_classes(soft_targets)
    rows, cls, weights = expand_soft_targets(soft_targets, min_prob)
    estimator.fit(X[rows], cls, sample_weight=weights * (n / weights.sum()))
    if len(estimator.classes_) != k:
        raise ValueError("some class never received teacher probability mass")
    return estimator


def hard_targets(data: StudentData, target: str) -> np.ndarray:
    """The train split's labels, or the teacher's argmax (``target=teacher``)."""
    if target == "labels":
        return data.labels("train")
    argmax = data.teacher_logits("train").argmax(1)
    if len(np.unique(argmax)) < 2:
        raise KdError(f"the teacher of cache {data.cache.root} predicts a single class on every train "
                      "row, so target=teacher leaves nothing to learn; use target=labels")
    return argmax


class _LinearBase(Student):
    """Shared scoring of a fitted ``scaler_`` + linear ``model_``, and C=auto selection."""

    def _fit_scaler(self, X: np.ndarray) -> np.ndarray:
        """Learn train statistics and return the standardised float32 rows (the first step of
        every in-memory ``fit``, which takes one C: ``C="auto"`` needs ``fit_cache``'s val)."""
        if getattr(self, "C", None) == "auto":
            raise ValueError("C='auto' chooses C on a validation split: use fit_cache")
        self.scaler_ = StandardScaler().fit(as_f32(X))
        return as_f32(self.scaler_.transform(as_f32(X)))

    def _fit_cache_selecting_c(self, data: StudentData, target: np.ndarray) -> "_LinearBase":
        """``fit(train features, target)``; with ``C="auto"`` once per value of ``C_GRID``,
        keeping the first with the best validation accuracy. ``C_`` is the C used."""
        X, X_val, y_val = data.features("train"), data.features("val"), data.labels("val")
        grid = C_GRID if self.C == "auto" else (float(self.C),)
        best = None
        for c in grid:  # model selection on the validation split
            candidate = copy.copy(self).set_params(C=c).fit(X, target)
            acc = float(np.mean(candidate.predict(X_val) == y_val))
            if best is None or acc > best[0]:
                best = (acc, candidate, c)
        self.__dict__.update({k: v for k, v in vars(best[1]).items() if k.endswith("_")})
        self.C_ = best[2]
        return self

    def decision_function(self, X) -> np.ndarray:
        """Class scores [N, K]; ``X`` may be a :class:`~pipeline.rows.LazyRows`."""
        return map_blocks(self._scores, X)

    def _scores(self, X: np.ndarray) -> np.ndarray:
        scores = self.model_.decision_function(as_f32(self.scaler_.transform(as_f32(X))))
        if scores.ndim == 1:  # binary: scikit-learn returns one margin, > 0 for classes_[1]
            scores = np.stack([-scores, scores], axis=1)
        return scores

    @property
    def has_proba(self) -> bool:
        return hasattr(self.model_, "predict_proba")

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return map_blocks(lambda b: self.model_.predict_proba(as_f32(self.scaler_.transform(as_f32(b)))), X)

    @property
    def n_params_(self) -> int:
        return int(self.model_.coef_.size + np.size(self.model_.intercept_))

    def _estimator(self):
        """The unfitted scikit-learn estimator this student fits (its parameters)."""
        raise NotImplementedError

    def tensors(self) -> dict[str, np.ndarray]:
        return {"scaler_mean": self.scaler_.mean_, "scaler_scale": self.scaler_.scale_,
                "scaler_var": self.scaler_.var_,
                "scaler_n_samples_seen": np.atleast_1d(self.scaler_.n_samples_seen_),
                "coef": self.model_.coef_, "intercept": np.atleast_1d(self.model_.intercept_),
                "classes": self.classes_}

    def load_tensors(self, tensors: dict[str, np.ndarray], input_shape=None,
                     num_classes=None) -> "_LinearBase":
        """The fitted scaler and estimator rebuilt from :meth:`tensors`: plain scikit-learn
        objects with the learned attributes that scoring reads."""
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = tensors["scaler_mean"], tensors["scaler_scale"]
        # (runs saved before the variance was: the scale is its square root where it is not 0)
        scaler.var_ = tensors.get("scaler_var", scaler.scale_ ** 2)
        seen = tensors.get("scaler_n_samples_seen")
        if seen is not None:
            scaler.n_samples_seen_ = seen if seen.size > 1 else int(seen[0])
        model = self._estimator()
        model.coef_, model.classes_ = tensors["coef"], tensors["classes"]
        model.intercept_ = tensors["intercept"]
        scaler.n_features_in_ = model.n_features_in_ = int(tensors["coef"].shape[1])
        self.scaler_, self.model_, self.classes_ = scaler, model, tensors["classes"]
        return self

    def to_sklearn(self):
        """The deployed student as one plain scikit-learn estimator: a Pipeline of the
        fitted StandardScaler and classifier, scoring float32 teacher features."""
        from sklearn.pipeline import Pipeline

        return Pipeline([("scaler", self.scaler_), ("classifier", self.model_)])


class FeatureStudent(_LinearBase):
    """StandardScaler + LinearSVC / LogisticRegression on hard targets (labels or teacher argmax).
    ``C``: inverse regularisation, or ``"auto"`` (chosen on val from ``C_GRID``)."""

    fixed_params = ("estimator",)  # names the registry entry (linear_svc, logreg)

    def __init__(self, estimator: str = "linear_svc", C: float | str = 1.0, target: str = "labels",
                 max_iter: int = 5000, seed: int = 0):
        self.estimator = estimator
        self.C = C
        self.target = target
        self.max_iter = max_iter
        self.seed = seed

    def _estimator(self):
        if self.estimator == "linear_svc":
            return LinearSVC(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        if self.estimator == "logreg":
            return LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        raise ValueError(f"unknown estimator {self.estimator!r}")

    def fit(self, X: np.ndarray, y: np.ndarray) -> "FeatureStudent":
        Xs = self._fit_scaler(X)
        self.model_ = self._estimator().fit(Xs, y)
        self.classes_ = self.model_.classes_
        return self

    def fit_cache(self, data: StudentData) -> "FeatureStudent":
        return self._fit_cache_selecting_c(data, hard_targets(data, self.target))


class SoftLogRegStudent(_LinearBase):
    """Logistic regression on the teacher's *soft* targets softmax(z / T).

    scikit-learn's LogisticRegression takes no 2-D probability target (scikit-learn #12342), so
    each row is expanded once per class c with label c and sample weight p_teacher(c | x; T).
    Minimising the weighted log loss then minimises the cross-entropy to the teacher's
    distribution, Σ_c p_t(c) · (−log q(c | x)). Classes with p < ``min_prob`` are dropped to
    bound the expansion. ``temperature=None`` takes the cache's default in ``fit_cache``.
    From a sparse-logit cache the rows expand over their K listed classes only, with the
    teacher's probabilities of those (:meth:`pipeline.sparse.SparseLogits.targets`); the tail
    bucket names no class and is dropped like the classes under ``min_prob``.
    """

    def __init__(self, C: float | str = 1.0, temperature: float | None = None, max_iter: int = 5000,
                 min_prob: float = 1e-4, seed: int = 0):
        self.C = C
        self.temperature = temperature
        self.max_iter = max_iter
        self.min_prob = min_prob
        self.seed = seed

    def fit(self, X: np.ndarray, soft_targets: np.ndarray | dict) -> "SoftLogRegStudent":
        """``soft_targets``: the teacher's probabilities [N, C], or sparse targets (a dict with
        ``t_ids`` [N, K], ``t_w`` [N, K] and ``num_classes``)."""
        self.model_ = fit_soft_targets(self._estimator(), self._fit_scaler(X), soft_targets,
                                       self.min_prob)
        self.classes_ = self.model_.classes_
        return self

    def _estimator(self):
        return LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)

    def fit_cache(self, data: StudentData) -> "SoftLogRegStudent":
        temperature = self.temperature if self.temperature is not None else data.temperature
        target = teacher_soft_targets(data, temperature, self.min_prob, "logreg_soft")
        self._fit_cache_selecting_c(data, target)
        self.temperature_ = temperature
        return self


class StreamingSGDStudent(_LinearBase):
    """SGDClassifier (log loss) trained out of core with ``partial_fit``.

    One pass standardises (StandardScaler.partial_fit), then ``epochs`` passes of partial_fit
    over freshly shuffled chunk streams; after each epoch it scores the validation rows and
    keeps the best epoch's weights. Memory is bounded by the stream's buffer, not by the number
    of rows.
    """

    def __init__(self, sgd_alpha: float = 1e-4, epochs: int = 20, target: str = "labels",
                 seed: int = 0):
        self.sgd_alpha = sgd_alpha  # SGDClassifier's alpha (L2 penalty), named apart from kd's alpha
        self.epochs = epochs
        self.target = target
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None,
            y_val: np.ndarray | None = None) -> "StreamingSGDStudent":
        """The in-memory form (scikit-learn's ``fit(X, y)``): rows are streamed in chunks of
        1024, reshuffled every epoch; validation defaults to the train rows."""
        X, y = np.asarray(X), np.asarray(y)
        X_val, y_val = (X, y) if X_val is None else (X_val, y_val)

        def batches(epoch: int):
            rows = (np.arange(len(X)) if epoch < 0
                    else np.random.default_rng([self.seed, epoch]).permutation(len(X)))
            for a in range(0, len(X), 1024):
                yield X[rows[a:a + 1024]], y[rows[a:a + 1024]]

        return self._fit_batches(batches, np.unique(y), X_val, y_val)

    def _estimator(self):
        return SGDClassifier(loss="log_loss", alpha=self.sgd_alpha, random_state=self.seed,
                             learning_rate="optimal")

    def fit_cache(self, data: StudentData) -> "StreamingSGDStudent":
        teacher = self.target == "teacher"

        def batches(epoch: int):
            for x, labels, logits in data.feature_batches(epoch, self.seed, logits=teacher):
                yield x, (logits.argmax(1) if teacher else labels)

        return self._fit_batches(batches, np.arange(data.num_classes), data.rows("val", "features"),
                                 data.labels("val"))

    def _fit_batches(self, batches: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]],
                     classes: np.ndarray, X_val, y_val: np.ndarray) -> "StreamingSGDStudent":
        """``batches(epoch)`` yields ``(X, y)`` chunks; epoch −1 is the scaling pass."""
        self.scaler_ = StandardScaler()
        for xb, _ in batches(-1):
            self.scaler_.partial_fit(as_f32(xb))
        self.model_ = self._estimator()
        self.classes_ = np.asarray(classes)
        best, self.history_ = (-1.0, None), []
        for epoch in range(self.epochs):
            for xb, yb in batches(epoch):
                self.model_.partial_fit(as_f32(self.scaler_.transform(as_f32(xb))), yb, classes=classes)
            acc = float(np.mean(self.predict(X_val) == y_val))
            self.history_.append({"epoch": epoch, "val_accuracy": acc})
            if acc > best[0]:
                best = (acc, copy.deepcopy(self.model_))
        self.model_ = best[1]
        self.best_epoch_ = int(np.argmax([h["val_accuracy"] for h in self.history_]))
        return self


def _num_classes(soft_targets: np.ndarray | dict) -> int:
    return int(soft_targets["num_classes"]) if isinstance(soft_targets, dict) else soft_targets.shape[1]


# Each entry fixes the estimator; its hyperparameters are the class's constructor arguments
STUDENTS.register("linear_svc", kind="features")(partial(FeatureStudent, estimator="linear_svc"))
STUDENTS.register("logreg", kind="features")(partial(FeatureStudent, estimator="logreg"))
STUDENTS.register("logreg_soft", kind="features")(SoftLogRegStudent)
STUDENTS.register("sgd", kind="features")(StreamingSGDStudent)
