"""Argument types for the commands' own flags (config keys get theirs from the schema)."""
from __future__ import annotations

import argparse
import errno
import math
import os
from typing import Callable, Optional, Union

from longcat_tuner.errors import ConfigError


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


def path_too_long(text: Union[str, "os.PathLike[str]"]) -> Optional[str]:
    """Why the file system cannot take `text` as a path (a name in it longer than the file system allows, or the
    whole path over PATH_MAX), or None. Asked of the file system itself (`lstat` answers ENAMETOOLONG)."""
    text = os.fspath(text)
    try:
        os.lstat(text)
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            longest = max((len(part.encode()) for part in text.split(os.sep)), default=0)
            return (f"{shown_path(text)} is too long for the file system (a name of {longest} bytes in a path of "
                    f"{len(text.encode())}; names are at most 255 bytes on most file systems); give a shorter one")
    except (ValueError, TypeError):  # a NUL byte: not ours to judge here
        return None
    return None


def refuse_long_path(flag: str, value: Union[str, "os.PathLike[str]", None]) -> None:
    """A `ConfigError` naming `flag` (exit 2, one line) for a path the file system refuses as too long, instead
    of the `OSError: [Errno 36] File name too long` traceback of the first `exists()` on it."""
    if value is None:
        return
    problem = path_too_long(value)
    if problem:
        raise ConfigError(f"{flag} {problem}")
