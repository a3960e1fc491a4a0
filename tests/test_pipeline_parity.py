"""Text encoder, VAE, scheduler and the I2V sampling loop against the official code's outputs."""
from __future__ import annotations

import json

import pytest
import torch

from longcat_tuner import TextEncoder, VideoVAE, load_dit, sample
from longcat_tuner.diffusion.flow import base_sigmas, cfg_zero_star, sampling_sigmas
from longcat_tuner.encoders.text import clean_prompt
from longcat_tuner.errors import CheckpointError

from conftest import PARITY

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def meta(shared_dir):
    return json.loads((PARITY / "meta.json").read_text())


def test_prompt_cleaning():
    assert clean_prompt("  a girl &amp;amp; her   dog\n") == "a girl & her dog"


def test_prompt_embeddings(tiny_checkpoint, pipeline_cases, meta):
    encoder = TextEncoder.from_pretrained(tiny_checkpoint)
    embeds, mask = encoder.encode(meta["prompts"])
    assert embeds.shape == (2, 512, 64) and mask.shape == (2, 512)
    torch.testing.assert_close(embeds, pipeline_cases["prompt_embeds"].squeeze(1), **TOL)
    assert torch.equal(mask, pipeline_cases["prompt_mask"])
    empty, empty_mask = encoder.encode([meta["negative_prompt"]])
    torch.testing.assert_close(empty, pipeline_cases["empty_embeds"].squeeze(1), **TOL)
    assert int(empty_mask.sum()) == 1  # only </s>


def test_text_encoder_width_must_match_dit(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="caption_channels"):
        TextEncoder.from_pretrained(tiny_checkpoint, caption_channels=4096)


def test_vae_decode(tiny_checkpoint, pipeline_cases):
    vae = VideoVAE.from_pretrained(tiny_checkpoint)
    video = vae.decode(pipeline_cases["vae_decode_latents"])
    torch.testing.assert_close(video, pipeline_cases["vae_decode_video"], **TOL)


def test_vae_posterior_matches_sample(tiny_checkpoint):
    vae = VideoVAE.from_pretrained(tiny_checkpoint)
    pixels = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    mean, std = vae.encode_posterior(pixels)
    assert mean.shape == (1, 16, 2, 4, 6)
    z = vae.encode(pixels, sample=True, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, mean + std * eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vae.encode(pixels, sample=False), mean)


@pytest.mark.parametrize("key,steps,distilled", [("50", 50, False), ("16_distill", 16, True), ("4", 4, False)])
def test_scheduler_sigmas_and_timesteps(shared_dir, key, steps, distilled):
    ref = json.loads((PARITY / "scheduler.json").read_text())[key]
    sigmas = sampling_sigmas(steps, shift=12.0, distilled=distilled)
    torch.testing.assert_close(sigmas, torch.tensor(ref["sigmas"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(sigmas[:-1] * 1000, torch.tensor(ref["timesteps"]), atol=1e-4, rtol=0)


def test_distilled_base_grid():
    expected = [1.00, .94, .88, .82, .76, .70, .64, .58, .50, .44, .38, .32, .26, .20, .14, .08]
    torch.testing.assert_close(base_sigmas(16, distilled=True), torch.tensor(expected), atol=1e-6, rtol=0)


def test_i2v_sampling_loop(tiny_checkpoint, pipeline_cases, meta):
    dit = load_dit(tiny_checkpoint)
    initial = pipeline_cases["i2v_initial_latents"]
    out = sample(
        dit, initial,
        text_embeds=pipeline_cases["prompt_embeds"][:1], text_mask=pipeline_cases["prompt_mask"][:1],
        negative_embeds=pipeline_cases["empty_embeds"], negative_mask=pipeline_cases["empty_mask"],
        num_cond_latents=1, steps=meta["i2v_steps"], guidance=meta["i2v_guidance"], shift=12.0,
    )
    torch.testing.assert_close(out, pipeline_cases["i2v_final_latents"], **TOL)
    assert torch.equal(out[:, :, 0], initial[:, :, 0])  # the condition latent is untouched, bit for bit


def test_cfg_zero_star_scale_is_per_sample():
    torch.manual_seed(0)
    v_c, v_u = torch.randn(3, 16, 2, 4, 4), torch.randn(3, 16, 2, 4, 4)
    batched = cfg_zero_star(v_c, v_u, 4.0)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], cfg_zero_star(v_c[i : i + 1], v_u[i : i + 1], 4.0))


def test_kv_cache_sampling_equals_uncached_for_continuation(tiny_checkpoint, pipeline_cases):
    dit = load_dit(tiny_checkpoint)
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 4, 8, 8)
    kwargs = dict(text_embeds=pipeline_cases["prompt_embeds"][:1], text_mask=pipeline_cases["prompt_mask"][:1],
                  num_cond_latents=2, steps=3, guidance=1.0)
    plain = sample(dit, latents, **kwargs)
    cached = sample(dit, latents, use_kv_cache=True, **kwargs)
    torch.testing.assert_close(plain, cached, atol=1e-4, rtol=1e-4)
