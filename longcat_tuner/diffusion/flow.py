"""Flow matching for LongCat-Video as pure functions, shared by the training step and the sampler.

Convention (MODEL.md 4.1): `x_s = (1 - s) x0 + s noise`, the DiT sees `t = 1000 s` and predicts
`x0 - noise` (the official pipeline negates it before the Euler step). Condition frames stay clean and
get t = 0 (MODEL.md 5.1); the loss covers noisy frames only.
"""
from __future__ import annotations

from typing import Optional

import torch

from longcat_tuner.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000
DISTILL_TEACHER_STEPS = 50


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """`s' = shift s / (1 + (shift - 1) s)` (the scheduler's static shift), in the input dtype."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def base_sigmas(steps: int, *, distilled: bool = False) -> torch.Tensor:
    """Unshifted sampling sigmas. Standard: `linspace(1, 0.001, N)` in float32. Distilled (`cfg_step_lora`):
    the 50-step teacher grid `k * 20 / 1000`, k = 50..1, taken at `floor(linspace(0, 50, N, endpoint=False))`."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if not distilled:
        return torch.linspace(1.0, 0.001, steps, dtype=torch.float32)
    stride = NUM_TRAIN_TIMESTEPS // DISTILL_TEACHER_STEPS
    teacher = torch.arange(DISTILL_TEACHER_STEPS, 0, -1, dtype=torch.float32) * stride
    index = torch.floor(torch.arange(steps, dtype=torch.float64) * DISTILL_TEACHER_STEPS / steps).long()
    return teacher[index] / NUM_TRAIN_TIMESTEPS


def sampling_sigmas(steps: int, *, shift: float = 12.0, distilled: bool = False) -> torch.Tensor:
    """Shifted sigmas with the terminal 0 appended: `steps + 1` values, float32."""
    sigmas = shift_sigmas(base_sigmas(steps, distilled=distilled), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigmas_to_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    return sigmas * NUM_TRAIN_TIMESTEPS


def sample_training_sigmas(
    batch: int,
    *,
    shift: float = 12.0,
    distribution: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: Optional[torch.Generator] = None,
    device="cpu",
) -> torch.Tensor:
    """Training noise levels: u from the base distribution, then the same shift as sampling uses.

    `uniform`: u ~ U(0, 1); `logit_normal`: u = sigmoid(N(logit_mean, logit_std)). With shift 12 most draws
    land at high noise, matching the inference grid (46 of 50 steps above t = 500).
    """
    if distribution == "uniform":
        u = torch.rand(batch, generator=generator, dtype=torch.float32)
    elif distribution == "logit_normal":
        u = torch.sigmoid(torch.randn(batch, generator=generator, dtype=torch.float32) * logit_std + logit_mean)
    else:
        raise ConfigError(f"timestep distribution '{distribution}' is unknown; use 'uniform' or 'logit_normal'")
    return shift_sigmas(u, shift).to(device)


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, num_cond_latents: int = 0) -> torch.Tensor:
    """`(1 - s) x0 + s noise` on noisy frames; the first `num_cond_latents` frames keep x0 (clean condition)."""
    s = _expand(sigma, x0)
    out = (1 - s) * x0 + s * noise
    if num_cond_latents:
        out = torch.cat([x0[:, :, :num_cond_latents], out[:, :, num_cond_latents:]], dim=2)
    return out


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the LongCat DiT predicts: `x0 - noise` (the negative of the SD3/Wan velocity)."""
    return x0 - noise


def frame_timesteps(sigma: torch.Tensor, num_frames: int, num_cond_latents: int = 0) -> torch.Tensor:
    """Per-latent-frame timesteps `[B, T]`: `1000 s` on noisy frames, 0 on condition frames."""
    t = sigmas_to_timesteps(sigma.float())[:, None].expand(-1, num_frames).clone()
    t[:, :num_cond_latents] = 0
    return t


def flow_loss(
    prediction: torch.Tensor, target: torch.Tensor, num_cond_latents: int = 0, weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean squared error over noisy frames only (condition frames carry no loss); per-sample weights optional."""
    diff = (prediction.float() - target.float())[:, :, num_cond_latents:]
    per_sample = diff.pow(2).flatten(1).mean(1)
    if weight is not None:
        per_sample = per_sample * weight
    return per_sample.mean()


def euler_step(latents: torch.Tensor, model_output: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """`x + (s_next - s) * v` with v = -(DiT prediction), in float32."""
    return latents.float() + (sigma_next - sigma) * model_output.float()


def cfg_zero_star(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """CFG-Zero* (optimized scale, no zero-init): `s* = <v_c, v_u> / (|v_u|^2 + 1e-8)` per sample,
    `v = s* v_u + w (v_c - s* v_u)`. The scale broadcasts per sample (the official code is right only for B=1)."""
    B = v_cond.shape[0]
    c, u = v_cond.reshape(B, -1).float(), v_uncond.reshape(B, -1).float()
    scale = (c * u).sum(1) / (u.pow(2).sum(1) + 1e-8)
    scale = scale.view(B, *([1] * (v_cond.ndim - 1)))
    return scale * v_uncond + guidance * (v_cond - scale * v_uncond)
