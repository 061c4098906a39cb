"""Students (a registry). Every student follows scikit-learn's estimator contract: the
constructor only stores parameters, ``fit`` returns self, learned attributes end in ``_``, and
``predict`` / ``decision_function`` / ``predict_proba`` score new rows.

Two kinds:
- *feature* students (``kind = "features"``) are scikit-learn linear models on the cached
  teacher features: they never see the inputs;
- *input* students (``kind = "inputs"``) are small PyTorch networks trained on the original
  inputs against the cached teacher logits, with a loss from :mod:`pipeline.losses`.
"""

from pipeline.students.features import (FeatureStudent, SoftLogRegStudent, StreamingSGDStudent)
from pipeline.students.networks import STUDENT_WIDTHS, TorchStudent
from pipeline.students.registry import STUDENTS, create_student

__all__ = ["STUDENTS", "create_student", "FeatureStudent", "SoftLogRegStudent",
           "StreamingSGDStudent", "TorchStudent", "STUDENT_WIDTHS"]
