"""Validation: image-to-video samples from the eval split, written as mp4 + contact sheet, with the
first-frame PSNR (catches the guide's "first frame drifts" failure) and a held-out loss at fixed sigmas.

The sampler holds the start frame's latent fixed and denoises only later frames (SPEC section 5);
guidance uses empty negatives unless a negative prompt is given.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from longcat_tuner.config.training import parse_resolution
from longcat_tuner.errors import ConfigError

VALIDATION_FPS = 15  # the base model's frame rate (MODEL.md 5.3)


@dataclasses.dataclass
class ValidationItem:
    """One validation sample: a caption (already encoded) and, for image-to-video, its start frame.

    `start_frame`: pixels `[3,H,W]` in [-1, 1] at the validation size, or None for text-to-video.
    """

    name: str
    prompt: str
    text_embeds: torch.Tensor  # [1, L, C]
    text_mask: torch.Tensor  # [1, L]
    start_frame: Optional[torch.Tensor]
    size: Optional[tuple[int, int]] = None  # (height, width) when there is no start frame


def validation_size(resolution: str, source_hw: tuple[int, int], alignment: int) -> tuple[int, int]:
    """(height, width) for `HEIGHTxWIDTH`, or the data buckets' size for `480p`/`720p` and this start frame."""
    from longcat_tuner.data.buckets import bucket_size

    parsed = parse_resolution(resolution)
    if isinstance(parsed, tuple):
        return parsed
    # Same rule as the training buckets: 480p -> 480x832 for 16:9, 608x640 for a square start frame.
    return bucket_size(int(parsed.removesuffix("p")), source_hw[0], source_hw[1], alignment)


def load_start_frame(path: Path, height: int, width: int) -> torch.Tensor:
    """Read an image, scale it to cover (height, width), center-crop; `[3,H,W]` in [-1, 1]."""
    try:
        image = Image.open(path).convert("RGB")
    except OSError as err:
        raise ConfigError(f"validation start frame {path} cannot be read ({err}); replace or remove it") from None
    scale = max(height / image.height, width / image.width)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    cropped = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(cropped).permute(2, 0, 1).contiguous()


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """`[3,F,H,W]` in [-1,1] -> `[F,H,W,3]` uint8."""
    pixels = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()


def write_mp4(frames: np.ndarray, path: Path, fps: int = VALIDATION_FPS) -> Path:
    """H.264 mp4 via PyAV (yuv420p, playable in browsers)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_contact_sheet(frames: np.ndarray, path: Path, *, columns: int = 8) -> Path:
    """Up to `columns` evenly spaced frames side by side in one PNG."""
    picks = np.unique(np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int))
    sheet = np.concatenate([frames[i] for i in picks], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return path


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (computed on the [0, 1] scale)."""
    mse = float((((a.float() - b.float()) / 2) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


@torch.no_grad()
def sample_item(
    dit: torch.nn.Module,
    vae: Any,
    item: ValidationItem,
    *,
    height: int,
    width: int,
    num_frames: int,
    steps: int,
    guidance: float,
    shift: float,
    negative_embeds: torch.Tensor,
    negative_mask: torch.Tensor,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """Decode one validation video `[3,F,H,W]` in [-1,1]; the start-frame latent stays fixed."""
    from longcat_tuner.diffusion.sampler import sample

    generator = torch.Generator(device="cpu").manual_seed(seed)
    latent_frames = 1 + (num_frames - 1) // 4
    shape = (1, 16, latent_frames, height // 8, width // 8)
    num_cond = 0
    if item.start_frame is not None:
        # Condition latent = a posterior sample of the start frame (official generate_i2v).
        pixels = item.start_frame[None, :, None].to(device)
        cond = vae.encode(pixels, sample=True, generator=generator).float()
        num_cond = cond.shape[2]
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    if num_cond:
        latents[:, :, :num_cond] = cond
    latents = sample(
        dit,
        latents,
        text_embeds=item.text_embeds.to(device),
        text_mask=item.text_mask.to(device),
        negative_embeds=negative_embeds.to(device),
        negative_mask=negative_mask.to(device),
        num_cond_latents=num_cond,
        steps=steps,
        guidance=guidance,
        shift=shift,
    )
    return vae.decode(latents)[0].float().cpu()


def run_validation(
    dit: torch.nn.Module,
    vae: Any,
    items: list[ValidationItem],
    *,
    step: int,
    run_dir: Path,
    num_frames: int,
    steps: int,
    guidance: float,
    shift: float,
    negative_embeds: torch.Tensor,
    negative_mask: torch.Tensor,
    seed: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Sample every item, write mp4 + contact sheet under `validation/step-<step>/`, return event items."""
    out_dir = Path(run_dir) / "validation" / f"step-{step:06d}"
    results = []
    was_training = dit.training
    dit.eval()
    try:
        for index, item in enumerate(items):
            if item.start_frame is not None:
                height, width = item.start_frame.shape[1], item.start_frame.shape[2]
            elif item.size is not None:
                height, width = item.size
            else:
                raise ConfigError(f"validation item {item.name} has no size; give a start frame or HEIGHTxWIDTH")
            video = sample_item(
                dit, vae, item, height=height, width=width, num_frames=num_frames, steps=steps,
                guidance=guidance, shift=shift, negative_embeds=negative_embeds, negative_mask=negative_mask,
                seed=seed + index, device=device,
            )
            frames = to_uint8_frames(video)
            stem = f"{index:02d}-{_safe_name(item.name)}"
            video_path = write_mp4(frames, out_dir / f"{stem}.mp4")
            sheet_path = write_contact_sheet(frames, out_dir / f"{stem}.png")
            first_psnr = psnr(video[:, 0], item.start_frame) if item.start_frame is not None else None
            results.append(
                {
                    "prompt": item.prompt,
                    "video": str(video_path.relative_to(run_dir)),
                    "contact_sheet": str(sheet_path.relative_to(run_dir)),
                    "psnr_first_frame": first_psnr,
                }
            )
    finally:
        dit.train(was_training)
    return results


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return cleaned[:60] or "sample"
