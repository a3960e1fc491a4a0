"""Tensor-side media helpers for sampling and validation: image and video tensors, mp4 and contact-sheet output,
PSNR, frame-count check.

Reading and preparing images (EXIF, RGB, the one start-frame preparation) lives in `longcat_tuner.data.images`
and sizes in `longcat_tuner.config.resolution` / `longcat_tuner.data.buckets`, all torch-free; this module
imports them, never the other way round.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Union

import numpy as np
import torch

from longcat_tuner.config.sampling import causal_frame_count_error
from longcat_tuner.errors import ShapeError


def image_to_tensor(image) -> torch.Tensor:
    """RGB uint8 (PIL or `[H, W, 3]` array) -> float tensor `[3, H, W]` in [-1, 1]."""
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


def check_frames(frames: int, what: str = "--frames") -> None:
    """`ShapeError` unless `frames` fits the causal VAE (the schema's rule, `config.sampling`)."""
    problem = causal_frame_count_error(frames)
    if problem:
        raise ShapeError(f"{what}: {problem}")
