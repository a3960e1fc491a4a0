"""Validation: image-to-video samples from the eval split, written as mp4 + contact sheet, with the
first-frame PSNR (catches the guide's "first frame drifts" failure) and a held-out loss at fixed sigmas.

The sampler holds the start frame's latent fixed and denoises only later frames (SPEC section 5);
guidance uses empty negatives unless a negative prompt is given.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch

from longcat_tuner.errors import ConfigError
from longcat_tuner.generate import generate
from longcat_tuner.media import psnr, video_to_uint8, write_contact_sheet, write_mp4

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
            result = generate(
                dit, vae, text_embeds=item.text_embeds.to(device), text_mask=item.text_mask.to(device),
                negative_embeds=negative_embeds.to(device), negative_mask=negative_mask.to(device),
                height=height, width=width, frames=num_frames, start_frame=item.start_frame, steps=steps,
                guidance=guidance, shift=shift, seed=seed + index,
            )
            video = result.video.cpu()
            frames = video_to_uint8(video)
            stem = f"{index:02d}-{_safe_name(item.name)}"
            video_path = write_mp4(out_dir / f"{stem}.mp4", frames, fps=VALIDATION_FPS)
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
