"""What made an artifact: the resolved config saved beside every teacher checkpoint, cache and
student run, with the identities of the plugins it names (their import paths, packages and
versions), so that any result can be traced back to exactly the code and settings behind it.

Above the registries: it asks each kind's registry (datasets, teachers, students, losses) for
the identity of the entry a config names.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pipeline.config import to_dict
from pipeline.data import DATASETS, split_spec
from pipeline.losses import LOSSES
from pipeline.storage import location, write_text
from pipeline.teachers import TEACHERS


def identities(cfg: Any) -> dict[str, dict]:
    """The identities of the plugins a config names (its teacher, dataset, model, loss, and a
    sweep's grid of models and losses), by config key; {} when it names none."""
    from pipeline.students import STUDENTS  # imports scikit-learn: only for configs that save here

    names = {"teacher": (TEACHERS, [getattr(cfg, "teacher", None)]),
             "dataset": (DATASETS, [split_spec(cfg.dataset)[0]] if getattr(cfg, "dataset", None) else []),
             "model": (STUDENTS, [getattr(cfg, "model", None), *dict(getattr(cfg, "grid", ())).get("model", ())]),
             "loss": (LOSSES, [getattr(cfg, "loss", None), *dict(getattr(cfg, "grid", ())).get("loss", ())])}
    found = {}
    for key, (registry, values) in names.items():
        for value in values:
            identity = registry.identity(value) if value and value != "auto" else None
            if identity:  # (None: a built-in)
                found[f"{key}={value}"] = identity
    return found


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON beside an artifact (atomically; on an object store,
    one PUT), with the identities of the plugins it names (``plugins``)."""
    payload = {"kind": type(cfg).__name__, "config": to_dict(cfg)}
    plugins = identities(cfg)
    if plugins:  # the code outside kdcache that the config names, and its version
        payload["plugins"] = plugins
    write_text(location(path), json.dumps(payload, indent=2, sort_keys=True) + "\n")
