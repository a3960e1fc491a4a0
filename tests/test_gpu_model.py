"""The model on CUDA: parity in float32 and sane bfloat16 numerics (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from longcat_tuner import load_dit

pytestmark = pytest.mark.gpu


def _inputs(cases, device):
    return [cases[k].to(device) for k in ("x", "encoder_hidden_states", "encoder_attention_mask")]


@pytest.fixture
def no_tf32():
    """Real float32 matmuls and convolutions for the test, the flags restored after it (they are properties
    of torch's backend modules, which monkeypatch cannot delete again)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_parity_float32_on_cuda(tiny_checkpoint, dit_cases, no_tf32):
    # cuDNN convolutions default to TF32 (the patch embedding would carry ~1e-3 error): real float32 here.
    dit = load_dit(tiny_checkpoint, device="cuda")
    x, ehs, mask = _inputs(dit_cases, "cuda")
    with torch.no_grad():
        out = dit(x, dit_cases["i2v_timestep"].cuda(), ehs, mask, num_cond_latents=1)
    torch.testing.assert_close(out.cpu(), dit_cases["i2v_out"], atol=1e-4, rtol=1e-4)


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


@pytest.mark.parametrize("mode", ["full", "keep_attention", "offload_inputs"])
def test_checkpointed_bf16_training_gradients_match_plain(tiny_checkpoint, dit_cases, mode):
    """cuDNN attention is pinned per call, so recomputation in backward reproduces the forward exactly."""
    from longcat_tuner import inject_lora
    from longcat_tuner.model.lora import lora_modules
    from longcat_tuner.runtime import MemorySettings, apply_runtime

    def grads(**options):
        dit = load_dit(tiny_checkpoint, dtype=torch.bfloat16, device="cuda")
        torch.manual_seed(0)
        inject_lora(dit, rank=4, alpha=4)
        with torch.no_grad():
            for adapter in lora_modules(dit).values():
                adapter.up.normal_(0, 0.05)
        apply_runtime(dit, MemorySettings(**options), "cuda")
        x, ehs, mask = _inputs(dit_cases, "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = dit(x, dit_cases["i2v_timestep"].cuda(), ehs, mask, num_cond_latents=1)
        out[:, :, 1:].pow(2).mean().backward()
        return {n: p.grad.float().cpu() for n, p in dit.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(checkpointing="none"), grads(checkpointing=mode)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("swap,precision", [(1, "no_change"), (0, "fp8-torchao"), (1, "int8-quanto")])
def test_host_first_assembly_for_sampling_on_cuda(tiny_checkpoint, dit_cases, swap, precision):
    """Block swap / 8-bit weights: the DiT is built on the host, then placed; output stays close to plain bf16."""
    import argparse

    from longcat_tuner.commands.sample import load_dit_for_sampling

    args = argparse.Namespace(model=str(tiny_checkpoint), attention="sdpa", lora=[str(tiny_checkpoint / "lora" / "tiny_lora.safetensors")], lora_multiplier=[],
                              blocks_to_swap=0, base_precision="no_change", compile="off", steps=50, guidance=4.0)
    device = torch.device("cuda")
    plain = load_dit_for_sampling(args, dtype=torch.bfloat16, device=device)
    args.blocks_to_swap, args.base_precision = swap, precision
    torch.cuda.reset_peak_memory_stats()
    low = load_dit_for_sampling(args, dtype=torch.bfloat16, device=device)
    x, ehs, mask = _inputs(dit_cases, "cuda")
    t = dit_cases["i2v_timestep"].cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = plain(x, t, ehs, mask, num_cond_latents=1).float()
        got = low(x, t, ehs, mask, num_cond_latents=1).float()
    assert ((got - want).norm() / want.norm()) < (0.05 if precision != "no_change" else 1e-3)
    if swap:  # between calls the last block's frozen tensors are empty placeholders on the GPU
        base = [p for n, p in low.blocks[-1].named_parameters() if "lora_adapters" not in n]
        adapters = [p for n, p in low.blocks[-1].named_parameters() if "lora_adapters" in n]
        assert base and all(p.is_cuda and p.numel() == 0 for p in base)
        assert adapters and all(p.is_cuda and p.numel() > 0 for p in adapters)  # LoRAs never leave the GPU
        assert all(p.is_cuda and p.numel() > 0 for p in low.blocks[0].parameters())
