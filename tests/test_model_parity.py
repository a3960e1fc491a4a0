"""The DiT against the official code's outputs (../shared/reference/parity), float32 on CPU, atol=rtol=1e-4."""
from __future__ import annotations

import pytest
import torch

from longcat_tuner import load_dit, load_lora

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def dit(tiny_checkpoint):
    return load_dit(tiny_checkpoint)


def _inputs(cases):
    return cases["x"], cases["encoder_hidden_states"], cases["encoder_attention_mask"]


def test_text_to_video(dit, dit_cases):
    x, ehs, mask = _inputs(dit_cases)
    with torch.no_grad():
        out = dit(x, dit_cases["t2v_timestep"], ehs, mask)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, dit_cases["t2v_out"], **TOL)


def test_text_embeds_without_singleton_axis(dit, dit_cases):
    x, ehs, mask = _inputs(dit_cases)
    with torch.no_grad():
        out = dit(x, dit_cases["t2v_timestep"], ehs.squeeze(1), mask)
    torch.testing.assert_close(out, dit_cases["t2v_out"], **TOL)


def test_image_to_video(dit, dit_cases):
    x, ehs, mask = _inputs(dit_cases)
    with torch.no_grad():
        out = dit(x, dit_cases["i2v_timestep"], ehs, mask, num_cond_latents=1)
    torch.testing.assert_close(out, dit_cases["i2v_out"], **TOL)


def test_video_continuation(dit, dit_cases):
    x, ehs, mask = _inputs(dit_cases)
    with torch.no_grad():
        out = dit(x, dit_cases["vc_timestep"], ehs, mask, num_cond_latents=2)
    torch.testing.assert_close(out, dit_cases["vc_out"], **TOL)


def test_kv_cache_matches_official_cached_path(dit, dit_cases):
    x, ehs, mask = _inputs(dit_cases)
    with torch.no_grad():
        cache = dit.build_kv_cache(x[:, :, :2])
        out = dit(x[:, :, 2:], dit_cases["vc_timestep"][:, 2:], ehs, mask, kv_cache=cache)
    torch.testing.assert_close(out, dit_cases["vc_cached_noisy_out"], **TOL)
    torch.testing.assert_close(out, dit_cases["vc_out"][:, :, 2:], **TOL)


def test_i2v_loss_gradients(tiny_checkpoint, dit_cases):
    dit = load_dit(tiny_checkpoint)
    dit.requires_grad_(True)
    x, ehs, mask = _inputs(dit_cases)
    x = x.clone().requires_grad_(True)
    out = dit(x, dit_cases["i2v_timestep"], ehs, mask, num_cond_latents=1)
    loss = torch.nn.functional.mse_loss(out[:, :, 1:], dit_cases["grad_target"][:, :, 1:])
    loss.backward()
    torch.testing.assert_close(loss.detach().reshape(1), dit_cases["grad_loss"], **TOL)
    torch.testing.assert_close(x.grad, dit_cases["grad_x"], **TOL)
    params = dict(dit.named_parameters())
    for name in ("blocks.0.attn.qkv.weight", "final_layer.linear.weight"):
        torch.testing.assert_close(params[name].grad, dit_cases[f"grad_{name}"], **TOL)


def test_official_lora(tiny_checkpoint, dit_cases):
    dit = load_dit(tiny_checkpoint)
    load_lora(dit, tiny_checkpoint / "lora" / "tiny_lora.safetensors", multiplier=1.0)
    x, ehs, mask = _inputs(dit_cases)
    with torch.no_grad():
        out = dit(x, dit_cases["i2v_timestep"], ehs, mask, num_cond_latents=1)
    torch.testing.assert_close(out, dit_cases["i2v_lora_out"], **TOL)


def test_condition_tokens_ignore_noisy_frames_and_text(dit, dit_cases):
    """Condition-frame outputs depend on neither the noisy frames nor the caption (block-causal, zero cross-attn)."""
    x, ehs, mask = _inputs(dit_cases)
    t = dit_cases["i2v_timestep"]
    with torch.no_grad():
        a = dit(x, t, ehs, mask, num_cond_latents=1)
        x2 = x.clone()
        x2[:, :, 1:] = torch.randn_like(x2[:, :, 1:])
        b = dit(x2, t, torch.randn_like(ehs), mask, num_cond_latents=1)
    torch.testing.assert_close(a[:, :, :1], b[:, :, :1], atol=1e-6, rtol=0)
    assert (a[:, :, 1:] - b[:, :, 1:]).abs().max() > 1e-2


