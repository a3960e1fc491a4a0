"""Validation: image-to-video samples from the eval split, written as mp4 + contact sheet, with the
early-frame drift metric and a held-out loss at fixed sigmas.

The sampler holds the start frame's latent fixed and denoises only later frames (SPEC section 5);
guidance uses empty negatives unless a negative prompt is given.

Early-frame drift (`early_frame_psnr`): the PSNR of the first generated frames after the condition frame
(decoded frames 1..EARLY_DRIFT_FRAMES) against the start frame. It falls when a LoRA makes the video jump away
from the start frame (the guide's "first frame drifts"). Decoded frame 0 itself is no measure of that: its
latent is the encoded start frame, held fixed by the sampler, so frame 0 is the VAE round trip of the start
frame whatever the model does (`psnr_first_frame`, kept for older readers, only says the VAE works).

Progress: `progress(index, count)` gives each video a `SamplingProgress` (events per denoising step, the
decode, a console bar) that may stop the validation at a step boundary: `ValidationStopped` then carries
the videos finished before it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from longcat_tuner.errors import ConfigError
from longcat_tuner.generate import SamplingProgress, SamplingStopped, generate
from longcat_tuner.media import psnr, video_to_uint8, write_contact_sheet, write_mp4

VALIDATION_FPS = 15  # the base model's frame rate (MODEL.md 5.3)
# Decoded frames 1..4 are the first latent frame the model generates after the condition (4 pixel frames per
# latent frame): where a start-frame mismatch shows first.
EARLY_DRIFT_FRAMES = 4


def early_frame_psnr(video: torch.Tensor, start_frame: torch.Tensor, frames: int = EARLY_DRIFT_FRAMES) -> Optional[float]:
    """Early-frame drift: PSNR (dB) of decoded frames 1..`frames` of `video` `[3,F,H,W]` against `start_frame`
    `[3,H,W]` (both in [-1, 1]); higher means the video stays closer to the start frame. Frame 0 is left
    out (the condition frame's VAE round trip). None for a one-frame video."""
    early = video[:, 1:1 + frames]
    if early.shape[1] == 0:
        return None
    return psnr(early, start_frame[:, None])


class ValidationStopped(SamplingStopped):
    """Validation was stopped at a step boundary; `items` are the videos finished before it."""

    def __init__(self, message: str, items: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.items = items


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
    progress: Optional[Callable[[int, int], SamplingProgress]] = None,
) -> list[dict[str, Any]]:
    """Sample every item, write mp4 + contact sheet under `validation/step-<step>/`, return event items
    (raises `ValidationStopped` when a video's progress asks to stop)."""
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
            try:
                result = generate(
                    dit, vae, text_embeds=item.text_embeds.to(device), text_mask=item.text_mask.to(device),
                    negative_embeds=negative_embeds.to(device), negative_mask=negative_mask.to(device),
                    height=height, width=width, frames=num_frames, start_frame=item.start_frame, steps=steps,
                    guidance=guidance, shift=shift, seed=seed + index,
                    progress=progress(index, len(items)) if progress is not None else None,
                )
            except SamplingStopped as stopped:
                raise ValidationStopped(f"{stopped} of video {index + 1}/{len(items)}", results) from None
            video = result.video.cpu()
            frames = video_to_uint8(video)
            stem = f"{index:02d}-{_safe_name(item.name)}"
            video_path = write_mp4(out_dir / f"{stem}.mp4", frames, fps=VALIDATION_FPS)
            sheet_path = write_contact_sheet(frames, out_dir / f"{stem}.png")
            start = item.start_frame
            results.append(
                {
                    "prompt": item.prompt,
                    "video": str(video_path.relative_to(run_dir)),
                    "contact_sheet": str(sheet_path.relative_to(run_dir)),
                    "early_frame_drift_psnr": early_frame_psnr(video, start) if start is not None else None,
                    "early_frames": min(EARLY_DRIFT_FRAMES, video.shape[1] - 1) if start is not None else None,
                    "psnr_first_frame": psnr(video[:, 0], start) if start is not None else None,
                    # NaN/inf latents (weights that overflow): the video is black or noise, kept as a record.
                    "finite": result.finite,
                }
            )
    finally:
        dit.train(was_training)
    return results


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return cleaned[:60] or "sample"
