"""The video VAE: diffusers' `AutoencoderKLWan` (Wan2.1), with LongCat's per-channel latent normalisation.

`z_norm = (z - latents_mean) / latents_std`, using the mean/std in `vae/config.json` (MODEL.md section 3).
The encoder is causal in time: F pixel frames give `1 + (F - 1) // 4` latent frames, so F must be `4k + 1`.

Encoding runs diffusers' own encoder modules, but feeds them longer time chunks than diffusers' `encode`
does. diffusers encodes the first frame, then 4 frames at a time, carrying each causal convolution's
last input frames in a feature cache. That cache makes the result independent of how the frames after
the first are split, as long as every chunk spans whole latent frames (a multiple of the temporal
factor): causal convolutions see the same left context, the stride-2 time convolutions the same frame
pairs. So `encode_posterior` feeds chunks of up to `encode_chunk_frames` frames (default on CUDA: as many
as fit `ENCODE_CHUNK_PIXELS`; on the CPU 4, as diffusers, which was faster there and holds less memory),
which gives cuDNN larger convolutions and fewer launches: 1.015 -> 0.94 s per 93x480x832 clip on one
H200 in bf16 (bench/bench_cache.py; 8 to 48 frames all within 2%). Equality with diffusers' `encode` is
tested. VAEs outside the Wan2.1 layout this relies on (patchified or residual Wan2.2 VAEs) and tiled
encoding use diffusers' `encode` unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from longcat_tuner.encoders.text import folder_identity
from longcat_tuner.errors import CheckpointError, ShapeError
from longcat_tuner.model.loading import find_component, verify_weight_files

# Pixels (frames x height x width, per clip) of one encoder call: 16 frames at 480x832. At base width 96 in
# bf16 the largest activations of such a chunk take ~1.2 GB each (a few live at once).
ENCODE_CHUNK_PIXELS = 16 * 480 * 832


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

    def __init__(self, model, identity: str, encode_chunk_frames: Optional[int] = None):
        self.model = model
        self.identity = identity
        self.encode_chunk_frames = encode_chunk_frames
        config = model.config
        self.z_dim = config.z_dim
        self._mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.temporal_factor = getattr(config, "scale_factor_temporal", 4)
        self.spatial_factor = getattr(config, "scale_factor_spatial", 8)

    @classmethod
    def from_pretrained(
        cls, root: Union[str, Path], *, dtype: torch.dtype = torch.float32, device="cpu", encode_chunk_frames: Optional[int] = None
    ) -> "VideoVAE":
        from diffusers import AutoencoderKLWan

        folder = find_component(root, "vae")
        verify_weight_files(folder, required=False)  # names a truncated file
        try:
            model = AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot load the VAE from {folder}: {err}") from None
        if getattr(model.config, "latents_mean", None) is None or getattr(model.config, "latents_std", None) is None:
            raise CheckpointError(f"{folder}/config.json lacks latents_mean / latents_std")
        return cls(
            model.to(device).eval().requires_grad_(False),
            identity=f"wan-vae-{folder_identity(folder)}",
            encode_chunk_frames=encode_chunk_frames,
        )

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
        pixels = pixels.to(self.device, self.dtype)
        moments = self._encode_chunked(pixels) if _chunkable(self.model, pixels) else None
        if moments is None:
            return self.model.encode(pixels).latent_dist
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(moments)

    def chunk_frames_for(self, batch: int, frames: int, height: int, width: int) -> int:
        """Frames per encoder call after the first frame: a multiple of the temporal factor, at least one latent."""
        wanted = self.encode_chunk_frames
        if wanted is None:
            on_cuda = self.device.type == "cuda"
            wanted = ENCODE_CHUNK_PIXELS // max(1, batch * height * width) if on_cuda else self.temporal_factor
        factor = self.temporal_factor
        return max(factor, min(wanted, frames - 1) // factor * factor)

    def _encode_chunked(self, pixels: torch.Tensor) -> Optional[torch.Tensor]:
        """diffusers' `_encode` with time chunks of `chunk_frames_for(...)` frames instead of 4 (module docstring).

        None when this diffusers version keeps its encoder feature cache elsewhere (use `model.encode`).
        """
        model = self.model
        B, _, frames, H, W = pixels.shape
        chunk = self.chunk_frames_for(B, frames, H, W)
        bounds = [(0, 1)] + [(s, min(s + chunk, frames)) for s in range(1, frames, chunk)]
        model.clear_cache()  # (re)creates the encoder feature cache, `_enc_feat_map`
        if not isinstance(getattr(model, "_enc_feat_map", None), list):
            return None
        try:
            outs = []
            for start, stop in bounds:
                model._enc_conv_idx = [0]
                outs.append(model.encoder(pixels[:, :, start:stop], feat_cache=model._enc_feat_map, feat_idx=model._enc_conv_idx))
            return model.quant_conv(torch.cat(outs, dim=2))
        finally:
            model.clear_cache()

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


def _chunkable(model, pixels: torch.Tensor) -> bool:
    """Whether `model` is a plain Wan2.1-layout AutoencoderKLWan whose encoder takes longer time chunks."""
    config = getattr(model, "config", None)
    if config is None or not all(hasattr(model, a) for a in ("encoder", "quant_conv", "clear_cache")):
        return False
    if getattr(config, "patch_size", None) is not None or getattr(config, "is_residual", False):
        return False
    if getattr(model, "use_tiling", False):
        _, _, _, H, W = pixels.shape
        if W > getattr(model, "tile_sample_min_width", W) or H > getattr(model, "tile_sample_min_height", H):
            return False
    if getattr(model, "use_slicing", False) and pixels.shape[0] > 1:
        return False
    factor = 2 ** sum(bool(d) for d in getattr(config, "temperal_downsample", (False, True, True)))
    return factor == getattr(config, "scale_factor_temporal", 4)

