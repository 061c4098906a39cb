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

    def __init__(self, kind: str, declaration: type | None = None):
        self.kind = kind
        self.declaration = declaration  # a frozen dataclass, or None: entries declare nothing
        self._entries: dict[str, T] = {}
        self._declared: dict[str, Any] = {}

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

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KdError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
            ) from None

    def declared(self, name: str) -> Any:
        """What entry ``name`` declared at registration (an instance of ``declaration``)."""
        self.get(name)
        return self._declared[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
