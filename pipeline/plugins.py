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
and is recorded in every saved config (``plugins``, by :mod:`pipeline.provenance`), so a cache
or run says exactly which code made it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from typing import Any, Callable

from pipeline.errors import KdError, first_line

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


class Plugins:
    """The plugins of one kind, as its :class:`pipeline.registry.Registry` asks for them: the
    module that makes a registry passes ``plugins=Plugins(kind)``, so that the registry (below
    every kind) never imports the kinds' plugin groups."""

    def __init__(self, kind: str):
        if kind not in GROUPS:
            raise ValueError(f"no plugin group for {kind!r}; groups: {', '.join(GROUPS)}")
        self.kind = kind

    def load(self, name: str) -> Any | None:
        return resolve(self.kind, name)

    def names(self) -> list[str]:
        return sorted(entry_points(self.kind))

    def identity(self, name: str) -> dict | None:
        return identity(self.kind, name)


def call(what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` for code kdcache did not write: its own exceptions become one
    line naming ``what`` (e.g. ``teacher pkg:f: factory((1, 8, 8), 3)``), kdcache's errors
    pass through."""
    try:
        return fn(*args, **kwargs)
    except KdError:
        raise
    except Exception as exc:
        first = first_line(exc)
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
    attr = attr.split("[")[0].strip()  # (an entry point may name extras: "mod:obj [extra]")
    where = f"{kind} {name}" + (f" (entry point {ep.group}:{ep.name} = {ep.value})" if ep else "")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise KdError(f"{where}: no module named {exc.name!r}; put its directory on PYTHONPATH "
                          "or install its package") from None
        raise KdError(f"{where}: importing {module_name} failed (ModuleNotFoundError: {exc}); "
                      "install what it imports") from None
    except Exception as exc:
        first = first_line(exc)
        raise KdError(f"{where}: importing {module_name} raised {type(exc).__name__}: {first}; "
                      "fix the module (run `python -c 'import "
                      f"{module_name}'` to see the traceback)") from None
    obj = module
    for part in attr.split("."):  # "mod:Class.factory" names an attribute of an attribute
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise KdError(f"{where}: module {module_name} has no {attr!r}") from None
    return obj


def identity(kind: str, name: str) -> dict | None:
    """``{"name", "import", "package", "version"}`` of a plugin name: the installed distribution
    that holds its module and that distribution's version; for a module that is no
    distribution's (on PYTHONPATH), its ``__version__`` if it has one and the sha256 of its
    source file (``source_sha256``), so that editing it is a new identity. None for anything
    that is no plugin (built-in names)."""
    ep = entry_points(kind).get(name)
    target = ep.value if ep is not None else name if is_import_path(name) else None
    if target is None:
        return None
    module_name = target.partition(":")[0].strip()
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    dist = ep.dist if ep is not None and ep.dist is not None else _distribution_of(module)
    out = {"name": name, "import": target, "package": None, "version": None}
    if dist is not None:
        out.update(package=dist.metadata["Name"], version=dist.version)
        return out
    out["version"] = getattr(sys.modules.get(module_name.split(".")[0]), "__version__", None)
    source = getattr(module, "__file__", None)
    if source:
        import hashlib
        from pathlib import Path

        out["source_sha256"] = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    return out


def _distribution_of(module) -> importlib.metadata.Distribution | None:
    """The installed distribution whose files include ``module``'s file (not merely one that
    ships a top-level package of the same name)."""
    from pathlib import Path

    source = getattr(module, "__file__", None)
    if not source:
        return None
    source = Path(source).resolve()
    top = module.__name__.split(".")[0]
    for dist_name in importlib.metadata.packages_distributions().get(top, []):
        dist = importlib.metadata.distribution(dist_name)
        if any(Path(dist.locate_file(f)).resolve() == source for f in dist.files or ()):
            return dist
    return None
