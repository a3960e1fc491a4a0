"""The model on CUDA: parity in float32 and sane bfloat16 numerics (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from longcat_tuner import load_dit

pytestmark = pytest.mark.gpu


def _inputs(cases, device):
    return [cases[k].to(device) for k in ("x", "encoder_hidden_states", "encoder_attention_mask")]


def test_parity_float32_on_cuda(tiny_checkpoint, dit_cases):
    dit = load_dit(tiny_checkpoint, device="cuda")
    x, ehs, mask = _inputs(dit_cases, "cuda")
    with torch.no_grad():
        out = dit(x, dit_cases["i2v_timestep"].cuda(), ehs, mask, num_cond_latents=1)
    torch.testing.assert_close(out.cpu(), dit_cases["i2v_out"], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", ["sdpa", "block_sparse"])
def test_bfloat16_on_cuda_close_to_float32(tiny_checkpoint, dit_cases, backend):
    dit = load_dit(tiny_checkpoint, dtype=torch.bfloat16, device="cuda", attention_backend=backend)
    if backend == "block_sparse":
        dit.set_attention_backend("block_sparse", sparsity=0.0)
    x, ehs, mask = _inputs(dit_cases, "cuda")
    with torch.no_grad():
        out = dit(x, dit_cases["i2v_timestep"].cuda(), ehs, mask, num_cond_latents=1).cpu()
    rel = (out - dit_cases["i2v_out"]).norm() / dit_cases["i2v_out"].norm()
    assert out.dtype == torch.float32 and rel < 0.05
