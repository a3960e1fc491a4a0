"""Sampling's compiled path on CUDA gives the eager loop's video (skipped without a GPU).

`sample --compile on|auto` runs the DiT blocks through torch.compile (runtime.apply_runtime with the settings of
`commands.sample.sampling_settings`); its denoised latents must match the eager loop's from the same noise.
"""
from __future__ import annotations

import pytest
import torch

from longcat_tuner import load_dit

pytestmark = pytest.mark.gpu


def _denoise(tiny_checkpoint, dit_cases, compile_mode: str, guidance: float) -> torch.Tensor:
    from longcat_tuner.commands.sample import sampling_settings
    from longcat_tuner.diffusion.sampler import sample
    from longcat_tuner.runtime import apply_runtime

    torch._dynamo.reset()
    dit = load_dit(tiny_checkpoint, dtype=torch.bfloat16, device="cuda")
    settings = sampling_settings(device=torch.device("cuda"), steps=6, guidance=guidance, compile=compile_mode)
    assert settings.compile_blocks == (compile_mode == "on")
    applied = apply_runtime(dit, settings, "cuda")
    text, mask = dit_cases["encoder_hidden_states"][:1, 0].cuda(), dit_cases["encoder_attention_mask"][:1].cuda()
    negative, negative_mask = dit_cases["encoder_hidden_states"][1:, 0].cuda(), dit_cases["encoder_attention_mask"][1:].cuda()
    try:
        with torch.no_grad():
            return sample(dit, dit_cases["x"][:1].cuda(), text_embeds=text, text_mask=mask,
                          negative_embeds=negative, negative_mask=negative_mask, num_cond_latents=1,
                          steps=6, guidance=guidance).float().cpu()
    finally:
        applied.remove()


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_compiled_sampling_matches_the_eager_loop(tiny_checkpoint, dit_cases, guidance):
    eager = _denoise(tiny_checkpoint, dit_cases, "off", guidance)
    compiled = _denoise(tiny_checkpoint, dit_cases, "on", guidance)
    assert torch.isfinite(compiled).all()
    # bf16 with fused kernels: a few bf16 ulps per step, over 6 steps.
    rel = ((compiled - eager).norm() / eager.norm()).item()
    assert rel < 2e-2, rel
