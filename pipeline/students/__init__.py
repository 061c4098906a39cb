"""Students (a registry). Every student follows the student contract (:mod:`.base`): a
scikit-learn estimator trained from an opened cache through ``fit_cache(data)``.

Two kinds:
- *feature* students are scikit-learn linear models on the cached teacher features: they never
  see the inputs (:mod:`.features`);
- *input* students are small PyTorch networks trained on the original inputs against the cached
  teacher targets, with a loss from :mod:`pipeline.losses` (:mod:`.networks`).

The student modules are imported here, explicitly, so that ``STUDENTS`` is complete once this
package is.
"""

from pipeline.students.base import Student
from pipeline.students.data import StudentData
from pipeline.students.registry import (STUDENTS, StudentNeeds, Uses, complete, create_student,
                                        hyperparameters, not_applicable, run_loss, saved_config,
                                        student_config, student_params, uses)
from pipeline.students import features, networks  # noqa: F401,E402  (registration)
from pipeline.students.features import (C_GRID, FeatureStudent, SoftLogRegStudent,
                                        StreamingSGDStudent)
from pipeline.students.networks import TorchStudent

__all__ = ["C_GRID", "STUDENTS", "FeatureStudent", "SoftLogRegStudent",
           "StreamingSGDStudent", "Student", "StudentData", "StudentNeeds", "TorchStudent", "Uses",
           "complete", "create_student", "hyperparameters", "not_applicable", "run_loss", "saved_config", "student_config",
           "student_params", "uses"]
