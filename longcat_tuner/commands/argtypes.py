"""Argument types for the commands' own flags (config keys get theirs from the schema)."""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Optional, Union

from longcat_tuner.errors import ConfigError
from longcat_tuner.fsutil import path_too_long


def bounded_int(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An `type=` for a whole number in low..high (no upper bound when `high` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{value} is outside {low}..{high}" if high is not None else f"{value} is below {low}"
            )
        return value

    return parse


def positive_float(text: str) -> float:
    """A finite number > 0 (e.g. GiB)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (e.g. a LoRA strength, which may be negative)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def shown_path(text: str, limit: int = 80) -> str:
    """`text`, its middle elided when longer than `limit` (a 300-character name stays one readable line)."""
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-(limit // 2 - 3):]}"


def refuse_long_path(flag: str, value: Union[str, "os.PathLike[str]", None]) -> None:
    """A `ConfigError` naming `flag` (exit 2, one line) for a path the file system refuses as too long, instead
    of the `OSError: [Errno 36] File name too long` traceback of the first `exists()` on it."""
    if value is None:
        return
    problem = path_too_long(value)
    if problem:
        raise ConfigError(f"{flag} {shown_path(os.fspath(value))} is too long for the file system: {problem}; "
                          "give a shorter one")
