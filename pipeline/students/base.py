"""The student contract: what every student, scikit-learn or PyTorch, implements.

A student is a scikit-learn estimator: the constructor only stores parameters (taken from a
resolved :class:`~pipeline.config.StudentConfig` by its registered factory), learned
attributes end in ``_``, and it scores rows with ``decision_function`` / ``predict`` (and
``predict_proba`` when ``has_proba``). It is trained from an opened cache through **one**
method, :meth:`Student.fit_cache`, whatever it reads (cached features, streamed or in memory;
inputs joined to cached logits and features). Students may also offer scikit-learn's in-memory
``fit(X, y, ...)``.

Adding a student: subclass :class:`Student` in one module of ``pipeline/students/``, implement
``fit_cache``, ``decision_function``, ``n_params_``, ``tensors`` and its inverse
``load_tensors`` (a run directory is exported from its saved tensors), and register a factory
``cfg -> Student`` with what it needs (:class:`~pipeline.students.registry.StudentNeeds`). The
tests parametrized over ``STUDENTS`` then cover it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

if TYPE_CHECKING:
    from pipeline.students.data import StudentData


class Student(BaseEstimator, ClassifierMixin):
    """Base class of every student (see the module docstring for the contract)."""

    has_proba = True  # False: scores are margins, calibrated by the run on val (LinearSVC)
    # The values a hyperparameter of the student's takes, where they are a closed set of words:
    # checked when the run's config is completed, before any work (a student without the
    # parameter ignores its entry)
    choices: dict[str, tuple[str, ...]] = {"target": ("labels", "teacher")}

    def fit_cache(self, data: "StudentData") -> "Student":
        """Train from an opened cache; model selection may use val, never test. Returns self."""
        raise NotImplementedError

    def decision_function(self, X) -> np.ndarray:
        """Class scores [N, K] for rows ``X`` (an array or :class:`~pipeline.rows.LazyRows`)."""
        raise NotImplementedError

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    @property
    def n_params_(self) -> int:
        """Parameters of the deployed student."""
        raise NotImplementedError

    def tensors(self) -> dict[str, np.ndarray]:
        """Everything needed to score new rows, as named arrays (saved with safetensors)."""
        raise NotImplementedError

    def load_tensors(self, tensors: dict[str, np.ndarray], input_shape: tuple[int, ...],
                     num_classes: int) -> "Student":
        """The inverse of :meth:`tensors`: this unfitted student (built from the run's config)
        becomes the fitted one the tensors were saved from, scoring rows shaped
        ``input_shape`` into ``num_classes`` classes. Returns self."""
        raise NotImplementedError

    def deployed_module(self):
        """Torch students: the trained network as a plain ``nn.Module`` on the CPU, input ->
        logits (what ``kdcache export format=onnx`` exports)."""
        raise NotImplementedError

    def to_sklearn(self):
        """scikit-learn students: the trained student as one plain scikit-learn estimator
        (what ``kdcache export format=skops`` saves)."""
        raise NotImplementedError

    def cpu_predict(self) -> Callable[[np.ndarray], object]:
        """``predict(batch)``: the deployed student scoring one batch on the CPU, the call
        :mod:`pipeline.latency` times."""
        return self.decision_function
