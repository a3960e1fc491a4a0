"""Low-precision base weights: per-row quantization, LoRA on top, and output error on the tiny checkpoint."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from longcat_tuner.errors import ConfigError
from longcat_tuner.model.lora import inject_lora
from longcat_tuner.runtime.block_swap import apply_block_swap
from longcat_tuner.runtime.quantize import (
    QuantizedLinear,
    apply_base_precision,
    quantize_base_weights,
    quantize_rows,
    weight_bytes,
)

# Relative L2 error of the tiny checkpoint's output vs float32 weights (measured: fp8 0.010, int8 0.0027).
ERROR_BOUND = {"fp8-torchao": 0.03, "int8-quanto": 0.008}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype,bound", [(torch.float8_e4m3fn, 0.04), (torch.int8, 0.015)])
def test_rows_round_trip(dtype, bound):
    w = torch.randn(64, 256) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different magnitude
    q, scale = quantize_rows(w, dtype)
    assert q.dtype == dtype and scale.shape == (64,)
    back = q.float() * scale[:, None]
    per_row = (back - w).norm(dim=1) / w.norm(dim=1)
    assert float(per_row.max()) < bound


def test_quantized_linear_gradient_matches_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(32, 48).requires_grad_(False)
    quant = nn.Linear(32, 48).requires_grad_(False)
    quant.load_state_dict(lin.state_dict())
    QuantizedLinear.convert(quant, torch.float8_e4m3fn)
    assert isinstance(quant, nn.Linear) and quant.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(5, 32, requires_grad=True)
    y = quant(x)
    y.square().sum().backward()
    grad_q = x.grad.clone()
    x.grad = None
    w = quant.dequantized_weight()
    ref = torch.nn.functional.linear(x, w, quant.bias)
    ref.square().sum().backward()
    assert torch.allclose(y, ref, atol=1e-6)
    assert torch.allclose(grad_q, x.grad, atol=1e-5)
    quant.to(torch.bfloat16)  # casts the float8 weight: must fail loudly, not compute garbage
    with pytest.raises(RuntimeError, match="before quantizing"):
        quant(x.bfloat16())


def tiny_inputs(dit):
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 16, 3, 8, 8, generator=g)
    t = torch.tensor([[0.0, 700.0, 700.0]])
    text = torch.randn(1, 6, dit.config.caption_channels, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    return latents, t, text, mask


@pytest.mark.parametrize("precision", ["fp8-torchao", "int8-quanto"])
def test_tiny_checkpoint_output_error_and_lora(tiny_checkpoint, precision):
    from longcat_tuner.model.loading import load_dit

    reference = load_dit(tiny_checkpoint)
    dit = load_dit(tiny_checkpoint)
    before = weight_bytes(dit)
    count = apply_base_precision(dit, precision, device=torch.device("cpu"))
    assert count == 8 * len(dit.blocks)
    assert weight_bytes(dit) < 0.5 * before  # float32 -> 1 byte per weight in the block linears
    args = tiny_inputs(dit)
    with torch.no_grad():
        ref = reference(*args, num_cond_latents=1)
        out = dit(*args, num_cond_latents=1)
    err = rel_error(out, ref)
    print(f"{precision}: relative output error vs float32 weights on longcat-tiny = {err:.4f}")
    assert 0 < err < ERROR_BOUND[precision]

    # LoRA on top: adapters attach to the quantized layers, start as a no-op, and train.
    adapters = inject_lora(dit, rank=4)
    assert len(adapters) == count
    with torch.no_grad():
        assert torch.equal(dit(*args, num_cond_latents=1), out)
    dit(*args, num_cond_latents=1).square().mean().backward()
    grads = [a.up.grad for a in adapters.values()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for n, p in dit.named_parameters() if "lora" not in n)

    # Block swap moves the quantized weights and their scales, and stays exact.
    dit.zero_grad(set_to_none=True)
    with torch.no_grad():
        expected = dit(*args, num_cond_latents=1)
    handle = apply_block_swap(dit, 2, compute_device="cpu")
    assert dit.blocks[1].ffn.w1.weight_scale.numel() == 0
    with torch.no_grad():
        assert torch.equal(dit(*args, num_cond_latents=1), expected)
    handle.remove()


def test_quantizing_trainable_weights_is_refused():
    from longcat_tuner.model.config import DiTConfig
    from longcat_tuner.model.dit import LongCatDiT

    dit = LongCatDiT(DiTConfig(hidden_size=32, depth=1, num_heads=2, caption_channels=8, adaln_tembed_dim=8))
    with pytest.raises(ConfigError, match="trainable"):
        quantize_base_weights(dit, "fp8-torchao")
    with pytest.raises(ConfigError, match="unknown"):
        apply_base_precision(dit, "int4", device=torch.device("cpu"))


def test_loaded_lora_on_quantized_layers_keeps_the_compute_dtype(tiny_checkpoint):
    from longcat_tuner import load_dit, load_lora
    from longcat_tuner.errors import ConfigError
    from longcat_tuner.model.lora import lora_modules, merge_lora

    dit = load_dit(tiny_checkpoint)
    quantize_base_weights(dit, "fp8-torchao")
    load_lora(dit, tiny_checkpoint / "lora" / "tiny_lora.safetensors")
    adapter = lora_modules(dit)["blocks.0.attn.qkv"]
    # Not the 8-bit storage dtype: the dtype the layer computes in (its bias's, float32 for this checkpoint).
    assert adapter.down.dtype == dit.blocks[0].attn.qkv.bias.dtype == torch.float32
    assert adapter.down.abs().sum() > 0
    with pytest.raises(ConfigError, match="un-merged"):
        merge_lora(dit)
