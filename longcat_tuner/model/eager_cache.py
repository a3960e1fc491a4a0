"""`eager_cache`: an `lru_cache` for the model's constant tables that torch.compile can trace.

Dynamo does not use a `functools.lru_cache` it meets inside a compiled region: it traces the wrapped function and
warns ("Dynamo detected a call to a `functools.lru_cache`-wrapped function"), once per compiled run. Functions
decorated here are cached when called eagerly and traced as plain code under torch.compile, without the warning.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def eager_cache(maxsize: int) -> Callable[[F], F]:
    """`functools.lru_cache(maxsize)` in eager mode; under torch.compile the function itself runs (traced)."""
    def decorate(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return fn(*args, **kwargs) if torch.compiler.is_compiling() else cached(*args, **kwargs)

        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        call.cache_info = cached.cache_info  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return decorate
