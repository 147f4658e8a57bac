"""Lazy package exports: `from pipeline.cache import LogitStore` works without importing every module of it.

A package's `__init__` names its public API; the defining module is imported on first use. Internal code
imports from the defining module, so a DVC stage's code deps stay exactly the files it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """(`__getattr__`, `__all__`) for `package`, whose public names live in the given submodules."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__, sorted(exports)
