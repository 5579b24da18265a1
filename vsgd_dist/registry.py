"""A name -> component table, one per kind (optimizers, models, engines, schedules).

Each kind's registry lives in the module that owns the kind; adding a component is one
`REGISTRY.register(name, entry)` next to its code. Config validation, `did you mean`
suggestions and error messages read the names from here, never from a list kept elsewhere.
"""
from __future__ import annotations

import difflib
import importlib
import os
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")

PLUGINS_ENV = "VSGD_DIST_PLUGINS"
"""Comma-separated modules to import before recipes are read: components registered outside
this package (an optimizer or model of your own). Rank processes and SLURM jobs inherit it."""


def import_plugins() -> None:
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        importlib.import_module(name)


def class_path(cls: type) -> str:
    """A class's import path, "module.QualName": how checkpoints record the optimizer class
    and how messages name a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


class UnknownName(ValueError):
    """A name no component of this kind is registered under; the message lists the choices."""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownName(f"{self.kind} {name!r} is not one of {', '.join(self)}{suggest(name, self)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        """Names in sorted order: messages must not depend on which module imported first."""
        return iter(sorted(self._entries))

    def items(self):
        return self._entries.items()


def suggest(word: str, options) -> str:
    """'; did you mean X?' for the closest option (whole name, then its last dotted part)."""
    options = list(options)
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.5)
    if not close:
        leaf = {o.rsplit(".", 1)[-1]: o for o in options}
        close = [leaf[m] for m in difflib.get_close_matches(str(word), list(leaf), n=1, cutoff=0.6)]
    return f"; did you mean {close[0]!r}?" if close else ""
