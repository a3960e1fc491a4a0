"""End-to-end generation: start frame + prompt -> video, used by `longcat-tuner sample` and validation.

Mirrors the official `generate_i2v` / `generate_t2v`: the start frame is resized and cropped to the target
size, VAE-encoded (a posterior sample, as the official code does) into latent frame 0, the other latents
are Gaussian noise, and the Euler/CFG-Zero* loop denoises only the noisy frames.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from longcat_tuner.diffusion.sampler import sample
from longcat_tuner.errors import ShapeError
from longcat_tuner.media import check_frames


@dataclasses.dataclass
class GenerationResult:
    latents: torch.Tensor  # [1, 16, T, h, w] normalised latents after sampling
    cond_latents: Optional[torch.Tensor]  # [1, 16, 1, h, w] the encoded start frame (I2V) or None
    video: torch.Tensor  # [3, F, H, W] in [-1, 1]


def generate(
    dit,
    vae,
    *,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    negative_embeds: Optional[torch.Tensor],
    negative_mask: Optional[torch.Tensor],
    height: int,
    width: int,
    frames: int,
    start_frame: Optional[torch.Tensor] = None,
    steps: int = 50,
    guidance: float = 4.0,
    shift: float = 12.0,
    distilled: bool = False,
    seed: int = 0,
    callback: Optional[Callable[[int, int, torch.Tensor], None]] = None,
) -> GenerationResult:
    """`start_frame` `[3, H, W]` in [-1, 1] gives image-to-video; None gives text-to-video."""
    check_frames(frames)
    if height % 16 or width % 16:
        raise ShapeError(f"size {height}x{width}: height and width must be divisible by 16")
    device = next(dit.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    latent_frames = 1 + (frames - 1) // 4
    shape = (1, 16, latent_frames, height // 8, width // 8)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    cond = None
    if start_frame is not None:
        if tuple(start_frame.shape[-2:]) != (height, width):
            raise ShapeError(f"start frame is {tuple(start_frame.shape[-2:])}, expected {(height, width)}")
        pixels = start_frame.reshape(1, 3, 1, height, width)
        cond = vae.encode(pixels, sample=True, generator=torch.Generator(device=vae.device).manual_seed(seed)).float()
        latents[:, :, :1] = cond.to(device)
    out = sample(
        dit, latents, text_embeds=text_embeds, text_mask=text_mask, negative_embeds=negative_embeds,
        negative_mask=negative_mask, num_cond_latents=1 if cond is not None else 0, steps=steps,
        guidance=guidance, shift=shift, distilled=distilled, callback=callback,
    )
    video = vae.decode(out)[0]
    return GenerationResult(latents=out, cond_latents=cond, video=video)
