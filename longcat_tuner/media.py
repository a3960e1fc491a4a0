"""Small media helpers shared by sampling, validation and the data pipeline: sizes, images, mp4 output.

Resolution rule: `HxW` is explicit (480x832 = 480 high, 832 wide). A bucket name (`480p`, `720p`) or a bare
number (480) means the pixel area of the official landscape size of that class (480x832, 720x1280), with
height and width on the `alignment` grid and the aspect ratio closest to the source's; ties go to the
area closest to the target.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from longcat_tuner.errors import DataError, ShapeError


def parse_resolution(
    spec: str, source_hw: Optional[tuple[int, int]] = None, alignment: int = 64
) -> tuple[int, int]:
    """`"480x832"` -> (480, 832); a bucket name (`480p`, `720p`) -> the training bucket for a source of
    `source_hw` (height, width; default 16:9) on the `alignment` grid, so sampling, validation and training agree."""
    from longcat_tuner.config.training import parse_resolution as parse_spec
    from longcat_tuner.data.buckets import bucket_size

    try:
        parsed = parse_spec(str(spec).strip())
    except ValueError as err:
        raise ShapeError(f"resolution {err}") from None
    if isinstance(parsed, tuple):
        return parsed
    height, width = source_hw or (9, 16)
    return bucket_size(int(parsed.removesuffix("p")), height, width, alignment)


def to_rgb(image):
    """Any PIL image as 8-bit RGB, the same way for training start frames and for sampling.

    Transparent pixels become white (not whatever colour the alpha hid); 16-bit and float grey images are
    scaled to 8 bits (Pillow's own conversion clips them at 255, turning most of the picture white).
    """
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        # Integers are taken as 16-bit (0..65535) unless they all fit in 8 bits; floats as 0..1 when they
        # lie there, else stretched between their min and max.
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            low, high = (0.0, 1.0) if values.min() >= 0 and values.max() <= 1 else (values.min(), values.max())
        else:
            low, high = 0.0, (255.0 if values.max() <= 255 else 65535.0)
        grey = np.clip((values - low) / max(high - low, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")  # L, CMYK, YCbCr, 1, ...


def load_image(path: Union[str, Path]):
    """An RGB PIL image with its EXIF orientation applied (`to_rgb`); opened by the one safe opener
    (`longcat_tuner.data.images.open_image`: unreadable files and decompression bombs are a named `DataError`)."""
    from PIL import ImageOps

    from longcat_tuner.data.images import open_image

    try:
        with open_image(path) as image:
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # truncated or corrupt pixel data
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


def load_start_frame(path: Union[str, Path], height: int, width: int) -> torch.Tensor:
    """A start frame as the model gets it: EXIF-rotated, resized to cover, center-cropped, `[3, H, W]` in [-1, 1]."""
    return image_to_tensor(resize_and_crop(load_image(path), height, width))


def image_to_tensor(image) -> torch.Tensor:
    """PIL RGB -> float tensor `[3, H, W]` in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def video_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """`[3, F, H, W]` in [-1, 1] -> `[F, H, W, 3]` uint8."""
    frames = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def write_mp4(path: Union[str, Path], frames: np.ndarray, fps: int = 15, crf: int = 18) -> Path:
    """Write `[F, H, W, 3]` uint8 frames as H.264 (yuv420p) with PyAV; written to a temp name, renamed when complete."""
    import av

    from longcat_tuner.fsutil import atomic_file

    path = Path(path)
    # A failed or interrupted write leaves no partial file (the suffix keeps the container format).
    with atomic_file(path, suffix=".partial" + path.suffix) as tmp, av.open(str(tmp), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_contact_sheet(frames: np.ndarray, path: Union[str, Path], *, columns: int = 8) -> Path:
    """Up to `columns` evenly spaced frames of `[F, H, W, 3]` uint8 side by side in one PNG."""
    from PIL import Image

    picks = np.unique(np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([frames[i] for i in picks], axis=1)).save(path)
    return path


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
