"""Name -> plug-in registries with typed configurations.

Every pluggable family (datasets, models, partitioners, methods, criteria, codecs) is a
:class:`Registry`. A plug-in registers under a name, optionally with its own frozen config
dataclass; an unknown name raises :class:`~sparsefl.errors.ConfigError` listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sparsefl.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered plug-in: the object itself, its config class and a one-line summary."""

    name: str
    obj: T
    config_cls: type | None
    summary: str


class Registry(Generic[T]):
    """A named collection of plug-ins of one kind.

    Parameters
    ----------
    kind:
        What the entries are, in words, and the config key that selects them
        (used in error messages), e.g. ``Registry("method", key="method.name")``.
    """

    def __init__(self, kind: str, key: str | None = None) -> None:
        self.kind = kind
        self.key = key or f"{kind}.name"
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, config_cls: type | None = None, summary: str | None = None) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; the summary defaults to its docstring's first line."""

        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            doc = summary or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            self._entries[name] = Entry(name, obj, config_cls, doc)
            return obj

        return deco

    def entry(self, name: str) -> Entry[T]:
        """The entry for ``name``; an unknown name raises ConfigError listing the valid ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(self.key, name, "one of: " + ", ".join(self.names())) from None

    def get(self, name: str) -> T:
        """The registered object for ``name``."""
        return self.entry(name).obj

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)


# The project's registries. They live on the ground floor so that config validation can consult
# them without importing upward; the plug-in modules fill them when sparsefl is imported.
DATASETS: Registry[Any] = Registry("dataset", key="data.name")
PARTITIONERS: Registry[Any] = Registry("partitioner", key="data.partition")
MODELS: Registry[Any] = Registry("model", key="model.name")
METHODS: Registry[Any] = Registry("method", key="method.name")
CRITERIA: Registry[Any] = Registry("pruning criterion", key="method.criterion")
CODECS: Registry[Any] = Registry("codec", key="comm.up")
