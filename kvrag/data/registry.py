"""The registry of dataset formats: each format's loader, by name.

Loader modules register into it; ``kvrag.data.loaders`` imports them all and reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kvrag.data.schema import Instance

Loader = Callable[[Path], list[Instance]]
LOADERS: dict[str, Loader] = {}


def register_loader(name: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        if name in LOADERS:
            raise ValueError(f"dataset loader {name!r} is already registered")
        LOADERS[name] = fn
        return fn

    return wrap
