"""One generic registry for every kind of pluggable thing (datasets, teachers, students, losses,
augmentations).

The idea is timm's ``register_model`` / ``create_model`` without import-time magic: each module
that defines entries registers them with a decorator on its own registry object, and the
registry is imported explicitly where it is used.

An entry may *declare* what it needs, once, at registration: a registry built with
``Registry(kind, Declaration)`` takes the declaration's fields as keyword arguments of
``register`` and validates them there (an unknown field is an error at import time, not a
silent default). Everything that depends on an entry's needs (which cached arrays a student
reads, whether a run records a temperature, which sweep axes apply) reads
:meth:`Registry.declared` instead of keeping its own list of names.

Entries may also come from outside kdcache: a registry given ``plugins`` (for kdcache's kinds,
a :class:`pipeline.plugins.Plugins`, passed by the module that makes the registry) asks it for
a name it does not hold (an import path ``pkg.module:attr``, an installed entry point of the
kind's group), adapts the object (``adapt``) and registers it under that name on first use.
This module imports no other part of kdcache but its errors: everything else builds on it.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, Protocol, TypeVar

from pipeline.errors import KdError

T = TypeVar("T", bound=Callable)


class PluginSource(Protocol):
    """Where a registry finds the entries it does not hold (see :class:`pipeline.plugins.Plugins`)."""

    def load(self, name: str) -> Any | None:
        """The object ``name`` names, imported; None when ``name`` is no plugin name."""

    def names(self) -> list[str]:
        """The plugin names installed for this kind (entry points)."""

    def identity(self, name: str) -> dict | None:
        """A loaded plugin's identity (its import path, package and version)."""


class Registry(Generic[T]):
    """A named mapping from entry name to factory function, plus what each entry declared.

    >>> losses = Registry("loss", LossNeeds)
    >>> @losses.register("ce", logits=False)
    ... def ce(z_s, y, **_): ...
    >>> losses.get("ce"), losses.declared("ce").logits
    """

    def __init__(self, kind: str, declaration: type | None = None,
                 adapt: Callable[[str, Any], T] | None = None, also: str = "",
                 plugins: PluginSource | None = None):
        self.kind = kind
        self.declaration = declaration  # a frozen dataclass, or None: entries declare nothing
        self.adapt = adapt  # (name, imported plugin object) -> the entry (default: the object)
        self.also = also  # other names the kind takes, for the "unknown" message (e.g. timm:NAME)
        self.plugins = plugins  # None: only entries registered in code (and families)
        self._entries: dict[str, T] = {}
        self._declared: dict[str, Any] = {}
        self._plugins: set[str] = set()  # names loaded as plugins (or from a family)
        self._families: dict[str, tuple[Callable[[str], T], str]] = {}

    def register(self, name: str, **declared: Any) -> Callable[[T], T]:
        if self.declaration is None and declared:
            raise TypeError(f"{self.kind} entries declare nothing; got {sorted(declared)}")
        declaration = self.declaration(**declared) if self.declaration is not None else None

        def add(fn: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            self._declared[name] = declaration
            return fn

        return add

    def unregister(self, name: str) -> None:
        """Remove an entry (plugins and tests that register one for a while)."""
        self.get(name)
        del self._entries[name], self._declared[name]
        self._plugins.discard(name)

    def get(self, name: str) -> T:
        if name not in self._entries:
            self._load_plugin(name)
        try:
            return self._entries[name]
        except KeyError:
            raise KdError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
                + (f" ({self.also + ', ' if self.also else ''}or a plugin: pkg.module:attr)"
                   if self.plugins is not None else "")
            ) from None

    def register_family(self, prefix: str, make: Callable[[str], T], package: str) -> None:
        """Entries named ``PREFIX:ARG``, made on first use by ``make(ARG)`` from the installed
        ``package`` (e.g. ``timm:NAME``: any timm model; the package's version is part of the
        entry's identity)."""
        self._families[prefix] = (make, package)

    def _load_plugin(self, name: str) -> None:
        prefix, sep, arg = name.partition(":")
        if sep and prefix in self._families:
            self.register(name)(self._families[prefix][0](arg))
            self._plugins.add(name)
            return
        obj = self.plugins.load(name) if self.plugins is not None else None
        if obj is None:
            return
        declared = getattr(obj, "kdcache_needs", {})
        entry = self.adapt(name, obj) if self.adapt else obj
        try:
            self.register(name, **declared)(entry)
            self._plugins.add(name)
        except (TypeError, ValueError) as exc:  # a declaration the registry does not take
            raise KdError(f"{self.kind} {name} declares {declared or 'nothing'}, which does not "
                          f"fit a {self.kind} ({exc}); declare its needs with "
                          "@pipeline.plugins.declare(...)") from None

    def forget_plugins(self) -> None:
        """Unregister every entry loaded as a plugin (they load again on their next use)."""
        for name in sorted(self._plugins):
            self.unregister(name)

    def identity(self, name: str) -> dict | None:
        """A plugin entry's identity (:func:`pipeline.plugins.identity`); None for entries
        registered in code (kdcache's own, or a caller's) and for names that are no entry
        (e.g. teacher=onnx, which names a file kind)."""
        if name not in self._entries:
            self._load_plugin(name)
        if name not in self._plugins:
            return None
        prefix = name.partition(":")[0]
        if prefix in self._families:
            import importlib.metadata

            package = self._families[prefix][1]
            return {"name": name, "import": None, "package": package,
                    "version": importlib.metadata.version(package)}
        return self.plugins.identity(name)

    def declared(self, name: str) -> Any:
        """What entry ``name`` declared at registration (an instance of ``declaration``)."""
        self.get(name)
        return self._declared[name]

    def names(self) -> list[str]:
        """Registered names and installed entry points (plugins loaded by import path too)."""
        installed = self.plugins.names() if self.plugins is not None else []
        return sorted(set(self._entries) | set(installed))


    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
