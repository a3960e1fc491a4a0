"""Argument types for the commands' own flags (config keys get theirs from the schema)."""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional


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
