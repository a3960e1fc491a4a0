"""Lazy package attributes: `from package import Name` imports the module that defines `Name` on first use.

Packages whose light parts (`check`, the config schema, the web server) must not import torch declare
their public names as `{name: module}` and get a module `__getattr__` from `lazy_getattr`.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package` resolving each name of `exports` in its module."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
