"""The one reader of a resolution setting, for config.json, multidatabackend.json, `sample`, `plan` and the web UI.

Accepted forms (the same everywhere):
  * `HEIGHTxWIDTH` (`"480x832"`: 480 high, 832 wide): a fixed size, used as is;
  * a resolution class: a number or a bucket name (`480`, `"480"`, `"480p"`, `"720p"`): the pixel area of the
    model's 16:9 frame of that height, with the height and width of the training bucket for the source's
    aspect (`longcat_tuner.data.buckets.resolution_size` turns a class into a size).
Every side is a multiple of 16 (VAE 8 x patch 2). Torch-free.
"""
from __future__ import annotations

import re
from typing import Union

# Largest side (or class) accepted: far above any real run (4K is 2160 high), low enough that a typo is refused.
MAX_RESOLUTION = 4096

_PATTERN = re.compile(r"\s*(\d+)\s*(?:[pP]|[xX]\s*(\d+))?\s*")


def parse_resolution(value: Union[int, str]) -> Union[int, tuple[int, int]]:
    """`480`, `"480"` or `"480p"` -> 480 (a class); `"480x832"` -> (480, 832) (height, width).

    Raises `ValueError` naming the problem and a valid example (pydantic validators pass it on as is).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r}: expected a size such as 480x832 or a class such as 480p")
    match = _PATTERN.fullmatch(str(value))
    if not match:
        raise ValueError(f"'{value}' is neither HEIGHTxWIDTH (e.g. 480x832) nor a class such as 480p or 720p")
    if match.group(2) is None:
        resolution = int(match.group(1))
        if resolution < 32:
            raise ValueError(f"{resolution} is too small; use 480 (480p) or 720 (720p)")
        if resolution > MAX_RESOLUTION:
            raise ValueError(f"{resolution} is too large (at most {MAX_RESOLUTION}); use 480 (480p) or 720 (720p)")
        if resolution % 16:
            lower = resolution - resolution % 16
            raise ValueError(f"{resolution} is not a multiple of 16; use {lower} or {lower + 16}")
        return resolution
    height, width = int(match.group(1)), int(match.group(2))
    if height % 16 or width % 16 or not (16 <= height <= MAX_RESOLUTION and 16 <= width <= MAX_RESOLUTION):
        # Both rules at once: `99999x99999` learns the size limit too, not only the divisibility.
        raise ValueError(f"{height}x{width}: height and width must be divisible by 16 and lie in 16..{MAX_RESOLUTION} "
                         "(e.g. 480x832)")
    return height, width


def format_resolution(parsed: Union[int, tuple[int, int]]) -> str:
    """The canonical text of a parsed resolution: `480p` or `480x832`."""
    return f"{parsed[0]}x{parsed[1]}" if isinstance(parsed, tuple) else f"{parsed}p"
