"""VideoVAE encodes in long time chunks; the posterior must equal diffusers' own 4-frame-chunk `encode`."""
from __future__ import annotations

import pytest
import torch

from longcat_tuner.encoders import VideoVAE
from longcat_tuner.encoders import vae as vae_module


def _random_wan(num_res_blocks: int, seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(base_dim=8, z_dim=16, num_res_blocks=num_res_blocks).eval().requires_grad_(False)
    # Random-init norms are ones and biases zeros; perturb them so every parameter matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return VideoVAE(model, identity="random-wan")


def _reference(vae: VideoVAE, pixels: torch.Tensor):
    dist = vae.model.encode(pixels).latent_dist  # diffusers: first frame, then 4 frames at a time
    return vae.normalize(dist.mean), dist.std.float() * vae._inv_std


def _count_encoder_calls(vae: VideoVAE, monkeypatch) -> list[int]:
    calls: list[int] = []
    original = vae.model.encoder.forward

    def counting(x, *args, **kwargs):
        calls.append(x.shape[2])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(vae.model.encoder, "forward", counting)
    return calls


@pytest.mark.parametrize("chunk", [4, 8, 12, 64])
@pytest.mark.parametrize("frames", [1, 5, 17, 21])
def test_chunked_encode_equals_diffusers(chunk, frames, monkeypatch):
    vae = _random_wan(num_res_blocks=2)  # the real Wan2.1 VAE has two residual blocks per level
    vae.encode_chunk_frames = chunk
    pixels = torch.rand(2, 3, frames, 32, 48) * 2 - 1
    calls = _count_encoder_calls(vae, monkeypatch)
    mean, std = vae.encode_posterior(pixels)  # first: the chunked path must not rely on an earlier encode
    encoder_calls = list(calls)
    want_mean, want_std = _reference(vae, pixels)
    assert mean.shape == (2, 16, 1 + (frames - 1) // 4, 4, 6)
    torch.testing.assert_close(mean, want_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, want_std, atol=1e-5, rtol=1e-5)
    # The first frame alone, then whole chunks of `chunk` frames (the last may be shorter).
    rest = frames - 1
    assert encoder_calls == [1] + [chunk] * (rest // chunk) + ([rest % chunk] if rest % chunk else [])


def test_tiny_checkpoint_vae_chunked(tiny_checkpoint, monkeypatch):
    pixels = torch.rand(1, 3, 13, 32, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    for chunk in (4, 8, 12):
        vae = VideoVAE.from_pretrained(tiny_checkpoint, encode_chunk_frames=chunk)
        calls = _count_encoder_calls(vae, monkeypatch)
        mean, std = vae.encode_posterior(pixels)
        assert calls == [1] + [chunk] * (12 // chunk) + ([12 % chunk] if 12 % chunk else [])
        want_mean, want_std = _reference(vae, pixels)
        torch.testing.assert_close(mean, want_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(std, want_std, atol=1e-5, rtol=1e-5)
    # A sampled encode draws from the same posterior.
    z = vae.encode(pixels, generator=torch.Generator().manual_seed(0))
    assert z.shape == mean.shape


def test_default_chunk_from_pixel_budget(monkeypatch):
    vae = _random_wan(num_res_blocks=1)
    assert vae.chunk_frames_for(1, 93, 32, 48) == 4  # CPU default: diffusers' 4 frames
    monkeypatch.setattr(VideoVAE, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(vae_module, "ENCODE_CHUNK_PIXELS", 9 * 32 * 48)
    # 9 frames of budget at this size -> 8 (whole latent frames); never more than the clip, never below 4.
    assert vae.chunk_frames_for(1, 93, 32, 48) == 8
    assert vae.chunk_frames_for(1, 5, 32, 48) == 4
    assert vae.chunk_frames_for(4, 93, 32, 48) == 4
    assert vae.chunk_frames_for(1, 93, 3200, 4800) == 4
    vae.encode_chunk_frames = 30
    assert vae.chunk_frames_for(1, 93, 32, 48) == 28


def test_unsupported_layouts_use_diffusers_encode(monkeypatch):
    vae = _random_wan(num_res_blocks=1)
    pixels = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    calls = _count_encoder_calls(vae, monkeypatch)
    vae.model.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16,
                            tile_sample_stride_height=8, tile_sample_stride_width=8)
    vae.encode_posterior(pixels)
    assert calls and set(calls) <= {1, 4}  # diffusers' tiled path: 1 + 4 + 4 per tile

