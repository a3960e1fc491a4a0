"""The video VAE: diffusers' `AutoencoderKLWan` (Wan2.1), with LongCat's per-channel latent normalisation.

`z_norm = (z - latents_mean) / latents_std`, using the mean/std in `vae/config.json` (MODEL.md section 3).
The encoder is causal in time: F pixel frames give `1 + (F - 1) // 4` latent frames, so F must be `4k + 1`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from longcat_tuner.encoders.text import folder_identity
from longcat_tuner.errors import CheckpointError, ShapeError
from longcat_tuner.model.loading import find_component


def check_video_size(frames: int, height: int, width: int) -> None:
    if (frames - 1) % 4:
        lower, upper = frames - (frames - 1) % 4, frames + 4 - (frames - 1) % 4
        raise ShapeError(f"{frames} frames: the frame count must satisfy (frames - 1) % 4 == 0, e.g. {lower} or {upper}")
    if height % 16 or width % 16:
        raise ShapeError(
            f"size {height}x{width}: height and width must be divisible by 16 (VAE x8, then patch x2), "
            f"e.g. {height // 16 * 16}x{width // 16 * 16}"
        )


class VideoVAE:
    """Encode pixels in [-1, 1] `[B, 3, F, H, W]` to normalised latents, and back."""

    def __init__(self, model, identity: str):
        self.model = model
        self.identity = identity
        config = model.config
        self.z_dim = config.z_dim
        self._mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.temporal_factor = getattr(config, "scale_factor_temporal", 4)
        self.spatial_factor = getattr(config, "scale_factor_spatial", 8)

    @classmethod
    def from_pretrained(cls, root: Union[str, Path], *, dtype: torch.dtype = torch.float32, device="cpu") -> "VideoVAE":
        from diffusers import AutoencoderKLWan

        folder = find_component(root, "vae")
        try:
            model = AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot load the VAE from {folder}: {err}") from None
        if getattr(model.config, "latents_mean", None) is None or getattr(model.config, "latents_std", None) is None:
            raise CheckpointError(f"{folder}/config.json lacks latents_mean / latents_std")
        return cls(model.to(device).eval().requires_grad_(False), identity=f"wan-vae-{folder_identity(folder)}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self._mean.to(z.device)) * self._inv_std.to(z.device)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() / self._inv_std.to(z.device) + self._mean.to(z.device)

    def _posterior(self, pixels: torch.Tensor):
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ShapeError(f"pixels must be [B, 3, F, H, W], got {tuple(pixels.shape)}")
        check_video_size(*pixels.shape[2:])
        return self.model.encode(pixels.to(self.device, self.dtype)).latent_dist

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, sample: bool = True, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Normalised latents; `sample=True` draws from the posterior as the official pipeline does."""
        dist = self._posterior(pixels)
        z = dist.sample(generator=generator) if sample else dist.mode()
        return self.normalize(z)

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std in normalised latent space: `mean + std * randn` is an `encode` sample."""
        dist = self._posterior(pixels)
        return self.normalize(dist.mean), dist.std.float() * self._inv_std.to(dist.std.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], `[B, 3, 1 + 4 (T - 1), 8 H, 8 W]`."""
        z = self.denormalize(latents).to(self.device, self.dtype)
        return self.model.decode(z).sample.float().clamp(-1, 1)
