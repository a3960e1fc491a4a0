"""Small media helpers shared by sampling, validation and the data pipeline: sizes, images, mp4 output.

Resolution rule: `HxW` is explicit (480x832 = 480 high, 832 wide). A bucket name (`480p`, `720p`) or a bare
number (480) means the pixel area of the official landscape size of that class (480x832, 720x1280), with
height and width on the `alignment` grid and the aspect ratio closest to the source's; ties go to the
area closest to the target.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from longcat_tuner.errors import DataError, ShapeError

BUCKET_AREAS = {480: 480 * 832, 540: 544 * 960, 720: 720 * 1280}


def bucket_size(base: int, aspect: float, alignment: int = 16) -> tuple[int, int]:
    """(H, W) on the alignment grid with area near the class's area and aspect (W/H) closest to `aspect`."""
    if alignment % 16:
        raise ShapeError(f"aspect_bucket_alignment {alignment} must be a multiple of 16")
    area = BUCKET_AREAS.get(base, base * base * 16 / 9)
    best = None
    for h in range(alignment, int(math.sqrt(area * 4)) + alignment, alignment):
        w = max(alignment, round(area / h / alignment) * alignment)
        key = (abs(math.log((w / h) / aspect)), abs(h * w - area))
        if best is None or key < best[0]:
            best = (key, (h, w))
    return best[1]


def parse_resolution(spec: Union[str, int], aspect: Optional[float] = None, alignment: int = 16) -> tuple[int, int]:
    """`"480x832"` -> (480, 832); `"480p"`, `"480"` or 480 -> the bucket for `aspect` (default 832/480)."""
    text = str(spec).strip().lower()
    match = re.fullmatch(r"(\d+)\s*[x*]\s*(\d+)", text)
    if match:
        h, w = int(match[1]), int(match[2])
        if h % 16 or w % 16:
            raise ShapeError(
                f"resolution {h}x{w}: height and width must be divisible by 16, e.g. {h // 16 * 16}x{w // 16 * 16}"
            )
        return h, w
    match = re.fullmatch(r"(\d+)p?", text)
    if not match:
        raise ShapeError(f"resolution '{spec}' is neither HEIGHTxWIDTH (e.g. 480x832) nor a bucket name (480p, 720p)")
    return bucket_size(int(match[1]), aspect if aspect else 832 / 480, alignment)


def load_image(path: Union[str, Path]):
    """An RGB PIL image with its EXIF orientation applied."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


def resize_and_crop(image, height: int, width: int, *, crop: str = "center", rng: Optional[np.random.Generator] = None):
    """Aspect-preserving resize to cover (height, width), then a center or random crop (PIL in, PIL out)."""
    from PIL import Image

    scale = max(height / image.height, width / image.width)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0)
    if crop == "random" and rng is not None:
        left, top = int(rng.integers(0, new_w - width + 1)), int(rng.integers(0, new_h - height + 1))
    else:
        left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def image_to_tensor(image) -> torch.Tensor:
    """PIL RGB -> float tensor `[3, H, W]` in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def video_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """`[3, F, H, W]` in [-1, 1] -> `[F, H, W, 3]` uint8."""
    frames = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def write_mp4(path: Union[str, Path], frames: np.ndarray, fps: int = 15, crf: int = 18) -> Path:
    """Write `[F, H, W, 3]` uint8 frames as H.264 (yuv420p) with PyAV; written to a temp name, then renamed."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return path


def contact_sheet(frames: np.ndarray, columns: int = 4, max_frames: int = 8):
    """A PIL image tiling up to `max_frames` evenly spaced frames of `[F, H, W, 3]` uint8."""
    from PIL import Image

    count = min(max_frames, len(frames))
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    rows = math.ceil(count / columns)
    h, w = frames.shape[1:3]
    sheet = Image.new("RGB", (min(columns, count) * w, rows * h))
    for slot, index in enumerate(picks):
        sheet.paste(Image.fromarray(frames[index]), ((slot % columns) * w, (slot // columns) * h))
    return sheet


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def frame_count_ok(frames: int) -> bool:
    return frames >= 1 and (frames - 1) % 4 == 0


def check_frames(frames: int, what: str = "--frames") -> None:
    if not frame_count_ok(frames):
        down = max(1, frames - (frames - 1) % 4)
        raise ShapeError(f"{what} {frames}: the VAE needs (frames - 1) % 4 == 0, e.g. {down} or {down + 4}")


__all__: Sequence[str] = [
    "bucket_size", "parse_resolution", "load_image", "resize_and_crop", "image_to_tensor", "video_to_uint8",
    "write_mp4", "contact_sheet", "psnr", "check_frames",
]
