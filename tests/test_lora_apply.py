"""How an attached adapter adds to its layer: value, dtype under autocast, gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from longcat_tuner.model.layers import FP32Linear
from longcat_tuner.model.lora import LoRAAdapter, _attach, remove_lora


def _adapter(in_f: int, out_f: int, parts: int, dtype=torch.float32) -> LoRAAdapter:
    adapter = LoRAAdapter(in_f, out_f, rank=4, parts=parts, alpha_scale=0.5, dtype=dtype, device="cpu")
    with torch.no_grad():
        adapter.up.normal_()
    adapter.multiplier = 0.8
    return adapter


def _expected(linear: nn.Linear, adapter: LoRAAdapter, x: torch.Tensor) -> torch.Tensor:
    h = x @ adapter.down.t()
    chunks = h.split(adapter.rank, dim=-1)
    update = torch.cat([c @ adapter.up[j].t() for j, c in enumerate(chunks)], dim=-1)
    return linear(x) + 0.5 * 0.8 * update


@pytest.mark.parametrize("parts", [1, 3])
def test_value_and_gradients_match_the_formula(parts):
    torch.manual_seed(0)
    linear = nn.Linear(16, 24)
    adapter = _adapter(16, 24, parts)
    x = torch.randn(2, 5, 16, requires_grad=True)
    want = _expected(linear, adapter, x)
    g_want = torch.autograd.grad(want.square().sum(), [x, adapter.down, adapter.up])
    _attach(linear, "default", adapter)
    got = linear(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g_got = torch.autograd.grad(got.square().sum(), [x, adapter.down, adapter.up])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    plain = nn.functional.linear(x, linear.weight, linear.bias)
    torch.testing.assert_close(adapter(x), want - plain, atol=1e-5, rtol=1e-5)  # the update alone
    remove_lora(linear)
    torch.testing.assert_close(linear(x), plain)


def test_float32_layers_stay_float32_under_bf16_autocast():
    """Modulation and the final layer compute in float32 (FP32Linear): their update must not drop to bf16."""
    torch.manual_seed(0)
    layer = FP32Linear(16, 12)
    adapter = _adapter(16, 12, parts=2)
    x = torch.randn(3, 16)
    want = _expected(layer, adapter, x)
    _attach(layer, "default", adapter)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_projection_gets_a_bf16_update_under_autocast():
    torch.manual_seed(0)
    linear = nn.Linear(32, 48)
    adapter = _adapter(32, 48, parts=3)
    x = torch.randn(4, 32)
    want = _expected(linear, adapter, x)
    _attach(linear, "default", adapter)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear(x)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).norm() / want.norm()) < 2e-2
    got.float().sum().backward()
    assert adapter.down.grad.dtype == torch.float32 and adapter.up.grad.abs().sum() > 0
