"""The student registry: name → factory(params) → an unfitted estimator."""

from __future__ import annotations

from typing import Any, Callable

from pipeline.registry import Registry

STUDENTS: Registry[Callable[..., Any]] = Registry("student")


def create_student(name: str, **params: Any):
    return STUDENTS.get(name)(**params)
