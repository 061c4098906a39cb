"""Students (a registry). Every student follows the student contract (:mod:`.base`): a
scikit-learn estimator trained from an opened cache through ``fit_cache(data)``.

Two kinds:
- *feature* students are scikit-learn linear models on the cached teacher features: they never
  see the inputs (:mod:`.features`);
- *input* students are trained on the original inputs against the cached teacher targets:
  small PyTorch networks with a loss from :mod:`pipeline.losses` (:mod:`.networks`), and, for
  text, scikit-learn linear models on TF-IDF or hashed words and small torch networks on hashed
  n-gram ids (:mod:`.text`), and for token caches a small causal LM (:mod:`.lm`). Each declares
  the inputs it reads (``modality``: arrays, text or tokens).

The student modules are imported here, explicitly, so that ``STUDENTS`` is complete once this
package is.
"""

from pipeline.students.base import Student
from pipeline.students.data import StudentData
from pipeline.students.registry import (STUDENTS, StudentNeeds, Uses, check_modality, complete,
                                        create_student, hyperparameters, not_applicable, run_loss,
                                        saved_config, student_config, student_params, uses)
from pipeline.students import features, lm, networks, text  # noqa: F401,E402  (registration)
from pipeline.students.features import (C_GRID, FeatureStudent, SoftLogRegStudent,
                                        StreamingSGDStudent)
from pipeline.students.lm import LMStudent
from pipeline.students.networks import TorchStudent
from pipeline.students.text import TextNetStudent, TfidfStudent

__all__ = ["C_GRID", "STUDENTS", "FeatureStudent", "LMStudent", "SoftLogRegStudent", "StreamingSGDStudent",
           "Student", "StudentData", "StudentNeeds", "TextNetStudent", "TfidfStudent",
           "TorchStudent", "Uses", "check_modality", "complete", "create_student",
           "hyperparameters", "not_applicable", "run_loss", "saved_config", "student_config",
           "student_params", "uses"]
