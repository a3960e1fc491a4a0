"""The config's checkpointing modes give the same gradients as no checkpointing (tiny model, CPU)."""
from __future__ import annotations

import pytest
import torch

from longcat_tuner import inject_lora, load_dit
from longcat_tuner.errors import ConfigError
from longcat_tuner.model.lora import lora_modules
from longcat_tuner.runtime import MemorySettings, apply_runtime
from longcat_tuner.runtime.checkpointing import CHECKPOINT_ATTR


def _settings(gradient_checkpointing=True, mode="full", **rest):
    return MemorySettings(checkpointing=mode if gradient_checkpointing else "none", **rest)


def _grads(tiny_checkpoint, dit_cases, **options):
    dit = load_dit(tiny_checkpoint)
    torch.manual_seed(0)
    inject_lora(dit, rank=4, alpha=4)
    with torch.no_grad():
        for adapter in lora_modules(dit).values():
            adapter.up.normal_(0, 0.05)
    apply_runtime(dit, _settings(**options), "cpu")
    out = dit(dit_cases["x"], dit_cases["i2v_timestep"], dit_cases["encoder_hidden_states"],
              dit_cases["encoder_attention_mask"], num_cond_latents=1)
    out[:, :, 1:].pow(2).mean().backward()
    marked = [getattr(b, CHECKPOINT_ATTR, None) is not None for b in dit.blocks]
    return {n: p.grad.clone() for n, p in dit.named_parameters() if p.requires_grad}, marked


@pytest.mark.parametrize("mode", ["full", "keep_attention", "offload_inputs"])
def test_checkpointing_modes_match_plain_backward(tiny_checkpoint, dit_cases, mode):
    expected, plain_marks = _grads(tiny_checkpoint, dit_cases, gradient_checkpointing=False)
    got, marks = _grads(tiny_checkpoint, dit_cases, gradient_checkpointing=True, mode=mode)
    assert not any(plain_marks) and all(marks)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="'fast'"):
        _settings(mode="fast")


@pytest.mark.parametrize("scope", ["block", "checkpointed_block"])
def test_compiled_keep_attention_matches_plain_backward(tiny_checkpoint, dit_cases, scope, monkeypatch):
    """compile_scope decides what torch.compile wraps; both give the plain gradients (dynamo, eager backend)."""
    compiled = []
    real_compile = torch.compile

    def eager_compile(fn, **kwargs):
        compiled.append("checkpoint wrapper" if hasattr(fn, "__wrapped__") else "block forward")
        return real_compile(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    expected, _ = _grads(tiny_checkpoint, dit_cases, gradient_checkpointing=False)
    got, marks = _grads(tiny_checkpoint, dit_cases, gradient_checkpointing=True, mode="keep_attention",
                        compile_blocks=True, compile_scope=scope)
    assert all(marks) and len(compiled) == len(marks)
    # `block`: the block's own forward is compiled, then checkpointed; `checkpointed_block`: the checkpoint
    # wrapper (selective_checkpoint's `run`, functools.wraps of the forward) is what gets compiled.
    want = "block forward" if scope == "block" else "checkpoint wrapper"
    assert set(compiled) == {want}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)


def test_checkpointed_block_compile_needs_keep_attention(tiny_checkpoint):
    with pytest.raises(ConfigError, match="keep_attention"):
        apply_runtime(load_dit(tiny_checkpoint), _settings(mode="full", compile_blocks=True,
                                                            compile_scope="checkpointed_block"), "cpu")


@pytest.mark.parametrize("mode", ["full", "keep_attention"])
def test_uncheckpointed_first_blocks_match_plain_backward(tiny_checkpoint, dit_cases, mode):
    """gradient_checkpointing_uncheckpointed_blocks: the first k blocks run plainly (not marked, nothing
    recomputed), the rest checkpointed; gradients equal the plain backward's."""
    expected, _ = _grads(tiny_checkpoint, dit_cases, gradient_checkpointing=False)
    got, marks = _grads(tiny_checkpoint, dit_cases, gradient_checkpointing=True, mode=mode, uncheckpointed_blocks=1)
    assert marks == [False] + [True] * (len(marks) - 1)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)
