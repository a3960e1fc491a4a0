"""Small synthetic media for tests, benchmarks and demos: clips whose frames say which frame they are.

Frame k of a synthetic clip has a uniform grey level that encodes k (`frame_level(k)`), so after a
lossy codec a decoder's output can still be mapped back to the source frame index.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def frame_level(index: int, count: int) -> int:
    """Grey level of frame `index` of `count`: spread over 16..239 so codecs keep them apart."""
    return 16 + round(index * 223 / max(1, count - 1))


def write_video(
    path: str | Path,
    *,
    frames: int,
    fps: float,
    height: int,
    width: int,
    codec: str = "libx264",
    timestamps: Optional[Sequence[float]] = None,
    rotation: int = 0,
) -> Path:
    """Write a clip whose frame k is grey level `frame_level(k, frames)` (a gradient bar keeps aspect visible).

    `timestamps` (seconds) gives a variable frame rate; `rotation` stores a display rotation.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "18"}
        if timestamps is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for k in range(frames):
            image = np.full((height, width, 3), frame_level(k, frames), dtype=np.uint8)
            image[: max(1, height // 8), : max(1, width // 4)] = (255, 0, 0)  # marks the top-left corner
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if timestamps is not None:
                frame.pts = round(timestamps[k] * 1000)
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_image(path: str | Path, *, height: int, width: int, level: int = 128, exif_orientation: int = 1) -> Path:
    """Write a grey image with a red top-left marker; optional EXIF orientation tag (JPEG only)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((height, width, 3), level, dtype=np.uint8)
    array[: max(1, height // 8), : max(1, width // 4)] = (255, 0, 0)
    image = Image.fromarray(array)
    if exif_orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(path, exif=exif)
    else:
        image.save(path)
    return path