def test_bfloat16_runs_with_fp32_output(tiny_checkpoint, dit_cases):
    dit = load_dit(tiny_checkpoint, dtype=torch.bfloat16)
    x, ehs, mask = _inputs(dit_cases)
    with torch.no_grad():
        out = dit(x, dit_cases["i2v_timestep"], ehs, mask, num_cond_latents=1)
    assert out.dtype == torch.float32
    assert dit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    # bf16 weights and residual stream: close to the fp32 reference, not equal.
    rel = (out - dit_cases["i2v_out"]).norm() / dit_cases["i2v_out"].norm()
    assert 0 < rel < 0.05


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_attention_backends_agree(tiny_checkpoint, dit_cases, backend):
    dit = load_dit(tiny_checkpoint, attention_backend=backend)
    x, ehs, mask = _inputs(dit_cases)
    with torch.no_grad():
        out = dit(x, dit_cases["i2v_timestep"], ehs, mask, num_cond_latents=1)
    torch.testing.assert_close(out, dit_cases["i2v_out"], **TOL)


def test_auto_attention_policy():
    from longcat_tuner.model.attention import AttentionOptions, resolve_backend

    q = torch.zeros(1, 2, 8, 64)
    on = AttentionOptions(backend="auto", enable_bsa=True)
    # On the CPU, or without enable_bsa, `auto` is dense SDPA.
    assert resolve_backend(q, (4, 4, 4), (4, 4, 4), None, on).name == "sdpa"
    assert resolve_backend(q, (4, 4, 4), (4, 4, 4), None, AttentionOptions(backend="auto")).name == "sdpa"
    # Cross-attention (no grid) never goes block-sparse, even when forced.
    forced = AttentionOptions(backend="block_sparse")
    assert resolve_backend(q, None, None, None, forced).name == "sdpa"
    assert resolve_backend(q, (3, 4, 4), (4, 4, 4), None, forced).name == "block_sparse"


def test_block_sparse_backend_in_the_model(tiny_checkpoint, dit_cases):
    """Forced block-sparse on the ragged I2V split: dense at sparsity 0, different (but close) when sparse."""
    dit = load_dit(tiny_checkpoint)
    x, ehs, mask = _inputs(dit_cases)
    t = dit_cases["i2v_timestep"]
    dit.set_attention_backend("block_sparse", sparsity=0.0)
    with torch.no_grad():
        dense_equivalent = dit(x, t, ehs, mask, num_cond_latents=1)
    torch.testing.assert_close(dense_equivalent, dit_cases["i2v_out"], **TOL)
    dit.set_attention_backend("block_sparse", sparsity=0.75)
    with torch.no_grad():
        sparse = dit(x, t, ehs, mask, num_cond_latents=1)
    assert (sparse - dit_cases["i2v_out"]).abs().max() > 1e-4


def test_modulation_stays_float32_under_bf16_autocast(dit):
    t = torch.randn(2, 3, dit.config.adaln_tembed_dim)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mod = dit.blocks[0].adaLN_modulation(t)
    assert mod.dtype == torch.float32


def test_rope_tables_are_cached_eagerly_and_traced_under_torch_compile():
    """Compiled blocks call rope_tables in every attention: dynamo must trace it as one graph, without the
    "lru_cache-wrapped function" warning it prints for a cached function (seen in every compiled GPU run)."""
    import warnings

    import torch._dynamo

    from longcat_tuner.model.layers import apply_rope, rope_tables

    assert rope_tables((4, 6, 8), 32, "cpu")[0] is rope_tables((4, 6, 8), 32, "cpu")[0]  # cached in eager
    x = torch.randn(1, 2, 4 * 6 * 8, 32)

    def rotate(x):
        cos, sin = rope_tables((4, 6, 8), 32, x.device)
        return apply_rope(x, cos, sin)

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        explained = torch._dynamo.explain(rotate)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    torch.testing.assert_close(torch.compile(rotate, backend="eager")(x), rotate(x))
