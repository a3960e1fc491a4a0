"""The official first-order Euler sampler with CFG-Zero*, condition latents held fixed.

Matches `generate_t2v` / `generate_i2v` / `generate_vc` of the official pipeline (MODEL.md 4-5): the DiT
gets t = 1000 s on noisy frames and 0 on the condition frames; its prediction is negated and only the
noisy frames take the Euler step, so condition latents come out bit for bit unchanged.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from longcat_tuner.diffusion.flow import cfg_zero_star, euler_step, frame_timesteps, sampling_sigmas
from longcat_tuner.errors import ShapeError

StepCallback = Callable[[int, int, torch.Tensor], None]


def _broadcast_text(embeds: torch.Tensor, mask: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    if embeds.ndim == 4:
        embeds = embeds.squeeze(1)
    if embeds.shape[0] == 1 and batch > 1:
        embeds, mask = embeds.expand(batch, -1, -1), mask.expand(batch, -1)
    if embeds.shape[0] != batch:
        raise ShapeError(f"text embeddings have batch {embeds.shape[0]}, the latents {batch}")
    return embeds, mask


@torch.no_grad()
def sample(
    dit,
    latents: torch.Tensor,
    *,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    negative_embeds: Optional[torch.Tensor] = None,
    negative_mask: Optional[torch.Tensor] = None,
    num_cond_latents: int = 0,
    steps: int = 50,
    guidance: float = 4.0,
    shift: float = 12.0,
    distilled: bool = False,
    callback: Optional[StepCallback] = None,
    use_kv_cache: bool = False,
) -> torch.Tensor:
    """Denoise `latents` `[B,16,T,H,W]` (noise, with condition latents already in the first frames).

    CFG is on when `guidance > 1`; missing negatives must be the empty-prompt embedding (the caller encodes
    ""). Conditional and unconditional passes run as one batch. `use_kv_cache` runs the condition latents
    once and feeds only noisy frames afterwards (video continuation; CFG-Zero* then sees noisy frames only,
    as in the official cached path). `callback(step, steps, latents)` runs after each step.
    """
    B, T = latents.shape[0], latents.shape[2]
    if not 0 <= num_cond_latents < T:
        raise ShapeError(f"num_cond_latents={num_cond_latents} must leave at least one of the {T} frames to denoise")
    cfg = guidance > 1.0
    if cfg and (negative_embeds is None or negative_mask is None):
        raise ValueError("guidance > 1 needs negative_embeds/negative_mask (encode the empty prompt \"\")")
    text_embeds, text_mask = _broadcast_text(text_embeds, text_mask, B)
    if cfg:
        negative_embeds, negative_mask = _broadcast_text(negative_embeds, negative_mask, B)
        embeds = torch.cat([negative_embeds, text_embeds.to(negative_embeds.dtype)])
        masks = torch.cat([negative_mask, text_mask])
    else:
        embeds, masks = text_embeds, text_mask

    latents = latents.float().clone()
    cond = latents[:, :, :num_cond_latents]
    kv_cache = None
    if use_kv_cache and num_cond_latents:
        kv_cache = dit.build_kv_cache(torch.cat([cond, cond]) if cfg else cond)
    sigmas = sampling_sigmas(steps, shift=shift, distilled=distilled).tolist()

    for i in range(steps):
        sigma = torch.full((B,), sigmas[i], dtype=torch.float32, device=latents.device)
        if kv_cache is not None:
            model_in = latents[:, :, num_cond_latents:]
            timestep = frame_timesteps(sigma, T - num_cond_latents)
            n_cond = 0
        else:
            model_in = latents
            timestep = frame_timesteps(sigma, T, num_cond_latents)
            n_cond = num_cond_latents
        if cfg:
            model_in, timestep = torch.cat([model_in, model_in]), torch.cat([timestep, timestep])
        prediction = dit(model_in, timestep, embeds, masks, num_cond_latents=n_cond, kv_cache=kv_cache)
        if cfg:
            v_uncond, v_cond = prediction.chunk(2)
            prediction = cfg_zero_star(v_cond, v_uncond, guidance)
        noisy_pred = prediction if kv_cache is not None else prediction[:, :, num_cond_latents:]
        # The DiT predicts x0 - noise; the Euler step wants d x / d sigma = noise - x0.
        noisy = euler_step(latents[:, :, num_cond_latents:], -noisy_pred, sigmas[i], sigmas[i + 1])
        latents = torch.cat([cond, noisy], dim=2)
        if callback is not None:
            callback(i + 1, steps, latents)
    return latents
