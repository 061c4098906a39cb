"""One generic registry for every kind of pluggable thing (datasets, teachers, students, losses).

The idea is timm's ``register_model`` / ``create_model`` without import-time magic: each module
that defines entries registers them with a decorator on its own registry object, and the
registry is imported explicitly where it is used.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from pipeline.errors import KdError

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """A named mapping from entry name to factory function.

    >>> losses = Registry("loss")
    >>> @losses.register("ce")
    ... def ce(...): ...
    >>> losses.get("ce")
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(fn: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KdError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
