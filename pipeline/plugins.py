"""Plugins: teachers, datasets, students and losses that live outside kdcache.

Two ways to name one, wherever a registry name goes (``teacher=``, ``dataset=``, ``model=``,
``loss=``, ``models=``, ``losses=``):

- an **import path** ``pkg.module:attr``, importable from ``PYTHONPATH`` or an installed
  package (``dataset=pkg.module:function:ARG`` passes ARG on);
- an **entry-point name**: an installed package declares, in its ``pyproject.toml``,

  .. code-block:: toml

      [project.entry-points."kdcache.teachers"]
      tiny = "mypkg.models:tiny"

  and ``teacher=tiny`` finds it (groups ``kdcache.teachers``, ``kdcache.datasets``,
  ``kdcache.students``, ``kdcache.losses``).

What each kind of object is:

- a teacher: ``factory(input_shape, num_classes) -> torch.nn.Module``;
- a dataset: ``source(arg, cfg) -> pipeline.data.Dataset`` (``arg``: the text after its name);
- a student: a :class:`pipeline.students.Student` subclass (built with the config values its
  constructor names) or a ``factory(cfg) -> Student``;
- a loss: ``loss(z_s, y, *, z_t, T, ..., **_)`` like the built-in ones.

Students and losses declare what they need with :func:`declare`, the same fields their
registries take (``StudentNeeds``, ``LossNeeds``). A plugin's identity, its import path and its
package's name and version, enters the fingerprints of the teachers and datasets made from it
and is recorded in every saved config (``plugins``), so a cache or run says exactly which code
made it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from typing import Any, Callable

from pipeline.errors import KdError

IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
GROUPS = {"teacher": "kdcache.teachers", "dataset": "kdcache.datasets",
          "student": "kdcache.students", "loss": "kdcache.losses"}


def declare(**needs: Any) -> Callable:
    """Declare a plugin's needs, e.g. ``@declare(kind="inputs", loss=True)`` on a student or
    ``@declare(logits=True, temperature=True)`` on a loss (the fields of the registry's
    declaration)."""
    def mark(obj):
        obj.kdcache_needs = dict(needs)
        return obj
    return mark


def identities(cfg: Any) -> dict[str, dict]:
    """The identities of the plugins a config names (its teacher, dataset, model, loss, and a
    sweep's models and losses), by config key; {} when it names none."""
    from pipeline.data import DATASETS, split_spec
    from pipeline.losses import LOSSES
    from pipeline.students import STUDENTS
    from pipeline.teachers import TEACHERS

    names = {"teacher": (TEACHERS, [getattr(cfg, "teacher", None)]),
             "dataset": (DATASETS, [split_spec(cfg.dataset)[0]] if getattr(cfg, "dataset", None) else []),
             "model": (STUDENTS, [getattr(cfg, "model", None), *getattr(cfg, "models", ())]),
             "loss": (LOSSES, [getattr(cfg, "loss", None), *getattr(cfg, "losses", ())])}
    found = {}
    for key, (registry, values) in names.items():
        for value in values:
            identity = registry.identity(value) if value and value != "auto" else None
            if identity:  # (None: a built-in)
                found[f"{key}={value}"] = identity
    return found


def call(what: str, fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` for a plugin's code: its own exceptions become one line naming ``what``
    (e.g. ``teacher pkg:f: factory((1, 8, 8), 3)``), kdcache's errors pass through."""
    try:
        return fn(*args)
    except KdError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise KdError(f"{what} raised {type(exc).__name__}: {first}") from None


def is_import_path(name: str) -> bool:
    return bool(IMPORT_PATH.fullmatch(name))


def entry_points(kind: str) -> dict[str, importlib.metadata.EntryPoint]:
    """The entry points installed packages declare for ``kind``, by name."""
    group = GROUPS.get(kind)
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=group)} if group else {}


def resolve(kind: str, name: str) -> Any | None:
    """The object ``name`` refers to (an entry point of ``kind``'s group, or an import path),
    imported; None when ``name`` is neither. Import failures are one-line errors."""
    ep = entry_points(kind).get(name)
    target = ep.value if ep is not None else name if is_import_path(name) else None
    if target is None:
        return None
    module_name, _, attr = target.partition(":")
    where = f"{kind} {name}" + (f" (entry point {ep.group}:{ep.name} = {ep.value})" if ep else "")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise KdError(f"{where}: no module named {exc.name!r}; put its directory on PYTHONPATH "
                          "or install its package") from None
        raise KdError(f"{where}: importing {module_name} failed (ModuleNotFoundError: {exc}); "
                      "install what it imports") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise KdError(f"{where}: importing {module_name} raised {type(exc).__name__}: {first}; "
                      "fix the module (run `python -c 'import "
                      f"{module_name}'` to see the traceback)") from None
    try:
        return getattr(module, attr.strip())
    except AttributeError:
        raise KdError(f"{where}: module {module_name} has no {attr!r}") from None


def identity(kind: str, name: str) -> dict | None:
    """``{"name", "import", "package", "version"}`` of a plugin name (package and version when
    it comes from an installed distribution); None for anything else (built-in names)."""
    ep = entry_points(kind).get(name)
    target = ep.value if ep is not None else name if is_import_path(name) else None
    if target is None:
        return None
    top = target.partition(":")[0].split(".")[0]
    package, version = None, None
    distributions = importlib.metadata.packages_distributions().get(top) or []
    if distributions:
        package = distributions[0]
        version = importlib.metadata.version(package)
    elif top in sys.modules:  # a module on PYTHONPATH may still say its version
        version = getattr(sys.modules[top], "__version__", None)
    return {"name": name, "import": target, "package": package, "version": version}
