"""The training step as small pure functions: one batch of cached latents in, a scalar loss out.

The flow-matching math itself (sigma sampling with shift, noising, target, per-frame timesteps, loss
over noisy frames) lives in `longcat_tuner.diffusion.flow`, written once and shared with the sampler.
This module only decides what is condition and what is noise:

* image-to-video: the condition latent is a sample of the start frame's VAE posterior, kept clean and
  placed at latent frame 0 (the official `generate_i2v` samples it the same way), `num_cond_latents=1`;
* video continuation: the first `n` latents of the clip itself are the clean condition;
* text-to-video: no condition.

Condition frames get timestep 0 and are excluded from the loss (MODEL.md 5.1), so their target never
reaches the gradient.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch

from longcat_tuner.diffusion.flow import (
    flow_loss,
    flow_target,
    frame_timesteps,
    noisy_latents,
    sample_training_sigmas,
)
from longcat_tuner.errors import ShapeError


@dataclasses.dataclass
class FlowBatch:
    """What the step needs from the caches for one micro-batch (all tensors on the training device).

    `latents`: clean clip latents `[B,16,T,H,W]` (a posterior sample); `cond_latents`: the start-frame
    latent `[B,16,1,H,W]` for image-to-video, else None; `text_embeds` `[B,L,C]` / `text_mask` `[B,L]`.
    """

    latents: torch.Tensor
    text_embeds: torch.Tensor
    text_mask: torch.Tensor
    cond_latents: Optional[torch.Tensor] = None


def compose_condition(
    latents: torch.Tensor, cond_latents: Optional[torch.Tensor], continuation_latents: int = 0
) -> tuple[torch.Tensor, int]:
    """Clean latents with the condition in front, and how many leading latents are condition.

    The start-frame latent replaces the clip's own frame-0 latent (both encode the first frame; the
    start frame is what the user gives at inference).
    """
    if cond_latents is not None:
        if cond_latents.shape[:2] != latents.shape[:2] or cond_latents.shape[3:] != latents.shape[3:]:
            raise ShapeError(
                f"start-frame latents {tuple(cond_latents.shape)} do not match clip latents "
                f"{tuple(latents.shape)}: the start frame must be cached at the clip's bucket size"
            )
        num_cond = cond_latents.shape[2]
        if num_cond >= latents.shape[2]:
            raise ShapeError(f"{num_cond} condition latents leave no frame to denoise in {latents.shape[2]} latents")
        return torch.cat([cond_latents.to(latents.dtype), latents[:, :, num_cond:]], dim=2), num_cond
    if continuation_latents:
        if continuation_latents >= latents.shape[2]:
            raise ShapeError(
                f"video_continuation_latents={continuation_latents} but clips have {latents.shape[2]} latents; "
                "lower it or use longer clips"
            )
        return latents, continuation_latents
    return latents, 0


def drop_captions(
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    empty_embeds: torch.Tensor,
    empty_mask: torch.Tensor,
    probability: float,
    generator: Optional[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's caption by the empty-prompt embedding with `probability` (CFG training)."""
    batch = text_embeds.shape[0]
    # Always draw, even at probability 0, so the RNG stream does not depend on the setting.
    draw = torch.rand(batch, generator=generator, device=generator.device if generator is not None else "cpu")
    drop = (draw < probability).to(text_embeds.device)
    if not bool(drop.any()):
        return text_embeds, text_mask
    empty_embeds = empty_embeds.to(text_embeds.device, text_embeds.dtype).reshape(1, *text_embeds.shape[1:])
    empty_mask = empty_mask.to(text_mask.device, text_mask.dtype).reshape(1, *text_mask.shape[1:])
    embeds = torch.where(drop[:, None, None], empty_embeds, text_embeds)
    mask = torch.where(drop[:, None], empty_mask, text_mask)
    return embeds, mask


def flow_inputs(
    x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, num_cond: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model input, per-frame timesteps, target) for clean latents `x0` with `num_cond` condition latents."""
    # Condition latents are fed clean (never noised), exactly as the sampler keeps them.
    noisy = noisy_latents(x0, noise, sigma, num_cond)
    timesteps = frame_timesteps(sigma, x0.shape[2], num_cond)
    return noisy, timesteps, flow_target(x0, noise)


def flow_matching_loss(
    dit: torch.nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    num_cond: int,
    *,
    autocast_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """MSE between the DiT's `x0 - noise` prediction and the target, over noisy frames only."""
    model_input, timesteps, target = flow_inputs(x0, noise, sigma, num_cond)
    autocast = (
        torch.autocast(device_type=x0.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        prediction = dit(model_input, timesteps, text_embeds, text_mask, num_cond_latents=num_cond)
    return flow_loss(prediction.float(), target.float(), num_cond)


def training_loss(
    dit: torch.nn.Module,
    batch: FlowBatch,
    *,
    generator: torch.Generator,
    shift: float,
    distribution: str,
    continuation_latents: int = 0,
    autocast_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """One micro-batch: draw sigmas (with shift) and noise from `generator`, return the flow loss."""
    x0, num_cond = compose_condition(batch.latents.float(), batch.cond_latents, continuation_latents)
    sigma = sample_training_sigmas(
        x0.shape[0], shift=shift, distribution=distribution, generator=generator, device=generator.device
    ).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32).to(x0.device)
    return flow_matching_loss(
        dit, x0, noise, sigma, batch.text_embeds, batch.text_mask, num_cond, autocast_dtype=autocast_dtype
    )


@torch.no_grad()
def heldout_loss(
    dit: torch.nn.Module,
    batch: FlowBatch,
    sigmas: list[float],
    *,
    seed: int,
    continuation_latents: int = 0,
    autocast_dtype: Optional[torch.dtype] = None,
) -> float:
    """Flow-matching loss at fixed sigmas and fixed noise: comparable from one validation to the next."""
    x0, num_cond = compose_condition(batch.latents.float(), batch.cond_latents, continuation_latents)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total = 0.0
    for value in sigmas:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
        sigma = torch.full((x0.shape[0],), float(value), device=x0.device)
        loss = flow_matching_loss(
            dit, x0, noise, sigma, batch.text_embeds, batch.text_mask, num_cond, autocast_dtype=autocast_dtype
        )
        total += float(loss)
    return total / len(sigmas)
