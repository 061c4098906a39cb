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

Entries may also come from outside kdcache (:mod:`pipeline.plugins`): a name that is not
registered but is an import path ``pkg.module:attr`` or an installed entry point of the kind's
group is imported on first use, adapted (``adapt``), and registered under that name.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from pipeline.errors import KdError

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """A named mapping from entry name to factory function, plus what each entry declared.

    >>> losses = Registry("loss", LossNeeds)
    >>> @losses.register("ce", logits=False)
    ... def ce(z_s, y, **_): ...
    >>> losses.get("ce"), losses.declared("ce").logits
    """

    def __init__(self, kind: str, declaration: type | None = None,
                 adapt: Callable[[str, Any], T] | None = None, also: str = ""):
        self.kind = kind
        self.declaration = declaration  # a frozen dataclass, or None: entries declare nothing
        self.adapt = adapt  # (name, imported plugin object) -> the entry (default: the object)
        self.also = also  # other names the kind takes, for the "unknown" message (e.g. timm:NAME)
        self._entries: dict[str, T] = {}
        self._declared: dict[str, Any] = {}
        self._plugins: set[str] = set()  # names loaded through pipeline.plugins
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
        from pipeline import plugins

        if name not in self._entries:
            self._load_plugin(name)
        try:
            return self._entries[name]
        except KeyError:
            raise KdError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
                + (f" ({self.also + ', ' if self.also else ''}or a plugin: pkg.module:attr)"
                   if self.kind in plugins.GROUPS else "")
            ) from None

    def register_family(self, prefix: str, make: Callable[[str], T], package: str) -> None:
        """Entries named ``PREFIX:ARG``, made on first use by ``make(ARG)`` from the installed
        ``package`` (e.g. ``timm:NAME``: any timm model; the package's version is part of the
        entry's identity)."""
        self._families[prefix] = (make, package)

    def _load_plugin(self, name: str) -> None:
        from pipeline import plugins

        prefix, sep, arg = name.partition(":")
        if sep and prefix in self._families:
            self.register(name)(self._families[prefix][0](arg))
            self._plugins.add(name)
            return
        obj = plugins.resolve(self.kind, name)
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
        registered in code (kdcache's own, or a caller's)."""
        from pipeline import plugins

        if name not in self._entries:
            loadable = (name.partition(":")[0] in self._families or plugins.is_import_path(name)
                        or name in plugins.entry_points(self.kind))
            if not loadable:  # not a plugin name (e.g. teacher=onnx, which names a file kind)
                return None
            self.get(name)
        if name not in self._plugins:
            return None
        prefix = name.partition(":")[0]
        if prefix in self._families:
            import importlib.metadata

            package = self._families[prefix][1]
            return {"name": name, "import": None, "package": package,
                    "version": importlib.metadata.version(package)}
        return plugins.identity(self.kind, name)

    def declared(self, name: str) -> Any:
        """What entry ``name`` declared at registration (an instance of ``declaration``)."""
        self.get(name)
        return self._declared[name]

    def names(self) -> list[str]:
        """Registered names and installed entry points (plugins loaded by import path too)."""
        from pipeline import plugins

        return sorted(set(self._entries) | set(plugins.entry_points(self.kind)))


    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
